"""Shared scaffolding for the WireGuard core tests: a fake clock and an in-memory network.

Not a test module; imported by tests/unit/test_wg_*.py and tests/property/test_wg_props.py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from nodeagent.engine.wireguard import PeerSpec, WGConfig, WireGuardCore, generate_private_key
from nodeagent.packet import build_udp

EP_A = ("100.64.0.1", 41641)
EP_B = ("100.64.0.2", 41641)
TUN_A = int.from_bytes(socket.inet_aton("100.100.0.1"), "big")
TUN_B = int.from_bytes(socket.inet_aton("100.100.0.2"), "big")


class Clock:
    """Manually advanced monotonic and wall clocks."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def wall(self) -> float:
        return 1_700_000_000.0 + self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def udp(payload: bytes = b"hello", src: int = TUN_A, dst: int = TUN_B) -> bytes:
    return build_udp(4, src, dst, 1000, 2000, payload)


class Net:
    """Two cores joined by a lossless in-memory wire (with taps to drop or record datagrams)."""

    def __init__(self, config: WGConfig | None = None, config_b: WGConfig | None = None,
                 under_load_a: Callable[[], bool] | None = None,
                 under_load_b: Callable[[], bool] | None = None, keepalive: int = 0) -> None:
        self.clock = Clock()
        self.a = WireGuardCore(generate_private_key(), clock=self.clock,
                               wallclock=self.clock.wall, config=config, under_load=under_load_a)
        self.b = WireGuardCore(generate_private_key(), clock=self.clock,
                               wallclock=self.clock.wall, config=config_b or config,
                               under_load=under_load_b)
        self.a.set_peers([PeerSpec(self.b.public_key, endpoint=EP_B,
                                   persistent_keepalive=keepalive)])
        self.b.set_peers([PeerSpec(self.a.public_key, endpoint=EP_A)])
        self.cores = {EP_A: self.a, EP_B: self.b}
        self.got: dict[str, list[bytes]] = {"a": [], "b": []}
        self.wire: list[tuple[Any, Any, bytes]] = []  # (src, dst, datagram) delivered
        self.drop: Callable[[Any, Any, bytes], bool] = lambda s, d, m: False

    def name(self, ep: Any) -> str:
        return "a" if ep == EP_A else "b"

    def deliver(self, items: list[tuple[Any, bytes]], src: Any) -> None:
        """Deliver ``items`` sent from ``src`` and everything sent in response, to quiescence."""
        pending = [(src, dst, bytes(m)) for dst, m in items]
        while pending:
            s, d, m = pending.pop(0)
            if self.drop(s, d, m):
                continue
            self.wire.append((s, d, m))
            res = self.cores[d].receive(m, s)
            self.got[self.name(d)].extend(p for _k, p in res.plaintexts)
            pending.extend((d, d2, bytes(m2)) for d2, m2 in res.to_send)

    def send_a(self, *packets: bytes) -> None:
        self.deliver(self.a.encrypt(self.b.public_key, list(packets)), EP_A)

    def send_b(self, *packets: bytes) -> None:
        self.deliver(self.b.encrypt(self.a.public_key, list(packets)), EP_B)

    def tick(self) -> None:
        self.deliver(self.a.tick(), EP_A)
        self.deliver(self.b.tick(), EP_B)

    def run(self, seconds: float, step: float = 0.25) -> None:
        """Advance time in steps, ticking both cores each step."""
        end = self.clock.t + seconds
        while self.clock.t < end:
            self.clock.advance(step)
            self.tick()

    def types(self, src: Any | None = None) -> list[int]:
        return [m[0] for s, _d, m in self.wire if src is None or s == src]
