"""The agent's path layer: magicsock, its DERP connections, and its own endpoint updates.

:class:`PathLayer` is built with the data plane. It owns the :class:`MagicConn` attached to the
WireGuard transport, creates the :class:`~nodeagent.derp.manager.DerpManager` when a DERP map
arrives, and runs endpoint updates (Tailscale's ``updateEndpoints``): a netcheck whose STUN
requests leave from the WireGuard socket (so the mapped addresses are the ones peers must use),
the home region chosen with the netcheck history's hysteresis, and the advertised endpoints —
STUN-mapped addresses first, then local interface addresses with the WireGuard port. Updates run
at start, when the DERP map changes, when a DERP region drops, and every 20-26 s; a change of
endpoints or home region is reported through ``on_endpoints`` (the control link).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from nodeagent.derp.manager import DerpManager
from nodeagent.engine.wgtransport import WireGuardTransport
from nodeagent.keys import KeyPair
from nodeagent.magicsock.conn import MagicConn
from nodeagent.magicsock.core import MagicCore, PongEvent
from nodeagent.magicsock.localaddrs import local_endpoints
from nodeagent.netcheck.client import NetcheckClient, StunReceiver
from nodeagent.netcheck.report import Report, global_addrs
from nodeagent.tailcfg import MAX_ENDPOINTS, DERPMap, check_endpoint

log = logging.getLogger("nodeagent.magicsock")

RESTUN_MIN, RESTUN_MAX = 20.0, 26.0
FRAME_NOTE_INTERVAL = 5.0

EndpointsCallback = Callable[[list[str], int], None]


class _WireGuardStun:
    """netcheck's STUN transport over the WireGuard socket (replies come back via MagicConn)."""

    def __init__(self, conn: MagicConn) -> None:
        self._conn = conn

    def send(self, addr: tuple[str, int], data: bytes) -> None:
        if self._conn.transport.sock is None:
            raise OSError("the WireGuard socket is closed")
        self._conn.transport.send_udp(addr[0], addr[1], [data])

    def attach(self, receiver: StunReceiver | None) -> None:
        self._conn.stun_handler = receiver


