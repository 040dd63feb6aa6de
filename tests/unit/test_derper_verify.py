"""The derper's client admission without sockets: the verdict cache (TTLs, bound, clock), the
webhook's request body and answer parsing (property-tested: random bytes never raise anything but
ValueError), source addresses, and how Admission combines checks and counts refusals."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.feature("derper")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_cache_ttls_and_bound() -> None:
    from nodeagent_derper.verify import ADMIT, Verdict, VerdictCache

    clock = Clock()
    c = VerdictCache(allow_ttl=5.0, deny_ttl=2.0, max_entries=3, clock=clock)
    deny = Verdict(False, "unknown_key", "no")
    c.put(b"a", ADMIT)
    c.put(b"d", deny)
    assert c.get(b"a") is ADMIT and c.get(b"d") is deny and c.get(b"x") is None
    clock.t += 1.99
    assert c.get(b"d") is deny
    clock.t += 0.01
    assert c.get(b"d") is None and c.get(b"a") is ADMIT  # deny expired first
    clock.t += 3.0
    assert c.get(b"a") is None and len(c) == 0
    for k in (b"1", b"2", b"3", b"4"):
        c.put(k, ADMIT)
    assert len(c) == 3 and c.get(b"1") is None and c.get(b"4") is ADMIT
    c.put(b"2", deny)  # re-storing moves it to the end: 3 is now the oldest
    c.put(b"5", ADMIT)
    assert c.get(b"3") is None and c.get(b"2") is deny
    zero = VerdictCache(allow_ttl=0, deny_ttl=0, clock=clock)
    zero.put(b"a", ADMIT)
    assert len(zero) == 0
    with pytest.raises(ValueError):
        VerdictCache(max_entries=0)


def test_parse_admit_response() -> None:
    from nodeagent_derper.verify import parse_admit_response

    assert parse_admit_response(b'{"Allow": true}') is True
    assert parse_admit_response(b' {"allow":true, "x": [1]}\n') is True
    assert parse_admit_response(b'{"Allow": false}') is False
    assert parse_admit_response(b"{}") is False  # Go: a missing field stays false
    assert parse_admit_response(b'{"Allow": true} trailing garbage') is True  # first value only
    for bad in (b"", b"null", b"[true]", b'{"Allow": "yes"}', b'{"Allow": 1}', b"\xff",
                b'{"Allow": tr', b"[" * 100_000):
        with pytest.raises(ValueError) as ei:
            parse_admit_response(bad)
        assert "\n" not in str(ei.value)


@given(st.binary(max_size=300))
def test_parse_admit_response_never_raises_other(data: bytes) -> None:
    from nodeagent_derper.verify import parse_admit_response

    try:
        assert parse_admit_response(data) in (True, False)
    except ValueError:
        pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(
                        st.sampled_from(["Allow", "allow", "ALLOW", "x"]), ch, max_size=3)))
def test_parse_admit_response_json_values(value: Any) -> None:
    from nodeagent_derper.verify import parse_admit_response

    try:
        parse_admit_response(json.dumps(value).encode())
    except ValueError:
        pass


def test_request_body_and_source() -> None:
    from nodeagent_derper.verify import admit_request_body, short_key, source_ip

    key = bytes(range(32))
    assert json.loads(admit_request_body(key, "192.0.2.1")) == {
        "NodePublic": "nodekey:" + key.hex(), "Source": "192.0.2.1"}
    assert source_ip(("::ffff:192.0.2.7", 1, 0, 0)) == "192.0.2.7"
    assert source_ip(("fe80::1%eth0", 1, 0, 2)) == "fe80::1"
    assert source_ip(None) == "" and source_ip(("127.0.0.1", 5)) == "127.0.0.1"
    assert short_key(key) == "[00010]"


def test_check_url() -> None:
    from nodeagent_derper.verify import check_url

    assert check_url("http://127.0.0.1:9/admit") == "http://127.0.0.1:9/admit"
    for bad in ("ftp://x/", "127.0.0.1:80", "http://", ""):
        with pytest.raises(ValueError, match="verify-client-url"):
            check_url(bad)


class FakeCheck:
    def __init__(self, name: str, answers: list[Any]) -> None:
        self.name = name
        self.answers = answers
        self.seen: list[tuple[bytes, str]] = []

    async def check(self, key: bytes, source: str) -> Any:
        self.seen.append((key, source))
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    async def close(self) -> None:
        return None


@pytest.mark.asyncio
async def test_admission_combines_counts_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    from nodeagent_derper.verify import ADMIT, Admission, Verdict
    from prometheus_client import CollectorRegistry, generate_latest

    first = FakeCheck("first", [ADMIT, Verdict(False, "unknown_key", "not in tailnet"), ADMIT,
                                RuntimeError("boom")])
    second = FakeCheck("second", [ADMIT, Verdict(False, "url_denied", "refused by URL")])
    adm = Admission([first, second])  # type: ignore[list-item]
    reg = CollectorRegistry()
    reg.register(adm)
    key = bytes([0xAB] * 32)
    caplog.set_level(logging.INFO, logger="derper.verify")
    assert await adm(key, {}, ("::ffff:198.51.100.4", 1, 0, 0))
    v = await adm(key, {}, ("198.51.100.5", 2))
    assert not v and v.message == "not in tailnet" and len(second.seen) == 1  # stops at first
    v = await adm(key, {}, ("198.51.100.6", 3))
    assert not v and v.reason == "url_denied"
    v = await adm(key, {}, None)
    assert not v and v.reason == "url_error"  # an exception in a (non-agent) check refuses
    assert first.seen[0] == (key, "198.51.100.4")
    assert adm.stats()["refused"]["unknown_key"] == 1 and adm.stats()["admitted"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any("[ababa]" in ln and "198.51.100.5" in ln and "not in tailnet" in ln
               for ln in lines), lines
    text = generate_latest(reg).decode()
    assert 'derper_clients_refused_total{reason="unknown_key"} 1.0' in text
    assert 'derper_clients_refused_total{reason="url_denied"} 1.0' in text
    assert "derper_clients_admitted_total 1.0" in text
