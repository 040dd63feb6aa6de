"""Path discovery for every peer: disco Ping/Pong/CallMeMaybe, best path, DERP fallback.

Sans-IO (no sockets, no asyncio, no logging per packet): the adapter (``magicsock.conn``) asks
:meth:`MagicCore.plan_send` where a peer's WireGuard packets go, feeds received disco packets to
:meth:`MagicCore.handle_disco`, calls :meth:`MagicCore.tick` a few times a second, and performs
the returned actions — :class:`SendUDP` and :class:`SendDERP` — and reports (:class:`PongEvent`).
The rules are Tailscale magicsock's (``reference/magicsock.md`` §5-§7); per-peer state lives in
:class:`~nodeagent.magicsock.endpoint.PeerPaths`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from nacl.public import PrivateKey

from nodeagent.disco import codec as disco
from nodeagent.magicsock.endpoint import (
    HEARTBEAT_INTERVAL,
    PING_TIMEOUT,
    SESSION_ACTIVE_TIMEOUT,
    DerpAddr,
    PeerPaths,
    SentPing,
    UDPAddr,
)

DERP_MAGIC_IP = "127.3.3.40"
PING_BACK_INTERVAL = 1.0  # at most one answering ping per candidate per second
COUNTERS = ("pings_sent", "pongs_sent", "pongs_received", "call_me_maybe_sent",
            "call_me_maybe_received", "disco_dropped", "ping_timeouts")


class SendUDP(NamedTuple):
    addr: UDPAddr
    data: bytes


class SendDERP(NamedTuple):
    region: int
    key: bytes  # the destination's node key (raw)
    data: bytes


class PongEvent(NamedTuple):
    """A pong to a user's ping (``nodeagent ping``): which path answered and how fast."""

    node_key: bytes
    tx_id: bytes
    latency: float
    endpoint: str  # "ip:port" of a direct pong, "" via DERP
    derp_region: int  # region of a DERP pong, 0 for direct


Action = SendUDP | SendDERP | PongEvent


@dataclass(frozen=True, slots=True)
class PeerInfo:
    node_key: bytes
    disco_key: bytes | None
    home_derp: int = 0
    endpoints: tuple[UDPAddr, ...] = ()


@dataclass(slots=True)
class PathStatus:
    cur_addr: str  # trusted direct path and we have sent: "ip:port", else ""
    active: bool
    last_write: float  # monotonic time of the last send; -inf when never
    best: str  # best direct address known, trusted or not
    latency: float
    derp_region: int  # where DERP copies go (home, else where we last heard it)


@dataclass(slots=True)
class _Peer:
    paths: PeerPaths
    box: disco.DiscoBox | None = None
    seen_tx: dict[tuple[bytes, object], float] = field(default_factory=dict)


def render_addr(addr: UDPAddr) -> str:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


