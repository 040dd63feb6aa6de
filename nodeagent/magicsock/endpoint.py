"""One peer's paths: candidate UDP endpoints, the best confirmed one, trust, and pings in flight.

Sans-IO and clock-driven (the caller passes ``now``). :class:`PeerPaths` answers "where does a
packet to this peer go now" (``addr_for_send``), decides when discovery pings are due, and keeps
the outcome of pongs. The numbers and rules are Tailscale's magicsock facts
(``../shared/specs/reference/magicsock.md`` §2, §4-§7): a pong within 6.5 s makes a direct
address trusted (UDP only); an untrusted best address gets a DERP copy too; with none, DERP only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import NamedTuple

HEARTBEAT_INTERVAL = 3.0
TRUST_UDP_ADDR_DURATION = 6.5
PING_TIMEOUT = 5.0
DISCO_PING_INTERVAL = 5.0
SESSION_ACTIVE_TIMEOUT = 45.0
UPGRADE_INTERVAL = 60.0
GOOD_ENOUGH_LATENCY = 0.005
CANDIDATE_LIFETIME = SESSION_ACTIVE_TIMEOUT  # learnt from a ping's source, kept this long
MAX_CANDIDATES = 100

UDPAddr = tuple[str, int]

# Where a candidate came from.
FROM_NETMAP, FROM_CALL_ME_MAYBE, FROM_PING = "netmap", "call-me-maybe", "ping"


class PeerRef(NamedTuple):
    """The WireGuard endpoint of a peer whose paths magicsock chooses: its raw node key."""

    key: bytes


class DerpAddr(NamedTuple):
    """A DERP path, shaped like a socket address: ``("127.3.3.40", region)`` plus the node key
    the packet came from or goes to (Tailscale writes DERP paths as ``127.3.3.40:<region>``)."""

    host: str
    port: int  # region ID
    key: bytes

    @property
    def region(self) -> int:
        return self.port


@dataclass(slots=True)
class Candidate:
    sources: set[str] = field(default_factory=set)
    last_ping: float = float("-inf")
    last_ping_back: float = float("-inf")  # our last ping answering one of theirs
    expires: float = float("inf")  # only for candidates learnt from pings
    latency: float | None = None  # latest pong round trip


@dataclass(slots=True)
class SentPing:
    to: UDPAddr | DerpAddr
    at: float
    cli: bool = False  # a user's ping: its pong is reported


@dataclass(slots=True)
class PeerPaths:
    node_key: bytes
    disco_key: bytes | None
    home_derp: int = 0
    candidates: dict[UDPAddr, Candidate] = field(default_factory=dict)
    best: UDPAddr | None = None
    best_latency: float = 0.0
    trust_until: float = 0.0
    last_send: float = float("-inf")
    last_full_ping: float = float("-inf")
    heartbeat_at: float = 0.0  # 0: no heartbeat armed
    derp_route: int = 0  # region we last heard this peer on over DERP
    pings: dict[bytes, SentPing] = field(default_factory=dict)

    # --- what the netmap and CallMeMaybe say ---------------------------------------------------

    def set_netmap_endpoints(self, eps: list[UDPAddr]) -> None:
        want = set(eps)
        for addr, c in list(self.candidates.items()):
            if FROM_NETMAP in c.sources and addr not in want:
                c.sources.discard(FROM_NETMAP)
                if not c.sources:
                    self._drop(addr)
        for addr in eps:
            self.candidates.setdefault(addr, Candidate()).sources.add(FROM_NETMAP)

    def call_me_maybe(self, eps: list[UDPAddr]) -> None:
        """A CallMeMaybe replaces the earlier CallMeMaybe-only candidates; pings are due at once."""
        want = {a for a in eps if not _is_link_local6(a[0])}
        for addr, c in list(self.candidates.items()):
            if FROM_CALL_ME_MAYBE in c.sources and addr not in want:
                c.sources.discard(FROM_CALL_ME_MAYBE)
                if not c.sources:
                    self._drop(addr)
        for addr in want:
            c = self.candidates.setdefault(addr, Candidate())
            c.sources.add(FROM_CALL_ME_MAYBE)
        for c in self.candidates.values():
            c.last_ping = float("-inf")  # the 5 s limit is reset

    def learn_from_ping(self, addr: UDPAddr, now: float) -> None:
        c = self.candidates.get(addr)
        if c is None:
            if len(self.candidates) >= MAX_CANDIDATES:
                self.prune(now)
            c = self.candidates[addr] = Candidate()
        if FROM_PING in c.sources or not c.sources:
            c.expires = now + CANDIDATE_LIFETIME
        c.sources.add(FROM_PING)

    def prune(self, now: float) -> None:
        for addr, c in list(self.candidates.items()):
            if c.sources == {FROM_PING} and c.expires <= now:
                self._drop(addr)

    def _drop(self, addr: UDPAddr) -> None:
        self.candidates.pop(addr, None)
        if self.best == addr:
            self.best, self.trust_until = None, 0.0

    # --- sending --------------------------------------------------------------------------------

    def trusted(self, now: float) -> bool:
        return self.best is not None and now < self.trust_until

    def addr_for_send(self, now: float) -> tuple[UDPAddr | None, int]:
        """(UDP address or None, DERP region or 0) for a data packet now (§7)."""
        region = self.home_derp or self.derp_route
        if self.best is not None:
            if now < self.trust_until:
                return self.best, 0
            return self.best, region
        if not region and self.candidates:
            # No DERP to fall back on (a tailnet without a DERP map): try the netmap's first
            # endpoint rather than drop the packet until a pong arrives (Tailscale, which
            # always has DERP, drops it; the WireGuard handshake would then wait 5 s).
            for addr, c in self.candidates.items():
                if FROM_NETMAP in c.sources:
                    return addr, 0
            return next(iter(self.candidates)), 0
        return None, region

    def want_full_ping(self, now: float) -> bool:
        if self.best is None or self.last_full_ping == float("-inf"):
            return True
        if now >= self.trust_until:
            return True
        return (self.best_latency > GOOD_ENOUGH_LATENCY
                and now - self.last_full_ping >= UPGRADE_INTERVAL)

    def due_candidates(self, now: float) -> list[UDPAddr]:
        """Candidates not pinged within the last 5 s (marked pinged now)."""
        out = []
        for addr, c in self.candidates.items():
            if now - c.last_ping >= DISCO_PING_INTERVAL:
                c.last_ping = now
                out.append(addr)
        return out

    # --- pongs ----------------------------------------------------------------------------------

    def pong(self, tx: SentPing, src: UDPAddr | DerpAddr, now: float) -> float:
        """A pong for ``tx`` arrived from ``src``; returns the latency. UDP pongs may make ``src``
        the best address (Tailscale's betterAddr with its hysteresis) and renew trust."""
        latency = max(0.0, now - tx.at)
        if isinstance(src, DerpAddr) or isinstance(tx.to, DerpAddr):
            return latency
        addr = tx.to
        c = self.candidates.get(addr)
        if c is not None:
            c.latency = latency
        if self.best == addr:
            self.best_latency = latency
            self.trust_until = now + TRUST_UDP_ADDR_DURATION
        elif self.best is None or now >= self.trust_until or better_addr(
                addr, latency, self.best, self.best_latency):
            self.best, self.best_latency = addr, latency
            self.trust_until = now + TRUST_UDP_ADDR_DURATION
        return latency

    def ping_timed_out(self, tx: SentPing, now: float) -> None:
        if tx.to == self.best and now >= self.trust_until:
            self.best, self.trust_until = None, 0.0

    def udp_unreachable(self, addr: UDPAddr) -> None:
        """A send to ``addr`` failed with "host unreachable": forget it as the best path."""
        if self.best == addr:
            self.best, self.trust_until = None, 0.0
        c = self.candidates.get(addr)
        if c is not None:
            c.latency = None


_PRIVATE = tuple(ipaddress.ip_network(n) for n in
                 ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


def _points(ip: str) -> int:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return 0
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    private = any(a in n for n in _PRIVATE if n.version == a.version)
    bonus = 50 if a.is_loopback else 30 if a.is_link_local else 20 if private else 0
    if a.version == 6:
        bonus += 10
    return bonus


def better_addr(a: UDPAddr, a_latency: float, b: UDPAddr, b_latency: float) -> bool:
    """Is ``a`` a better path than the current ``b`` (§6, with its hysteresis)?"""
    if a == b:
        return False
    a_points, b_points = _points(a[0]), _points(b[0])
    if a_latency > 0 and b_latency > 0:
        if a_latency < b_latency:
            a_points += 100 - int(a_latency * 100 / b_latency)
        elif b_latency < a_latency:
            b_points += 100 - int(b_latency * 100 / a_latency)
    elif a_latency < b_latency:
        a_points += 100
    elif b_latency < a_latency:
        b_points += 100
    if a_points <= 1 and b_points == 0:
        return False
    return a_points > b_points


def _is_link_local6(ip: str) -> bool:
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return a.version == 6 and a.is_link_local