class PathLayer:
    def __init__(self, transport: WireGuardTransport, node_key: KeyPair, disco_key: KeyPair,
                 *, on_endpoints: EndpointsCallback | None = None) -> None:
        self.transport = transport
        self.node_key = node_key
        self.core = MagicCore(disco_key.private, node_key.public)
        self.conn = MagicConn(transport, self.core)
        self.derp: DerpManager | None = None
        self.derp_map: DERPMap | None = None
        self.on_endpoints = on_endpoints
        self.netcheck = NetcheckClient(transport=_WireGuardStun(self.conn))
        self.last_report: Report | None = None
        self.home = 0
        self.endpoints: list[str] = []
        self._reported: tuple[list[str], int] | None = None
        self._wake = asyncio.Event()
        self._frame_noted: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.conn.start(loop)
        self._task = loop.create_task(self._updates(), name="magicsock-endpoints")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self.conn.close()
        if self.derp is not None:
            await self.derp.close()
            self.derp = None

    def set_on_endpoints(self, cb: EndpointsCallback | None) -> None:
        self.on_endpoints = cb
        self._reported = None
        if cb is not None and (self.endpoints or self.home):
            self._report()

    # --- inputs --------------------------------------------------------------------------------

    def apply_derp_map(self, dm: DERPMap | None) -> None:
        if dm is not None and not dm.Regions:
            dm = None
        if dm == self.derp_map:
            return
        self.derp_map = dm
        if dm is None:
            if self.derp is not None:
                self.derp.set_derp_map(None)
            return
        if self.derp is None:
            self.derp = DerpManager(self.node_key.private, self._on_derp_packet,
                                    on_peer_gone=self.conn.on_peer_gone,
                                    on_region_down=self._on_region_down,
                                    on_health=self._on_health)
            self.conn.set_derp(self.derp)
        self.derp.set_derp_map(dm)
        if self.home and self.home in dm.Regions:
            self.derp.set_home(self.home)
        self.trigger("derp-map-update")

    def trigger(self, reason: str) -> None:
        log.debug("endpoint update requested: %s", reason)
        self._wake.set()

    def _on_derp_packet(self, region: int, src: bytes, data: bytes) -> None:
        # "A frame came from this region" feeds the home-region hysteresis; Tailscale records
        # it at most every 5 s per region, and so do we (it is per packet otherwise).
        now = time.monotonic()
        if now - self._frame_noted.get(region, -FRAME_NOTE_INTERVAL) >= FRAME_NOTE_INTERVAL:
            self._frame_noted[region] = now
            self.netcheck.history.note_derp_frame(region, now)
        self.conn.on_derp_packet(region, src, data)

    def _on_region_down(self, region: int) -> None:
        self.conn.on_region_down(region)
        self.trigger("derp-recv-error")

    def _on_health(self, region: int, text: str) -> None:
        if text:
            log.warning("DERP region %d: %s", region, text)

    # --- endpoint updates ----------------------------------------------------------------------

    async def _updates(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), random.uniform(RESTUN_MIN, RESTUN_MAX))
            self._wake.clear()
            try:
                await self.update_endpoints()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # an update must never stop the loop
                log.warning("endpoint update failed: %s: %s", type(e).__name__, e)

    async def update_endpoints(self) -> Report | None:
        """One netcheck, home choice and endpoint list; reports a change."""
        dm = self.derp_map
        report: Report | None = None
        stun_eps: list[str] = []
        if dm is not None:
            report = await self.netcheck.get_report(dm)
            self.last_report = report
            home = report.PreferredDERP or self.home
            if not home:
                home = self._fallback_home(dm)
            if home != self.home:
                log.info("home DERP region: %d%s", home,
                         f" (was {self.home})" if self.home else "")
                self.home = home
            if self.derp is not None and home:
                self.derp.set_home(home)
            stun_eps = list(global_addrs(report))
            if report.MappingVariesByDestIP and report.GlobalV4 and self.transport.port:
                ip = report.GlobalV4.rsplit(":", 1)[0]
                stun_eps.append(f"{ip}:{self.transport.port}")
        local = await asyncio.get_running_loop().run_in_executor(
            None, local_endpoints, self.transport.port)
        eps: list[str] = []
        for ep in [*stun_eps, *local]:
            if ep not in eps:
                eps.append(ep)
        eps = eps[:MAX_ENDPOINTS]
        self.endpoints = eps
        parsed = []
        for ep in eps:
            with contextlib.suppress(ValueError):
                parsed.append(check_endpoint(ep))
        self.core.set_local_endpoints(parsed)
        self._report()
        return report

    def _fallback_home(self, dm: DERPMap) -> int:
        """No latency anywhere (UDP and HTTPS blocked?): a region stable for this node."""
        ids = sorted(r for r, reg in dm.Regions.items()
                     if reg.Nodes and not getattr(reg, "NoMeasureNoHome", False))
        if not ids:
            return 0
        return ids[int.from_bytes(self.node_key.public[:4], "big") % len(ids)]

    def _report(self) -> None:
        now = (list(self.endpoints), self.home)
        if now == self._reported or self.on_endpoints is None:
            return
        self._reported = now
        self.on_endpoints(*now)

    # --- for the LocalAPI ----------------------------------------------------------------------

    async def ping(self, node_key: bytes, timeout: float = 5.0) -> PongEvent | None:
        return await self.conn.ping(node_key, timeout)

    def peer_status(self, node_key: bytes) -> dict[str, Any] | None:
        """magicsock's part of a peer's status (Tailscale's ``populatePeerStatus``):
        ``CurAddr``, ``Active`` (we sent data or a user's ping within 45 s) and ``LastWrite``
        (Unix time of that last send, 0 for never); None for a peer magicsock does not handle
        (no disco key, or not in the netmap)."""
        st = self.core.status(node_key)
        if st is None:
            return None
        last = 0.0
        if st.last_write != float("-inf"):  # the core's clock is time.monotonic
            last = time.time() - max(0.0, time.monotonic() - st.last_write)
        return {"CurAddr": st.cur_addr, "Active": st.active, "LastWrite": last}

    def metrics_samples(self) -> list[Any]:
        out = list(self.conn.metrics_samples())
        if self.derp is not None:
            out += self.derp.metrics_samples()
        return out