class MagicCore:
    def __init__(self, disco_private: bytes, node_public: bytes, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.disco_private = bytes(disco_private)
        self.disco_public = bytes(PrivateKey(self.disco_private).public_key)
        self.node_public = bytes(node_public)
        self._clock = clock
        self._rng = rng
        self._peers: dict[bytes, _Peer] = {}  # node key → peer
        self._by_disco: dict[bytes, bytes] = {}  # disco key → node key
        self._addr_owner: dict[UDPAddr, bytes] = {}  # source address → node key
        self.local_endpoints: tuple[UDPAddr, ...] = ()
        self.counters = dict.fromkeys(COUNTERS, 0)

    # --- configuration --------------------------------------------------------------------

    def set_peers(self, peers: Iterable[PeerInfo]) -> None:
        """The netmap's peers. Peers without a disco key get no discovery (DERP only)."""
        keep: dict[bytes, _Peer] = {}
        for info in peers:
            p = self._peers.get(info.node_key)
            if p is None or p.paths.disco_key != info.disco_key:
                box = (disco.DiscoBox(self.disco_private, info.disco_key)
                       if info.disco_key else None)
                p = _Peer(PeerPaths(info.node_key, info.disco_key), box)
            p.paths.home_derp = info.home_derp
            p.paths.set_netmap_endpoints(list(info.endpoints))
            keep[info.node_key] = p
        self._peers = keep
        self._by_disco = {p.paths.disco_key: k for k, p in keep.items() if p.paths.disco_key}
        self._addr_owner = {a: k for a, k in self._addr_owner.items() if k in keep}

    def set_local_endpoints(self, eps: Iterable[UDPAddr]) -> None:
        """Our advertised endpoints: the body of the CallMeMaybe we send."""
        self.local_endpoints = tuple(eps)

    def known(self, node_key: bytes) -> bool:
        return node_key in self._peers

    def owner_of(self, addr: UDPAddr) -> bytes | None:
        return self._addr_owner.get(addr)

    # --- sending data ---------------------------------------------------------------------

    def plan_send(self, node_key: bytes) -> tuple[UDPAddr | None, int, list[Action]]:
        """Where WireGuard packets for ``node_key`` go now: (UDP address or None, DERP region or
        0), plus the discovery the send triggers (pings to candidates, CallMeMaybe via DERP)."""
        p = self._peers.get(node_key)
        if p is None:
            return None, 0, []
        now = self._clock()
        paths = p.paths
        paths.last_send = now
        if not paths.heartbeat_at:
            paths.heartbeat_at = now + HEARTBEAT_INTERVAL
        udp, region = paths.addr_for_send(now)
        actions: list[Action] = []
        if not paths.trusted(now):
            self._full_ping(p, now, actions)
        return udp, region, actions

    def note_derp_recv(self, region: int, key: bytes) -> None:
        """A packet from ``key`` arrived via DERP region ``region``: remember the route."""
        p = self._peers.get(key)
        if p is not None:
            p.paths.derp_route = region

    def forget_derp_route(self, key: bytes | None = None, region: int = 0) -> None:
        """PeerGone for ``key``, or the connection to ``region`` broke."""
        for k, p in self._peers.items():
            if (key is not None and k == key) or (region and p.paths.derp_route == region):
                p.paths.derp_route = 0

    def udp_unreachable(self, addr: UDPAddr) -> None:
        owner = self._addr_owner.get(addr)
        if owner is not None and owner in self._peers:
            self._peers[owner].paths.udp_unreachable(addr)

    # --- discovery ------------------------------------------------------------------------

    def _send_ping(self, p: _Peer, to: UDPAddr | DerpAddr, now: float, actions: list[Action],
                   cli: bool = False) -> bytes | None:
        if p.box is None:
            return None
        tx = self._rng(12)
        p.paths.pings[tx] = SentPing(to, now, cli)
        pkt = p.box.seal(disco.Ping(tx, self.node_public))
        if isinstance(to, DerpAddr):
            actions.append(SendDERP(to.region, p.paths.node_key, pkt))
        else:
            actions.append(SendUDP(to, pkt))
        self.counters["pings_sent"] += 1
        return tx

    def _full_ping(self, p: _Peer, now: float, actions: list[Action]) -> None:
        paths = p.paths
        if p.box is None:
            return
        due = paths.due_candidates(now)
        if not due:
            return
        paths.last_full_ping = now
        for addr in due:
            self._send_ping(p, addr, now, actions)
        if paths.home_derp and self.local_endpoints:
            cmm = p.box.seal(disco.CallMeMaybe(self.local_endpoints))
            actions.append(SendDERP(paths.home_derp, paths.node_key, cmm))
            self.counters["call_me_maybe_sent"] += 1

    def ping(self, node_key: bytes) -> tuple[list[bytes], list[Action]]:
        """A user's ping: to the trusted best address only, else via home DERP and to every
        candidate. Returns the transaction IDs (their pongs come back as PongEvents)."""
        p = self._peers.get(node_key)
        actions: list[Action] = []
        if p is None or p.box is None:
            return [], actions
        now = self._clock()
        paths = p.paths
        paths.last_send = now
        if not paths.heartbeat_at:
            paths.heartbeat_at = now + HEARTBEAT_INTERVAL
        txs = []
        if paths.trusted(now) and paths.best is not None:
            targets: list[UDPAddr | DerpAddr] = [paths.best]
        else:
            targets = list(paths.candidates)
            region = paths.home_derp or paths.derp_route
            if region:
                targets.insert(0, DerpAddr(DERP_MAGIC_IP, region, node_key))
        for to in targets:
            tx = self._send_ping(p, to, now, actions, cli=True)
            if tx is not None:
                txs.append(tx)
        return txs, actions

    def handle_disco(self, packet: bytes, src: UDPAddr | DerpAddr) -> list[Action]:
        """A disco packet from UDP ``src`` or from DERP (``DerpAddr`` carrying the sender's
        node key). Unknown senders, boxes that do not open and bad bodies are dropped silently."""
        actions: list[Action] = []
        try:
            sender = disco.sender_key(packet)
        except disco.DiscoError:
            self.counters["disco_dropped"] += 1
            return actions
        node_key = self._by_disco.get(sender)
        p = self._peers.get(node_key) if node_key is not None else None
        if p is None or p.box is None:
            self.counters["disco_dropped"] += 1
            return actions
        try:
            msg = p.box.open(packet)
        except disco.DiscoError:
            self.counters["disco_dropped"] += 1
            return actions
        now = self._clock()
        if isinstance(msg, disco.Ping):
            self._on_ping(p, msg, src, now, actions)
        elif isinstance(msg, disco.Pong):
            self._on_pong(p, msg, src, now, actions)
        elif isinstance(msg, disco.CallMeMaybe):
            # Accepted only via DERP, from the node key whose netmap disco key sent it.
            if isinstance(src, DerpAddr) and src.key == p.paths.node_key:
                self.counters["call_me_maybe_received"] += 1
                p.paths.call_me_maybe(list(msg.endpoints))
                for addr in p.paths.due_candidates(now):
                    self._send_ping(p, addr, now, actions)
            else:
                self.counters["disco_dropped"] += 1
        return actions

    def _on_ping(self, p: _Peer, msg: disco.Ping, src: UDPAddr | DerpAddr, now: float,
                 actions: list[Action]) -> None:
        assert p.box is not None
        seen_key = (msg.tx_id, src)
        if seen_key in p.seen_tx:
            return
        if len(p.seen_tx) > 256:
            p.seen_tx = {k: t for k, t in p.seen_tx.items() if now - t < PING_TIMEOUT}
        p.seen_tx[seen_key] = now
        if isinstance(src, DerpAddr):
            if src.key != p.paths.node_key:
                self.counters["disco_dropped"] += 1
                return
            pong = p.box.seal(disco.Pong(msg.tx_id, (DERP_MAGIC_IP, src.region)))
            actions.append(SendDERP(src.region, p.paths.node_key, pong))
        else:
            addr = (src[0], src[1])
            p.paths.learn_from_ping(addr, now)
            self._addr_owner[addr] = p.paths.node_key
            pong = p.box.seal(disco.Pong(msg.tx_id, _unmapped(addr)))
            actions.append(SendUDP(addr, pong))
            # Their ping got through, so ours will too (the NAT has a mapping now): ping back
            # at once instead of waiting for the next 5 s discovery round. (A departure from
            # Tailscale, which waits; it makes the direct path confirmed one round trip later.)
            # Rate-limited on its own clock: our discovery ping to this address a moment ago
            # (typically lost, as it reached their router before their mapping existed) must
            # not hold the ping back.
            c = p.paths.candidates.get(addr)
            if (c is not None and not p.paths.trusted(now)
                    and now - c.last_ping_back >= PING_BACK_INTERVAL):
                c.last_ping = c.last_ping_back = now
                self._send_ping(p, addr, now, actions)
        self.counters["pongs_sent"] += 1

    def _on_pong(self, p: _Peer, msg: disco.Pong, src: UDPAddr | DerpAddr, now: float,
                 actions: list[Action]) -> None:
        sent = p.paths.pings.pop(msg.tx_id, None)
        if sent is None:
            return
        self.counters["pongs_received"] += 1
        if not isinstance(src, DerpAddr):
            self._addr_owner[(src[0], src[1])] = p.paths.node_key
        latency = p.paths.pong(sent, src if isinstance(src, DerpAddr) else (src[0], src[1]),
                               now)
        if sent.cli:
            if isinstance(sent.to, DerpAddr):
                actions.append(PongEvent(p.paths.node_key, msg.tx_id, latency, "",
                                         sent.to.region))
            else:
                actions.append(PongEvent(p.paths.node_key, msg.tx_id, latency,
                                         render_addr(sent.to), 0))

    # --- timers ---------------------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Expire pings, run heartbeats (3 s while active) and the periodic full pings."""
        now = self._clock()
        actions: list[Action] = []
        for p in self._peers.values():
            paths = p.paths
            for tx, sent in list(paths.pings.items()):
                if now - sent.at >= PING_TIMEOUT:
                    del paths.pings[tx]
                    self.counters["ping_timeouts"] += 1
                    paths.ping_timed_out(sent, now)
            if not paths.heartbeat_at or now < paths.heartbeat_at:
                continue
            if now - paths.last_send >= SESSION_ACTIVE_TIMEOUT:
                paths.heartbeat_at = 0.0  # idle: stop until the next send
                paths.prune(now)
                continue
            paths.heartbeat_at = now + HEARTBEAT_INTERVAL
            if paths.best is not None:
                self._send_ping(p, paths.best, now, actions)
            if paths.want_full_ping(now):
                self._full_ping(p, now, actions)
        return actions

    # --- introspection --------------------------------------------------------------------

    def status(self, node_key: bytes) -> PathStatus | None:
        p = self._peers.get(node_key)
        if p is None:
            return None
        now = self._clock()
        paths = p.paths
        sent = paths.last_send != float("-inf")
        cur = render_addr(paths.best) if paths.best and paths.trusted(now) and sent else ""
        return PathStatus(cur, sent and now - paths.last_send < SESSION_ACTIVE_TIMEOUT,
                          paths.last_send, render_addr(paths.best) if paths.best else "",
                          paths.best_latency, paths.home_derp or paths.derp_route)


def _unmapped(addr: UDPAddr) -> UDPAddr:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, addr[1]
