"""The STUN server's anti-reflection reply limits (sans-IO, fake clock): per-source and global
token buckets, the bounded source table, throttled refusal logging, the protocol counting
refusals, and the derper flags that set the limits."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.stun import codec as C

if TYPE_CHECKING:
    from nodeagent_derper.stun_ratelimit import StunReplyLimiter

pytestmark = pytest.mark.feature("derper")


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def limiter(clock: FakeClock, **limits: Any) -> StunReplyLimiter:
    """A limiter on ``clock`` with ``StunRateLimits(**limits)``."""
    from nodeagent_derper.stun_ratelimit import StunRateLimits, StunReplyLimiter

    return StunReplyLimiter(StunRateLimits(**limits), clock=clock)


def allowed(lim: StunReplyLimiter, host: str, n: int) -> int:
    from nodeagent_derper.stun_ratelimit import ALLOWED

    return sum(lim.check(host) == ALLOWED for _ in range(n))


# --- token bucket ----------------------------------------------------------------------------


def test_token_bucket_starts_full_refills_at_rate_and_caps_at_burst() -> None:
    from nodeagent_derper.stun_ratelimit import TokenBucket

    b = TokenBucket(rate=10.0, burst=5)
    t = 50.0
    assert b.tokens(t) == 5
    assert [b.take(t) for _ in range(6)] == [True] * 5 + [False]
    t += 0.1  # exactly one token's worth
    assert b.take(t) and not b.take(t)
    t += 0.3
    assert [b.take(t) for _ in range(4)] == [True, True, True, False]
    t += 3600.0  # a long idle time refills to burst, not beyond
    assert b.tokens(t) == 5
    assert sum(b.take(t) for _ in range(100)) == 5


def test_token_bucket_rejects_nonsense() -> None:
    from nodeagent_derper.stun_ratelimit import TokenBucket

    for rate, burst in ((0.0, 1), (float("inf"), 1), (1.0, 0)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)


# --- per-source limit ------------------------------------------------------------------------


def test_per_source_cap_is_burst_plus_rate_times_elapsed() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=10.0, burst=20, global_rate=0.0)
    got = allowed(lim, "198.51.100.7", 1000)
    assert got == 20
    for _ in range(50):  # 5 s of flooding at 1000 requests per 0.1 s
        clock.advance(0.1)
        got += allowed(lim, "198.51.100.7", 1000)
    assert got == 20 + 10 * 5
    # Another source is unaffected by the flooder.
    assert allowed(lim, "198.51.100.8", 20) == 20


def test_normal_netcheck_pattern_is_never_refused_by_defaults() -> None:
    from nodeagent_derper.stun_ratelimit import ALLOWED, StunRateLimits, StunReplyLimiter

    clock = FakeClock()
    lim = StunReplyLimiter(StunRateLimits(), clock=clock)
    # Many clients behind one NAT, each netcheck sending a few probes per family in a burst.
    for _ in range(60):
        for _client in range(20):
            assert all(lim.check("203.0.113.9") == ALLOWED for _ in range(6))
        clock.advance(20.0)


def test_refused_by_source_does_not_spend_the_global_budget() -> None:
    from nodeagent_derper.stun_ratelimit import REFUSED_GLOBAL, REFUSED_SOURCE

    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=3, global_rate=10.0, global_burst=10)
    assert allowed(lim, "192.0.2.1", 3) == 3
    assert {lim.check("192.0.2.1") for _ in range(10_000)} == {REFUSED_SOURCE}
    # 7 of the 10 global tokens are left for everyone else.
    answers = [lim.check(f"192.0.2.{i}") for i in range(2, 12)]
    assert answers.count(REFUSED_GLOBAL) == 3


def test_ipv6_sources_share_a_bucket_per_64_and_mapped_ipv4_is_ipv4() -> None:
    from nodeagent_derper.stun_ratelimit import source_key

    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff:1:2:3")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1")
    assert source_key("fe80::1%eth0") == source_key("fe80::2")
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=4, global_rate=0.0)
    hosts = [f"2001:db8:1:2::{i:x}" for i in range(1, 100)]  # one /64, many addresses
    assert sum(allowed(lim, h, 1) for h in hosts) == 4


# --- global limit ----------------------------------------------------------------------------


def test_global_cap_over_many_spoofed_sources() -> None:
    clock = FakeClock()
    lim = limiter(clock, rate=10.0, burst=20, global_rate=100.0, global_burst=100)
    sources = [str(ipaddress.IPv4Address(0x0A000000 + i)) for i in range(5000)]
    got = sum(allowed(lim, s, 1) for s in sources)  # every source has a full bucket
    assert got == 100
    total = got
    for _ in range(30):  # 3 s, each step a fresh wave of spoofed sources
        clock.advance(0.1)
        total += sum(allowed(lim, s, 1) for s in sources[:500])
    assert total == 100 + 100 * 3


def test_default_global_burst_is_a_second_of_rate_at_least_the_source_burst() -> None:
    from nodeagent_derper.stun_ratelimit import StunRateLimits

    assert StunRateLimits(global_rate=1000.0, burst=20).effective_global_burst() == 1000
    assert StunRateLimits(global_rate=5.0, burst=20).effective_global_burst() == 20
    assert StunRateLimits(global_rate=5.0, global_burst=7).effective_global_burst() == 7


# --- bounded memory --------------------------------------------------------------------------


def test_source_table_stays_bounded_under_100k_distinct_sources() -> None:
    from nodeagent_derper.stun_ratelimit import DEFAULT_MAX_SOURCES, StunRateLimits

    clock = FakeClock()
    lim = limiter(clock, rate=10.0, burst=20, global_rate=0.0, max_sources=1000)
    for i in range(50_000):
        lim.check(str(ipaddress.IPv4Address(0xC6120000 + i)))
        lim.check(str(ipaddress.IPv6Address((0x20010DB8 << 96) | (i << 64) | 1)))
        if i % 1000 == 0:
            clock.advance(0.001)
        assert len(lim) <= 1000
    assert len(lim) == 1000
    assert lim.evictions == 99_000
    assert StunRateLimits().max_sources == DEFAULT_MAX_SOURCES
    # Default table: 100 000 sources still end at the bound.
    big = limiter(clock, global_rate=0.0)
    for i in range(100_000):
        big.check(str(ipaddress.IPv4Address(0x64400000 + i)))
    assert len(big) == DEFAULT_MAX_SOURCES


def test_flooding_source_keeps_its_drained_bucket_while_fillers_churn_the_table() -> None:
    # Least recently *seen* is evicted, and a refused request counts as seen: spoofed fillers
    # cannot push an active flooder out of the table to hand it a fresh burst.
    clock = FakeClock()
    lim = limiter(clock, rate=1.0, burst=5, global_rate=0.0, max_sources=10)
    got = 0
    for i in range(10_000):
        got += allowed(lim, "192.0.2.66", 1)
        lim.check(str(ipaddress.IPv4Address(0x0A000000 + i)))
    assert got == 5


def test_limits_validation_and_off_switches() -> None:
    from nodeagent_derper.stun_ratelimit import StunRateLimits

    bad: dict[str, Any]
    for bad in ({"rate": -1.0}, {"global_rate": float("nan")}, {"burst": 0},
                {"max_sources": 0}, {"global_burst": 0}):
        with pytest.raises(ValueError):
            StunRateLimits(**bad)
    assert not StunRateLimits(rate=0.0, global_rate=0.0).enabled
    clock = FakeClock()
    no_source = limiter(clock, rate=0.0, global_rate=10.0, global_burst=10)
    assert allowed(no_source, "192.0.2.1", 100) == 10 and len(no_source) == 0
    no_global = limiter(clock, rate=1.0, burst=3, global_rate=0.0)
    assert sum(allowed(no_global, f"10.0.{i // 256}.{i % 256}", 2) for i in range(3000)) == 6000


# --- refusal logging -------------------------------------------------------------------------


def test_refusal_report_at_most_once_per_interval() -> None:
    from nodeagent_derper.stun_ratelimit import REFUSED_GLOBAL, REFUSED_SOURCE, RefusalReport

    clock = FakeClock()
    rep = RefusalReport(interval=60.0, clock=clock)
    first = rep.note(REFUSED_SOURCE, "192.0.2.1")
    assert first is not None and "192.0.2.1" in first
    msgs = []
    for i in range(10_000):
        clock.advance(0.001)  # 10 s
        msgs.append(rep.note(REFUSED_GLOBAL if i % 2 else REFUSED_SOURCE, "192.0.2.9"))
    assert msgs.count(None) == 10_000
    clock.advance(50.5)  # past the interval since the first report
    second = rep.note(REFUSED_SOURCE, "192.0.2.3")
    assert second is not None
    assert "10001 request(s)" in second and "5001 over the per-source" in second
    assert "5000 over the global" in second and "latest from 192.0.2.3" in second
    assert rep.note(REFUSED_SOURCE, "192.0.2.3") is None


# --- the protocol ----------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def test_protocol_refuses_counts_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    from nodeagent_derper.metrics import DerperMetrics
    from nodeagent_derper.stun_ratelimit import RefusalReport, StunRateLimits, StunReplyLimiter
    from nodeagent_derper.stun_server import StunProtocol

    reg = CollectorRegistry()
    clock = FakeClock()
    lim = StunReplyLimiter(StunRateLimits(rate=5.0, burst=10, global_rate=0.0), clock=clock)
    proto = StunProtocol(DerperMetrics(reg), limiter=lim,
                         report=RefusalReport(interval=60.0, clock=clock))
    tr = FakeTransport()
    proto.connection_made(tr)  # type: ignore[arg-type]  # duck-typed sendto
    src = ("198.51.100.20", 40000)
    with caplog.at_level(logging.INFO, logger="derper.stun"):
        for _ in range(1000):
            proto.datagram_received(C.build_binding_request(C.new_txid()), src)
        clock.advance(1.0)
        for _ in range(1000):
            proto.datagram_received(C.build_binding_request(C.new_txid()), src)
        proto.datagram_received(b"junk", src)  # junk is never rate limited, just dropped

    def count(d: str) -> float:
        return reg.get_sample_value("stun_requests_total", {"disposition": d}) or 0.0

    assert len(tr.sent) == 15 == count("success")
    assert count("rate_limited") == 2000 - 15
    assert count("not_stun") == 1
    lines = [r for r in caplog.records if "rate limit" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    # A different client on the same socket is still answered.
    proto.datagram_received(C.build_binding_request(C.new_txid()), ("198.51.100.21", 1))
    assert tr.sent[-1][1] == ("198.51.100.21", 1)


# --- flags -----------------------------------------------------------------------------------


def test_flags_set_the_stun_limits() -> None:
    from nodeagent_derper.cli import build_parser, go_style, options_from_args
    from nodeagent_derper.stun_ratelimit import DEFAULT_BURST, DEFAULT_GLOBAL_RATE, DEFAULT_RATE

    p = build_parser()
    o = options_from_args(p.parse_args(["--dev"]))
    assert (o.stun_rate_limit, o.stun_rate_burst, o.stun_global_rate_limit) == \
        (DEFAULT_RATE, DEFAULT_BURST, DEFAULT_GLOBAL_RATE)
    o = options_from_args(p.parse_args(go_style(
        ["--dev", "-stun-rate-limit=2.5", "-stun-rate-burst", "7", "--stun-global-rate-limit=0"],
        p)))
    assert (o.stun_rate_limit, o.stun_rate_burst, o.stun_global_rate_limit) == (2.5, 7, 0.0)


@pytest.mark.parametrize("argv", [
    ["--stun-rate-limit=-1"], ["--stun-rate-limit=inf"], ["--stun-rate-limit=nan"],
    ["--stun-rate-burst=0"], ["--stun-global-rate-limit=-5"],
])
def test_bad_stun_limit_flags_are_usage_errors(argv: list[str]) -> None:
    from nodeagent_derper.cli import UsageError, build_parser, options_from_args

    with pytest.raises(UsageError, match=r"^--stun-[a-z-]+ \S+: must be ≥"):
        options_from_args(build_parser().parse_args(["--dev", *argv]))
