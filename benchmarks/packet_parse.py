"""Benchmark: packets/s of ``parse_into`` on 1400-byte TCP packets (IPv4 and IPv6).

One ``Parsed`` is reused, as the TUN wrapper does. Besides absolute figures it prints same-run
ratios against a floor (a bare ``struct.unpack_from`` of the IPv4 header, the least a Python
parser can do) so results are comparable across machines.

Run: ``python3 benchmarks/packet_parse.py`` (``BENCH_N`` sets the calls per round).
"""

from __future__ import annotations

import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nodeagent.packet import (
    IPV4,
    IPV6,
    TCP_ACK,
    TCP_PSH,
    Parsed,
    build_tcp,
    build_udp,
    ip_to_int,
    parse_into,
)

PACKET_SIZE = 1400
ROUNDS = 5


def _packets() -> dict[str, bytes]:
    _, a4 = ip_to_int("100.64.0.1")
    _, b4 = ip_to_int("100.64.0.2")
    _, a6 = ip_to_int("fd7a:115c:a1e0::1")
    _, b6 = ip_to_int("fd7a:115c:a1e0::2")
    flags = TCP_ACK | TCP_PSH
    return {
        "IPv4 TCP": build_tcp(4, a4, b4, 51234, 443, 1, 2, flags, payload=bytes(PACKET_SIZE - 40)),
        "IPv6 TCP": build_tcp(6, a6, b6, 51234, 443, 1, 2, flags, payload=bytes(PACKET_SIZE - 60)),
        "IPv4 UDP": build_udp(4, a4, b4, 51234, 53, bytes(PACKET_SIZE - 28)),
    }


def _rate(fn, arg, n: int) -> float:
    """Best-of-ROUNDS packets per second for ``n`` calls of ``fn(arg)``."""
    best = float("inf")
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    n = int(os.environ.get("BENCH_N", "200000"))
    p = Parsed()
    pkts = _packets()
    for name, pkt in pkts.items():
        assert len(pkt) == PACKET_SIZE, (name, len(pkt))
        assert parse_into(pkt, p) in (IPV4, IPV6), name

    hdr = struct.Struct("!BxHxxHxBxxII")
    floor = _rate(hdr.unpack_from, pkts["IPv4 TCP"], n)
    print(f"floor (one struct.unpack_from of an IPv4 header): {floor:,.0f} /s")

    def parse_one(pkt: bytes) -> int:
        return parse_into(pkt, p)

    for name, pkt in pkts.items():
        for label, buf in (("bytes", pkt), ("memoryview", memoryview(pkt))):
            r = _rate(parse_one, buf, n)
            print(
                f"parse_into {name} {PACKET_SIZE} B ({label}): {r:,.0f} packets/s, "
                f"{1e6 / r:.2f} us/packet, {r / floor:.2f}x of floor"
            )


if __name__ == "__main__":
    main()
