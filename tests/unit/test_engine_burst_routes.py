"""The engine's per-burst route reuse: cryptokey routing of inbound sources (``deliver_from``)
and outbound destinations (``_route_out``) must judge every packet of a burst as if looked up
alone, when consecutive packets share an address and when they alternate between peers and
address families."""

from __future__ import annotations

import struct
from typing import Any

from nodeagent.engine.core import Engine, PeerConfig


class _Wrapper:
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.outbound_tap: Any = None
        self.inbound_tap: Any = None
        self.tsmp_reject_handler: Any = None

    def set_outbound_sink(self, fn: Any) -> None:
        self.sink = fn

    def from_peer(self, pkts: list[bytes]) -> None:
        self.got += pkts


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    def configure(self, peers: list[PeerConfig]) -> None:
        pass

    def send(self, key: str, pkts: list[bytes]) -> None:
        self.sent.append((key, pkts))


def v4(src: str, dst: str, tag: int) -> bytes:
    a = bytes(int(x) for x in src.split("."))
    b = bytes(int(x) for x in dst.split("."))
    return struct.pack("!BBHHHBBH", 0x45, 0, 21, tag, 0, 64, 17, 0) + a + b + bytes([tag])


def v6(src: int, dst: int, tag: int) -> bytes:
    return (struct.pack("!IHBB", 0x60000000, 1, 17, 64) + src.to_bytes(16, "big")
            + dst.to_bytes(16, "big") + bytes([tag]))


FD = 0xFD7A << 112


def _engine() -> tuple[Engine, _Wrapper, _Transport]:
    w, t = _Wrapper(), _Transport()
    e = Engine(w, t)  # type: ignore[arg-type]
    e.configure([PeerConfig("k1", allowed_ips=["100.64.0.1/32", "fd7a::1/128"]),
                 PeerConfig("k2", allowed_ips=["100.64.0.2/32", "fd7a::2/128"])])
    return e, w, t


def test_sources_are_judged_per_packet_within_a_burst() -> None:
    e, w, _ = _engine()
    me = "100.64.0.9"
    burst = [v4("100.64.0.1", me, 1), v4("100.64.0.1", me, 2), v4("100.64.0.2", me, 3),
             v4("100.64.0.1", me, 4), v6(FD | 1, FD | 9, 5), v6(FD | 2, FD | 9, 6),
             v6(FD | 1, FD | 9, 7), b"", b"\x45" + bytes(5), v4("100.64.0.1", me, 8),
             v4("10.0.0.1", me, 9)]
    e.deliver_from("k1", burst)
    assert [p[-1] for p in w.got] == [1, 2, 4, 5, 7, 8]
    assert e.counters["bad_source"] == 4  # k2's v4 and v6, the short packet, 10.0.0.1


def test_destinations_are_routed_per_packet_within_a_burst() -> None:
    e, _, t = _engine()
    me = "100.64.0.9"
    burst = [v4(me, "100.64.0.1", 1), v4(me, "100.64.0.1", 2), v4(me, "100.64.0.2", 3),
             v6(FD | 9, FD | 2, 4), v6(FD | 9, FD | 1, 5), v4(me, "10.9.9.9", 6),
             v4(me, "100.64.0.2", 7)]
    e._route_out(burst)
    assert {k: [p[-1] for p in pkts] for k, pkts in t.sent} == {"k1": [1, 2, 5],
                                                                 "k2": [3, 4, 7]}
    assert e.counters["no_route"] == 1
