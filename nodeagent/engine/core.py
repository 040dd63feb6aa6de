"""The engine's transport-independent half: routing by allowed IPs, pending-open tracking,
TSMP-reject observations and fast failure.

A transport moves packets to and from peers — WireGuard over UDP in the agent, a plain in-process
relay in data-plane tests — and reports per-peer state. The engine wires itself to the TUN
Wrapper: accepted outbound packets are routed by longest-prefix match over the peers' allowed IPs
and handed to the transport; packets the transport delivers go to the Wrapper's inbound path.

Observations for connection-rejection diagnostics go through one note callback (installed with
``set_conn_reject_note``); when none is installed the note sites cost an attribute load and a
``None`` check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nodeagent.engine.pendopen import PeerInfo, PendingFlow, PendingOpens
from nodeagent.engine.routes import RouteTable
from nodeagent.packet import (
    TSMPReject,
    build_icmp_unreachable,
    build_tcp,
    build_udp,
    connreject_reason,
)
from nodeagent.packet.parsed import PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN, Parsed
from nodeagent.tundev.wrapper import NoteFn, Wrapper

log = logging.getLogger("nodeagent.engine")


@dataclass
class PeerConfig:
    """One peer as the engine needs it (built from a netmap node or given directly)."""

    key: str  # "nodekey:<hex>"
    name: str = ""
    allowed_ips: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    disco_key: str = ""
    home_derp: int = 0
    online: bool | None = None


@dataclass
class PeerState:
    """What a transport reports about one peer."""

    configured: bool = False
    reachable: bool = False  # has a path it believes works (endpoint or relay)
    last_handshake: float = 0.0  # wall-clock seconds, 0 = never
    last_rx: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    cur_addr: str = ""


class Transport(Protocol):
    def send(self, peer_key: str, pkts: list[bytes]) -> None: ...
    def configure(self, peers: list[PeerConfig]) -> None: ...
    def peer_state(self, peer_key: str) -> PeerState: ...


class Engine:
    def __init__(self, wrapper: Wrapper, transport: Transport, *,
                 loop: asyncio.AbstractEventLoop | None = None, fast_failure: bool = True,
                 pendopen_timeout: float = 5.0, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.wrapper = wrapper
        self.transport = transport
        self.loop = loop
        self.clock = clock
        self.fast_failure = fast_failure
        self._note: NoteFn | None = None
        self.peers: dict[str, PeerConfig] = {}
        self.routes: RouteTable[PeerConfig] = RouteTable()
        self.pendopen = PendingOpens(self._peer_info, timeout=pendopen_timeout)
        self._timer: asyncio.TimerHandle | None = None
        self.counters = {"no_route": 0, "fast_failures": 0, "pendopen_reports": 0,
                         "bad_source": 0}
        wrapper.set_outbound_sink(self._route_out)
        wrapper.outbound_tap = self._outbound_tap
        wrapper.inbound_tap = self.pendopen.on_inbound
        wrapper.tsmp_reject_handler = self._on_tsmp_reject

    # --- configuration ---------------------------------------------------------------------
    def configure(self, peers: list[PeerConfig]) -> None:
        """Replace the peer set; the transport keeps sessions of peers that did not change."""
        table: RouteTable[PeerConfig] = RouteTable()
        for p in peers:
            for prefix in p.allowed_ips:
                table.add(prefix, p)
        self.peers = {p.key: p for p in peers}
        self.routes = table
        self.transport.configure(peers)

    def set_conn_reject_note(self, fn: NoteFn | None) -> None:
        self._note = fn

    def set_fast_failure(self, on: bool) -> None:
        self.fast_failure = on

    # --- data path -------------------------------------------------------------------------
    def _route_out(self, pkts: list[bytes]) -> None:
        routes = self.routes
        batches: dict[str, list[bytes]] = {}
        # A burst is mostly one flow: the previous destination's route is reused when the
        # version and the destination bytes are the same.
        last_dst = None
        last_v = 0
        peer = None
        for pkt in pkts:
            if pkt[0] >> 4 == 4:
                dst = pkt[16:20]
                if dst != last_dst or last_v != 4:
                    peer = routes.lookup(4, int.from_bytes(dst, "big"))
                    last_dst, last_v = dst, 4
            else:
                dst = pkt[24:40]
                if dst != last_dst or last_v != 6:
                    peer = routes.lookup(6, int.from_bytes(dst, "big"))
                    last_dst, last_v = dst, 6
            if peer is None:
                self.counters["no_route"] += 1
                continue
            b = batches.get(peer.key)
            if b is None:
                batches[peer.key] = [pkt]
            else:
                b.append(pkt)
        send = self.transport.send
        for key, batch in batches.items():
            send(key, batch)

    def deliver(self, pkts: list[bytes]) -> None:
        """Packets from peers after the transport authenticated them."""
        self.wrapper.from_peer(pkts)

    def deliver_from(self, peer_key: str, pkts: list[bytes]) -> None:
        """Packets a transport decrypted from ``peer_key``: WireGuard's cryptokey routing —
        only sources inside that peer's allowed IPs get through, so a peer cannot speak for
        another's addresses."""
        routes = self.routes
        ok = []
        # A burst is mostly one flow: the verdict for the previous source address is reused
        # (4 bytes for IPv4, 16 for IPv6, so the two never compare equal).
        last_src = b""
        last_ok = False
        for pkt in pkts:
            if not pkt:
                continue
            v = pkt[0] >> 4
            if v == 4 and len(pkt) >= 20:
                src = pkt[12:16]
            elif v == 6 and len(pkt) >= 40:
                src = pkt[8:24]
            else:
                self.counters["bad_source"] += 1
                continue
            if src != last_src:
                peer = routes.lookup(v, int.from_bytes(src, "big"))
                last_src = src
                last_ok = peer is not None and peer.key == peer_key
            if not last_ok:
                self.counters["bad_source"] += 1
                continue
            ok.append(pkt)
        if ok:
            self.wrapper.from_peer(ok)

    def _outbound_tap(self, p: Parsed, pkt: bytes) -> None:
        if p.proto == PROTO_TCP and p.tcp_flags & TCP_SYN and not p.tcp_flags & TCP_ACK:
            self.pendopen.on_outbound(p, pkt, self.clock())
            if self._timer is None:
                self._arm()

    # --- TSMP rejects and pending opens ----------------------------------------------------
    def _on_tsmp_reject(self, r: TSMPReject) -> None:
        note = self._note
        if note is not None:
            note("outgoing", r.proto, r.version, r.src_ip, r.src_port, r.dst_ip, r.dst_port,
                 connreject_reason(r.reason_byte), "tsmp_recv", r.maybe_broken)
        if r.proto == PROTO_TCP:
            flow = self.pendopen.on_tsmp_reject(r, ends_flow=self.fast_failure)
            if flow is not None:
                self.wrapper.write_to_host([_rst_for(flow)])
                self.counters["fast_failures"] += 1
        elif r.proto == PROTO_UDP and not r.maybe_broken and self.fast_failure:
            self.wrapper.write_to_host([_udp_unreachable_for(r)])
            self.counters["fast_failures"] += 1

    def _arm(self) -> None:
        deadline = self.pendopen.next_deadline()
        loop = self.loop
        if deadline is None or loop is None:
            self._timer = None
            return
        delay = max(0.0, deadline - self.clock())
        self._timer = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        for d in self.pendopen.expire(self.clock()):
            self.counters["pendopen_reports"] += 1
            note = self._note
            if note is not None:
                v, sip, sport, dip, dport = d.flow.key
                note("outgoing", PROTO_TCP, v, sip, sport, dip, dport, d.reason, d.source, False)
        self._arm()

    def _peer_info(self, version: int, ip: int) -> PeerInfo | None:
        peer = self.routes.lookup(version, ip)
        if peer is None:
            return None
        st = self.transport.peer_state(peer.key)
        return PeerInfo(
            name=peer.name or peer.key[:16],
            # No disco key and no static endpoint: nothing can find a path to it (a peer with
            # a static endpoint but no disco key is a plain WireGuard peer, reachable directly).
            has_disco_key=bool(peer.disco_key or peer.endpoints),
            home_derp=peer.home_derp,
            in_wireguard=st.configured,
            only_default_route=_only_default_route(peer, version, ip),
            online=peer.online,
            last_handshake=st.last_handshake,
            last_rx=st.last_rx,
            reachable=st.reachable,
        )

    # --- introspection ---------------------------------------------------------------------
    def peer_stats(self, peer_key: str) -> dict[str, Any]:
        if peer_key not in self.peers:
            return {}
        st = self.transport.peer_state(peer_key)
        return {"LastHandshake": st.last_handshake, "RxBytes": st.rx_bytes,
                "TxBytes": st.tx_bytes, "CurAddr": st.cur_addr, "LastWrite": st.last_rx,
                "Active": bool(st.last_rx and time.time() - st.last_rx < 120)}

    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        po = self.pendopen
        extra = getattr(self.transport, "metrics_samples", None)
        return [*(extra() if extra is not None else []),
            ("nodeagent_engine_no_route_total", "Outbound packets with no peer for the address",
             {}, self.counters["no_route"]),
            ("nodeagent_engine_bad_source_total",
             "Decrypted packets whose source is outside the sending peer's allowed IPs", {},
             self.counters["bad_source"]),
            ("nodeagent_fast_failures_total", "RST/ICMP written to the host after a TSMP reject",
             {}, self.counters["fast_failures"]),
            ("nodeagent_pendopen_timeouts_total", "Pending TCP opens that timed out", {},
             po.timeouts),
            ("nodeagent_pendopen_rejected_total", "Pending TCP opens ended by a TSMP reject", {},
             po.rejected),
            ("nodeagent_pendopen_evicted_total", "Pending opens dropped because the table was full",
             {}, po.evicted),
            ("nodeagent_pendopen_flows", "Pending TCP opens being tracked", {}, len(po)),
        ]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _only_default_route(peer: PeerConfig, version: int, ip: int) -> bool:
    """Whether ``ip`` reaches ``peer`` only through a /0 of its allowed IPs (an exit node that
    may simply not be selected): no longer prefix of the peer's covers it. The route table
    matched ``peer`` by longest prefix, so this is the same as "the longest match was a /0"."""
    addr = ipaddress.IPv4Address(ip) if version == 4 else ipaddress.IPv6Address(ip)
    return not any(net.prefixlen and addr in net
                   for net in (ipaddress.ip_network(p, strict=False) for p in peer.allowed_ips))


def _rst_for(flow: PendingFlow) -> bytes:
    """A RST|ACK from the peer that acknowledges our SYN, so connect() fails at once."""
    v, sip, sp, dip, dp = flow.key
    return build_tcp(v, dip, sip, dp, sp, 0, (flow.syn_seq + 1) & 0xFFFFFFFF,
                     TCP_RST | TCP_ACK, window=0)


def _udp_unreachable_for(r: TSMPReject) -> bytes:
    """ICMP administratively-prohibited quoting the rejected datagram's headers."""
    quoted = build_udp(r.version, r.src_ip, r.dst_ip, r.src_port, r.dst_port, b"")
    return build_icmp_unreachable(quoted, r.version)
