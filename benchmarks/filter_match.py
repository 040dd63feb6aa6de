"""Benchmark: the packet filter's cost on the hot path and its scaling with the rule count.

Prints, all from the same run so ratios are comparable across machines:

(a) ``parse_into`` + ``Filter.check_in`` on 1400-byte IPv4 TCP data packets (the common inbound
    case) and on new flows (TCP SYN matched against rules), as packets/s and as a ratio to
    ``parse_into`` alone; plus ``check_out`` on UDP (which records the flow).
(b) ``check_in`` of new TCP flows with 10 000 rules (random /32 and /24 sources, various
    destination ports) against 10 rules: a ratio near 1 shows matching is not linear in rules.
(c) A naive linear matcher (integers precomputed, one pass over every rule) with 10 000 rules.

Run: ``python3 benchmarks/filter_match.py`` (``BENCH_N`` sets the calls per round).
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nodeagent.filter import ACCEPT, Filter, FilterRule, parse_rules
from nodeagent.packet import (
    TCP_ACK,
    TCP_PSH,
    TCP_SYN,
    Parsed,
    build_tcp,
    build_udp,
    ip_to_int,
    parse_into,
)

PACKET_SIZE = 1400
ROUNDS = 5
ME = "100.64.0.2"
_, ME_INT = ip_to_int(ME)


def _rate(fn: Callable[[], None], n: int) -> float:
    """Best-of-ROUNDS calls per second; ``fn`` itself loops ``n`` times."""
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def _rules(count: int, rng: random.Random) -> list[dict[str, object]]:
    rules: list[dict[str, object]] = []
    for _ in range(count):
        a, b, c = rng.randrange(64, 128), rng.randrange(256), rng.randrange(256)
        src = f"100.{a}.{b}.{rng.randrange(1, 255)}" if rng.random() < 0.5 else f"100.{a}.{b}.0/24"
        lo = rng.randrange(1, 60000)
        hi = lo + rng.choice((0, 0, 0, 10, 1000))
        rules.append({"SrcIPs": [src], "DstPorts": [
            {"IP": ME, "Ports": {"First": lo, "Last": hi}},
            {"IP": "fd7a:115c:a1e0::2", "Ports": {"First": c, "Last": c}}]})
    return rules


def _syns(rules: list[FilterRule], count: int, rng: random.Random) -> list[Parsed]:
    """New-flow packets: half aimed at a rule (source and port inside it), half random."""
    out = []
    for i in range(count):
        if i % 2 == 0 and rules:
            r = rng.choice(rules)
            net = r.srcs[0]
            src = int(net.network_address) + rng.randrange(net.num_addresses)
            d = r.dsts[0]
            port = rng.randint(d.first, d.last)
        else:
            src = (100 << 24) | rng.randrange(64 << 16, 128 << 16)
            port = rng.randrange(1, 65536)
        p = Parsed()
        parse_into(build_tcp(4, src, ME_INT, 40000 + i % 1000, port, 1, 0, TCP_SYN), p)
        out.append(p)
    return out


class NaiveLinear:
    """Every rule scanned in order; addresses and masks precomputed as integers (a fair floor)."""

    def __init__(self, rules: list[FilterRule]) -> None:
        def mask(n: object) -> tuple[int, int]:
            bits = n.max_prefixlen  # type: ignore[attr-defined]
            m = ((1 << bits) - 1) ^ ((1 << (bits - n.prefixlen)) - 1)  # type: ignore[attr-defined]
            return m, int(n.network_address)  # type: ignore[attr-defined]

        self.rules = [
            (frozenset(r.effective_protos),
             [(s.version, *mask(s)) for s in r.srcs],
             [(d.net.version, *mask(d.net), d.first, d.last) for d in r.dsts])
            for r in rules
        ]

    def match(self, version: int, proto: int, src: int, dst: int, port: int) -> bool:
        for protos, srcs, dsts in self.rules:
            if proto not in protos:
                continue
            for v, m, n in srcs:
                if v == version and src & m == n:
                    break
            else:
                continue
            for v, m, n, lo, hi in dsts:
                if v == version and dst & m == n and lo <= port <= hi:
                    return True
        return False


def main() -> None:
    n = int(os.environ.get("BENCH_N", "200000"))
    rng = random.Random(1)
    _, peer = ip_to_int("100.64.0.1")
    p = Parsed()

    # (a) hot path on data packets.
    data = build_tcp(4, peer, ME_INT, 51234, 443, 1, 2, TCP_ACK | TCP_PSH,
                     payload=bytes(PACKET_SIZE - 40))
    assert len(data) == PACKET_SIZE
    syn = build_tcp(4, peer, ME_INT, 51234, 22, 1, 0, TCP_SYN)
    udp_out = build_udp(4, ME_INT, peer, 51234, 53, bytes(PACKET_SIZE - 28))
    ssh = {"SrcIPs": ["100.64.0.0/10"],
           "DstPorts": [{"IP": ME, "Ports": {"First": 22, "Last": 22}}]}
    f10 = Filter(parse_rules([*_rules(9, rng), ssh]), [f"{ME}/32", "fd7a:115c:a1e0::2/128"])
    parse_into(syn, p)
    assert f10.check_in(p) == ACCEPT

    def parse_only() -> None:
        for _ in range(n):
            parse_into(data, p)

    def parse_filter(pkt: bytes, check: Callable[[Parsed], int]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(n):
                parse_into(pkt, p)
                check(p)
        return run

    base = _rate(parse_only, n)
    print(f"(a) parse_into only, IPv4 TCP {PACKET_SIZE} B: {base:,.0f} packets/s "
          f"({1e6 / base:.2f} us)")
    for label, pkt, check in (
        (f"IPv4 TCP data {PACKET_SIZE} B, check_in", data, f10.check_in),
        ("IPv4 TCP SYN (rule match, 10 rules), check_in", syn, f10.check_in),
        (f"IPv4 UDP {PACKET_SIZE} B, check_out (records flow)", udp_out, f10.check_out),
    ):
        r = _rate(parse_filter(pkt, check), n)
        print(f"    parse_into + {label}: {r:,.0f} packets/s ({1e6 / r:.2f} us), "
              f"{r / base:.2f}x of parse-only")

    # (b) scaling with the rule count on new flows (pre-parsed, so only the filter is timed).
    results: dict[int, float] = {}
    for count in (10, 10_000):
        t0 = time.perf_counter()
        rules = parse_rules(_rules(count, rng))
        t1 = time.perf_counter()
        f = Filter(rules, [f"{ME}/32", "fd7a:115c:a1e0::2/128"])
        t2 = time.perf_counter()
        pkts = _syns(rules, 1000, rng)
        accepted = sum(f.check_in(q) == ACCEPT for q in pkts)
        m = n // len(pkts) * len(pkts)

        def run(f: Filter = f, pkts: list[Parsed] = pkts, m: int = m) -> None:
            check = f.check_in
            for _ in range(m // len(pkts)):
                for q in pkts:
                    check(q)

        results[count] = _rate(run, m)
        print(f"(b) check_in new TCP flows, {count:,} rules: {results[count]:,.0f} packets/s "
              f"({1e6 / results[count]:.2f} us), {accepted / len(pkts):.0%} accepted; "
              f"parse_rules {1e3 * (t1 - t0):.1f} ms, compile {1e3 * (t2 - t1):.1f} ms, "
              f"source prefix lengths {f.matcher.prefix_lengths()[4]}")
    print(f"    10,000 rules / 10 rules throughput: {results[10_000] / results[10]:.2f}x")

    # (c) the naive linear scan over the same 10 000 rules and the same kind of packets.
    naive = NaiveLinear(rules)
    sample = pkts[:100]
    fast = f.matcher
    for q in sample:
        assert naive.match(4, 6, q.src_ip, q.dst_ip, q.dst_port) == fast.match(
            4, 6, q.src_ip, q.dst_ip, q.dst_port)

    def run_naive() -> None:
        for q in sample:
            naive.match(4, 6, q.src_ip, q.dst_ip, q.dst_port)

    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        run_naive()
        best = min(best, time.perf_counter() - t0)
    r_naive = len(sample) / best
    print(f"(c) naive linear matcher, 10,000 rules: {r_naive:,.0f} packets/s "
          f"({1e6 / r_naive:.0f} us); compiled check_in is "
          f"{results[10_000] / r_naive:,.0f}x faster")


if __name__ == "__main__":
    main()
