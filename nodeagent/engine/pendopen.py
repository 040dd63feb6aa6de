"""Pending-open tracking: notice outgoing TCP connections that never get an answer.

Sans-IO: the engine feeds outbound SYNs, inbound TCP packets and TSMP rejects, passes ``now`` and
asks :meth:`PendingOpens.expire` for flows whose 5-second timer ran out. Each expired flow is
diagnosed in Tailscale's order (a peer-reported problem, no peer, peer unreachable, silence for
exit-node-only routes, plain timeout) and logged once.

Flows live in an insertion-ordered dict: every flow gets the same timeout, so deadlines are
monotonic in insertion order and expiry pops from the front. The table is bounded; when full the
oldest flow is dropped (counted) — a SYN flood cannot grow it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.packet import TSMPReject, addr_str, connreject_reason, tcp_seq
from nodeagent.packet.parsed import PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN, Parsed

log = logging.getLogger("nodeagent.pendopen")

PENDING_TIMEOUT = 5.0
DEFAULT_CAPACITY = 8192

# (ip_version, src_ip, src_port, dst_ip, dst_port) of the outgoing flow; TCP only.
FlowKey = tuple[int, int, int, int, int]


@dataclass(slots=True)
class PendingFlow:
    key: FlowKey
    deadline: float
    syn_seq: int  # ISN of our SYN: a fast-failure RST must acknowledge it to be accepted
    problem: int = 0  # TSMP reason byte of a MaybeBroken reject, 0 = none

    @property
    def src(self) -> str:
        v, sip, sp, _, _ = self.key
        return _endpoint(v, sip, sp)

    @property
    def dst(self) -> str:
        v, _, _, dip, dp = self.key
        return _endpoint(v, dip, dp)


def _endpoint(version: int, ip: int, port: int) -> str:
    a = addr_str(version, ip)
    return f"[{a}]:{port}" if version == 6 else f"{a}:{port}"


@dataclass(slots=True)
class PeerInfo:
    """What the engine knows about the peer owning a destination address."""

    name: str
    has_disco_key: bool = True
    home_derp: int = 0
    in_wireguard: bool = True
    only_default_route: bool = False
    online: bool | None = None
    last_handshake: float = 0.0
    last_rx: float = 0.0
    reachable: bool = True  # engine has some path (direct endpoint or DERP) it believes works


@dataclass(slots=True)
class Diagnosis:
    flow: PendingFlow
    reason: str  # connreject Reason vocabulary
    source: str  # connreject Source vocabulary
    message: str


PeerLookup = Callable[[int, int], PeerInfo | None]  # (ip_version, dst_ip) → peer or None


class PendingOpens:
    def __init__(self, peer_lookup: PeerLookup, *, timeout: float = PENDING_TIMEOUT,
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.peer_lookup = peer_lookup
        self.timeout = timeout
        self.capacity = capacity
        self.flows: dict[FlowKey, PendingFlow] = {}
        self.evicted = 0
        self.timeouts = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self.flows)

    def next_deadline(self) -> float | None:
        for f in self.flows.values():
            return f.deadline
        return None

    # --- feeding ---------------------------------------------------------------------------
    def on_outbound(self, p: Parsed, buf: bytes | memoryview, now: float) -> None:
        """An outbound packet that passed the filter; only SYN-without-ACK starts tracking."""
        if p.proto != PROTO_TCP or (p.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN:
            return
        key = (p.ip_version, p.src_ip, p.src_port, p.dst_ip, p.dst_port)
        if key in self.flows:
            return  # a retransmitted SYN keeps the first timer, as Tailscale does
        if len(self.flows) >= self.capacity:
            self.flows.pop(next(iter(self.flows)))
            self.evicted += 1
        self.flows[key] = PendingFlow(key, now + self.timeout, tcp_seq(buf, p))

    def on_inbound(self, p: Parsed) -> None:
        """A packet from a peer: a reverse-flow SYN or RST means the peer answered."""
        if p.proto != PROTO_TCP or not (p.tcp_flags & (TCP_SYN | TCP_RST)) or not self.flows:
            return
        self.flows.pop((p.ip_version, p.dst_ip, p.dst_port, p.src_ip, p.src_port), None)

    def on_tsmp_reject(self, r: TSMPReject, *, ends_flow: bool = True) -> PendingFlow | None:
        """A TSMP reject from a peer. Terminal and ``ends_flow``: stop tracking and return the
        flow (the caller fails the connection at once). MaybeBroken — or terminal while the
        caller leaves the host's connect() pending (fast failure off) — remembers the reason so
        the timer reports it, and returns None: the open stays pending exactly as long as the
        application's does."""
        key = (r.version, r.src_ip, r.src_port, r.dst_ip, r.dst_port)
        flow = self.flows.get(key)
        if flow is None:
            return None
        if r.maybe_broken or not ends_flow:
            flow.problem = r.reason_byte
            return None
        del self.flows[key]
        self.rejected += 1
        log.info("open-conn-track: flow TCP %s > %s rejected due to %s",
                 flow.src, flow.dst, connreject_reason(r.reason_byte))
        return flow

    # --- timer -----------------------------------------------------------------------------
    def expire(self, now: float) -> list[Diagnosis]:
        """Pop and diagnose every flow whose timer has run out; one log line each."""
        out: list[Diagnosis] = []
        flows = self.flows
        while flows:
            key = next(iter(flows))
            flow = flows[key]
            if flow.deadline > now:
                break
            del flows[key]
            d = self._diagnose(flow)
            self.timeouts += 1
            if d is not None:
                log.info("open-conn-track: timeout opening %s → %s; %s", flow.src, flow.dst,
                         d.message)
                out.append(d)
        return out

    def _diagnose(self, flow: PendingFlow) -> Diagnosis | None:
        if flow.problem:
            reason = connreject_reason(flow.problem)
            return Diagnosis(flow, reason, "tsmp_recv", f"peer reported problem: {reason}")
        v, _, _, dip, _ = flow.key
        peer = self.peer_lookup(v, dip)
        if peer is None:
            return Diagnosis(flow, "no-peer", "pendopen_timeout", "no associated peer node")
        if not peer.has_disco_key:
            return Diagnosis(flow, "peer-unreachable", "pendopen_timeout",
                             f"peer {peer.name} has no disco key (too old to reach)")
        if not peer.in_wireguard:
            if peer.only_default_route:
                return None  # an exit node that may simply not be selected: stay silent
            return Diagnosis(flow, "peer-unreachable", "pendopen_timeout",
                             f"peer {peer.name} is in the netmap but unknown to WireGuard")
        if not peer.reachable:
            if not peer.home_derp:
                msg = f"peer {peer.name} has no endpoint and is not connected to any DERP relay"
            else:
                msg = f"peer {peer.name} is in the netmap but no path to it works"
            return Diagnosis(flow, "peer-unreachable", "pendopen_timeout", msg)
        hs = "never" if not peer.last_handshake else f"{peer.last_handshake:.0f}"
        rx = "never" if not peer.last_rx else f"{peer.last_rx:.0f}"
        return Diagnosis(flow, "timeout", "pendopen_timeout",
                         f"peer {peer.name} online={peer.online} last handshake={hs} "
                         f"last rx={rx}")
