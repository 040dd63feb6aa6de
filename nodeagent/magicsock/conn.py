"""magicsock's asyncio adapter: joins the path core to the WireGuard UDP socket and to DERP.

:class:`MagicConn` is the :class:`~nodeagent.engine.wgtransport.PathRouter` of the WireGuard
transport: WireGuard packets for a peer with a disco key come here and leave over its best
direct UDP address, its home DERP region, or both (``MagicCore.plan_send``); disco packets
arriving on the UDP socket or over DERP go to the core; WireGuard packets arriving over DERP go
back to the transport's receive path, so the WireGuard session does not care which path carried
them and switching paths never resets it. STUN replies on the WireGuard socket go to whoever
registered for them (the endpoint updater's netcheck). A timer runs the core's heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from nodeagent.disco.codec import looks_like_disco
from nodeagent.keys import DISCO_PREFIX, NODE_PREFIX, parse_public
from nodeagent.magicsock.core import (
    DERP_MAGIC_IP,
    MagicCore,
    PeerInfo,
    PongEvent,
    SendDERP,
    SendUDP,
)
from nodeagent.magicsock.endpoint import DerpAddr, UDPAddr
from nodeagent.tailcfg import check_endpoint

if TYPE_CHECKING:
    from nodeagent.engine.core import PeerConfig
    from nodeagent.engine.wgtransport import WireGuardTransport

log = logging.getLogger("nodeagent.magicsock")

TICK_INTERVAL = 0.5
DERP_RX_BATCH = 128  # WireGuard packets from DERP handed to the transport together
STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"

StunHandler = Callable[[bytes, UDPAddr], object]


class DerpSender(Protocol):
    """What MagicConn needs of the DERP connections (``nodeagent.derp.manager.DerpManager``)."""

    def send(self, region: int, dst_key: bytes, pkt: bytes) -> bool: ...

    def send_many(self, region: int, dst_key: bytes, pkts: list[bytes]) -> bool: ...


class MagicConn:
    def __init__(self, transport: WireGuardTransport, core: MagicCore,
                 derp: DerpSender | None = None) -> None:
        self.transport = transport
        self.core = core
        self.derp = derp
        self.stun_handler: StunHandler | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ping_waiters: dict[bytes, asyncio.Future[PongEvent]] = {}
        self._derp_rx: list[tuple[bytes, DerpAddr]] = []
        self._derp_addrs: dict[tuple[int, bytes], DerpAddr] = {}  # one per sender, not per packet
        self._last_path: dict[bytes, tuple[bool, bool]] = {}  # key → (direct, derp) last used
        self.counters: dict[str, int] = {
            "tx_direct_packets": 0, "tx_direct_bytes": 0, "tx_derp_packets": 0,
            "tx_derp_bytes": 0, "rx_derp_packets": 0, "rx_derp_bytes": 0, "no_path": 0,
            "path_switches": 0, "udp_other_dropped": 0,
        }
        transport.set_router(self)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer = loop.call_later(TICK_INTERVAL, self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._ping_waiters.values():
            if not fut.done():
                fut.cancel()
        self._ping_waiters.clear()

    def set_derp(self, derp: DerpSender | None) -> None:
        self.derp = derp

    # --- PathRouter ------------------------------------------------------------------------------

    def wants(self, peer: PeerConfig) -> bool:
        return bool(peer.disco_key)

    def configure(self, peers: list[PeerConfig]) -> None:
        infos = []
        for p in peers:
            if not self.wants(p):
                continue  # a plain WireGuard peer: the transport sends to its endpoint
            try:
                node = parse_public(p.key, NODE_PREFIX)
                disco = parse_public(p.disco_key, DISCO_PREFIX) if p.disco_key else None
            except ValueError as e:
                log.warning("peer %s: %s", p.name or p.key, e)
                continue
            eps: list[UDPAddr] = []
            for ep in p.endpoints:
                try:
                    eps.append(check_endpoint(ep))
                except ValueError:
                    continue  # already reported by the transport
            infos.append(PeerInfo(node, disco, p.home_derp, tuple(eps)))
        self.core.set_peers(infos)

    def send_wg(self, node_key: bytes, segs: list[bytes]) -> None:
        udp, region, actions = self.core.plan_send(node_key)
        if actions:
            self._perform(actions)
        c = self.counters
        if udp is not None:
            self.transport.send_udp(udp[0], udp[1], segs)
            c["tx_direct_packets"] += len(segs)
            c["tx_direct_bytes"] += sum(map(len, segs))
        if region and self.derp is not None:
            self.derp.send_many(region, node_key, segs)
            c["tx_derp_packets"] += len(segs)
            c["tx_derp_bytes"] += sum(map(len, segs))
        elif udp is None:
            c["no_path"] += len(segs)
        path = (udp is not None, bool(region) and udp is None)
        last = self._last_path.get(node_key)
        if last != path:
            if last is not None and last[0] != path[0]:
                c["path_switches"] += 1
                log.info("peer %s: now %s", node_key.hex()[:16],
                         f"direct {udp[0]}:{udp[1]}" if udp else f"via DERP region {region}")
            self._last_path[node_key] = path

    def send_derp(self, dst: DerpAddr, segs: list[bytes]) -> None:
        if self.derp is None:
            self.counters["no_path"] += len(segs)
            return
        self.derp.send_many(dst.region, dst.key, segs)
        self.counters["tx_derp_packets"] += len(segs)
        self.counters["tx_derp_bytes"] += sum(map(len, segs))

    def on_udp_other(self, data: bytes, src: UDPAddr) -> None:
        if looks_like_disco(data):
            actions = self.core.handle_disco(data, src)
            if actions:
                self._perform(actions)
        elif len(data) >= 20 and data[4:8] == STUN_MAGIC_COOKIE and data[0] == 0x01:
            if self.stun_handler is not None:
                self.stun_handler(data, src)
        else:
            self.counters["udp_other_dropped"] += 1

    def peer_path(self, node_key: bytes) -> tuple[bool, str]:
        st = self.core.status(node_key)
        if st is None:
            return False, ""
        return bool(st.best or st.derp_region), st.cur_addr

    # --- DERP side (DerpManager callbacks) ------------------------------------------------------

    def on_derp_packet(self, region: int, src_key: bytes, data: bytes) -> None:
        src = self._derp_addrs.get((region, src_key))
        if src is None:
            if len(self._derp_addrs) > 4096:
                self._derp_addrs.clear()
            src = self._derp_addrs[(region, src_key)] = DerpAddr(DERP_MAGIC_IP, region, src_key)
        if looks_like_disco(data):
            actions = self.core.handle_disco(data, src)
            if actions:
                self._perform(actions)
            return
        if not self.core.known(src_key):
            self.counters["udp_other_dropped"] += 1
            return
        self.counters["rx_derp_packets"] += 1
        self.counters["rx_derp_bytes"] += len(data)
        self.core.note_derp_recv(region, src_key)
        # Batch what one read of the DERP connection brought: the transport decrypts them
        # together and the TUN gets one (coalesced) write, as for a UDP batch.
        pending = self._derp_rx
        pending.append((data, src))
        if len(pending) == 1 and self._loop is not None:
            self._loop.call_soon(self._flush_derp_rx)
        elif len(pending) >= DERP_RX_BATCH:
            self._flush_derp_rx()

    def _flush_derp_rx(self) -> None:
        pending, self._derp_rx = self._derp_rx, []
        if pending:
            self.transport.receive_external_batch(pending)

    def on_peer_gone(self, region: int, key: bytes) -> None:
        self.core.forget_derp_route(key=key)

    def on_region_down(self, region: int) -> None:
        self.core.forget_derp_route(region=region)

    # --- actions, timers, pings ------------------------------------------------------------------

    def _perform(self, actions: list[Any]) -> None:
        for act in actions:
            if type(act) is SendUDP:
                self.transport.send_udp(act.addr[0], act.addr[1], [act.data])
            elif type(act) is SendDERP:
                if self.derp is not None:
                    self.derp.send(act.region, act.key, act.data)
            elif type(act) is PongEvent:
                fut = self._ping_waiters.pop(act.tx_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(act)

    def _tick(self) -> None:
        self._timer = None
        try:
            actions = self.core.tick()
            if actions:
                self._perform(actions)
        finally:
            if self._loop is not None:
                self._timer = self._loop.call_later(TICK_INTERVAL, self._tick)

    async def ping(self, node_key: bytes, timeout: float = 5.0) -> PongEvent | None:
        """A disco ping as ``tailscale ping`` sends it; the first pong, or None on timeout."""
        loop = asyncio.get_running_loop()
        txs, actions = self.core.ping(node_key)
        if not txs:
            return None
        fut: asyncio.Future[PongEvent] = loop.create_future()
        for tx in txs:
            self._ping_waiters[tx] = fut
        self._perform(actions)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            for tx in txs:
                self._ping_waiters.pop(tx, None)

    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        c, d = self.counters, self.core.counters
        return [
            ("nodeagent_magicsock_tx_packets_total", "WireGuard packets sent, by path",
             {"path": "direct"}, c["tx_direct_packets"]),
            ("nodeagent_magicsock_tx_packets_total", "WireGuard packets sent, by path",
             {"path": "derp"}, c["tx_derp_packets"]),
            ("nodeagent_magicsock_tx_bytes_total", "WireGuard bytes sent, by path",
             {"path": "direct"}, c["tx_direct_bytes"]),
            ("nodeagent_magicsock_tx_bytes_total", "WireGuard bytes sent, by path",
             {"path": "derp"}, c["tx_derp_bytes"]),
            ("nodeagent_magicsock_rx_derp_packets_total", "WireGuard packets received via DERP",
             {}, c["rx_derp_packets"]),
            ("nodeagent_magicsock_no_path_total", "packets dropped: no direct or DERP path",
             {}, c["no_path"]),
            ("nodeagent_magicsock_path_switches_total",
             "switches between the direct path and DERP", {}, c["path_switches"]),
            ("nodeagent_magicsock_disco_total", "disco messages, by kind",
             {"kind": "ping_sent"}, d["pings_sent"]),
            ("nodeagent_magicsock_disco_total", "disco messages, by kind",
             {"kind": "pong_sent"}, d["pongs_sent"]),
            ("nodeagent_magicsock_disco_total", "disco messages, by kind",
             {"kind": "pong_received"}, d["pongs_received"]),
            ("nodeagent_magicsock_disco_total", "disco messages, by kind",
             {"kind": "call_me_maybe_sent"}, d["call_me_maybe_sent"]),
            ("nodeagent_magicsock_disco_total", "disco messages, by kind",
             {"kind": "call_me_maybe_received"}, d["call_me_maybe_received"]),
            ("nodeagent_magicsock_disco_total", "disco messages, by kind",
             {"kind": "dropped"}, d["disco_dropped"]),
        ]
