"""The agent's DERP connections: :class:`DerpManager`, one connection per region of the DERP map.

Owns the set of regions and what they share: which regions are wanted (the home region's
connection dialled at once and kept; another region's dialled lazily when a packet is sent
there), the send paths (a connected region that keeps up is written at once, else the packets
wait in the region's queue of 32, the oldest dropped when full), NotePreferred on a home change,
the idle close of non-home regions, DERP map changes, pings, status, counters and metrics.
One region's connection life (dial, serve, read, back off) is :mod:`nodeagent.derp.region`;
reaching a node (addresses, TLS, login) and the one-line error text are
:mod:`nodeagent.derp.dial`. This module re-exports the names of both that callers import from it.

A non-home region not written for 60 s is closed (checked every 15 s while non-home regions
exist), with its queue, whether it is connected or still redialling. A DERP map change closes
the regions whose definition changed or vanished; the home region is redialled with its new
definition, or forgotten (home 0) if it is gone.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from nodeagent.derp import frames as F
from nodeagent.derp.client import DerpClient
from nodeagent.derp.dial import (
    CERT_PIN_PREFIX,
    DEFAULT_DERP_PORT,
    PLAIN_HTTP_ENV,
    DerpDialError,
    derp_nodes,
    describe_error,
    dial_node,
    dial_region,
    node_addresses,
    node_label,
    node_port,
    open_node_stream,
    plain_http_from_env,
    tls_context,
    tls_server_name,
)
from nodeagent.derp.region import (
    COUNTERS,
    MAX_BACKOFF,
    RegionConn,
    RegionStatus,
    backoff_delay,
)
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

log = logging.getLogger("nodeagent.derp")

__all__ = [
    "CERT_PIN_PREFIX",
    "DEFAULT_DERP_PORT",
    "MAX_BACKOFF",
    "PLAIN_HTTP_ENV",
    "DerpDialError",
    "DerpManager",
    "RegionStatus",
    "backoff_delay",
    "derp_nodes",
    "describe_error",
    "dial_node",
    "dial_region",
    "node_addresses",
    "node_label",
    "node_port",
    "open_node_stream",
    "plain_http_from_env",
    "tls_context",
    "tls_server_name",
]

QUEUE_LEN = 32  # packets waiting per region; the oldest is dropped when full
# While a region is connected and its socket keeps up, packets are written at once (a whole
# WireGuard burst in one write); past this many unsent bytes they queue behind the writer task,
# which waits for the socket (and notices a stalled server).
DIRECT_WRITE_HIGH_WATER = 1 << 20
IDLE_TIMEOUT = 60.0  # a non-home connection not written for this long is closed
IDLE_CHECK_INTERVAL = 15.0

PacketCallback = Callable[[int, bytes, bytes], None]


class DerpManager:
    """The agent's DERP connections, one per region (see the module docstring).

    ``on_packet(region, src_node_key, payload)`` receives every relayed packet;
    ``on_peer_gone(region, node_key)`` a server's PeerGone; ``on_region_down(region)`` a failed
    dial or a lost connection (once until the next successful login); ``on_health(region,
    text)`` a server's Health frame ("" = fine again). Callbacks run on the event loop; one that
    raises is logged and the connection goes on. ``clock`` (monotonic seconds) and ``rng``
    (floats in [0, 1)) are injectable for tests, as are the idle limits and ``dial`` (an async
    ``dial(region, private_key) -> (DerpClient, DERPNode)``, default :func:`dial_region`).
    """

    def __init__(self, private_key: bytes, on_packet: PacketCallback, *,
                 on_peer_gone: Callable[[int, bytes], None] | None = None,
                 on_region_down: Callable[[int], None] | None = None,
                 on_health: Callable[[int, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 idle_timeout: float = IDLE_TIMEOUT,
                 idle_check_interval: float = IDLE_CHECK_INTERVAL,
                 queue_len: int = QUEUE_LEN,
                 plain_http: bool | None = None,
                 dial: Callable[..., Any] | None = None) -> None:
        self.private_key = bytes(private_key)
        self._on_packet = on_packet
        self._on_peer_gone = on_peer_gone
        self._on_region_down = on_region_down
        self._on_health = on_health
        self._clock = clock
        self._rng = rng
        self.idle_timeout = idle_timeout
        self.idle_check_interval = idle_check_interval
        self.queue_len = queue_len
        self.plain_http = plain_http_from_env() if plain_http is None else plain_http
        self._dial = dial
        self.home = 0
        self._map: DERPMap | None = None
        self._regions: dict[int, RegionConn] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False
        self._counters: dict[int, dict[str, int]] = {}
        self._drops: dict[tuple[int, str], int] = {}
        self._callback_errors = 0

    # --- configuration ----------------------------------------------------------------------

    def set_derp_map(self, dm: DERPMap | None) -> None:
        """Use ``dm`` from now on. Connections to regions that vanished or whose definition
        changed are closed (their queues dropped); the home region is redialled with its new
        definition, or forgotten (home 0) when it is gone."""
        if self._closed:
            return
        home_was_usable = bool(self.home) and self._usable(self.home) is not None
        self._map = copy.deepcopy(dm)
        for rid, r in list(self._regions.items()):
            new = self._usable(rid)
            if new is None or new != r.definition:
                self._drop_region(r, "map_change")
        if home_was_usable and self._usable(self.home) is None:
            log.info("DERP home region %d is no longer in the DERP map", self.home)
            self.home = 0
        elif self.home:
            self._ensure(self.home)
        self._maybe_start_janitor()

    def set_home(self, region: int) -> None:
        """Make ``region`` the home (0: none): it is connected at once and kept; every open
        connection is told NotePreferred (true only for the home). The old home becomes an
        ordinary region, closed after the idle time without writes."""
        if self._closed:
            return
        old, self.home = self.home, region
        if old != region and old in self._regions:
            self._regions[old].last_write = self._clock()
        for r in self._regions.values():
            if r.client is not None:
                r.wake.set()
        if region:
            self._ensure(region)
        self._maybe_start_janitor()

    # --- sending ----------------------------------------------------------------------------

    def send(self, region: int, dst_key: bytes, pkt: bytes) -> bool:
        """Send ``pkt`` to ``dst_key`` via ``region``, dialling it if needed. Never blocks or
        raises: False when the region is not in the DERP map (or has no DERP node), the key or
        packet is unusable, or the manager is closed. See :meth:`send_many`."""
        return self.send_many(region, dst_key, [pkt])

    def send_many(self, region: int, dst_key: bytes, pkts: list[bytes]) -> bool:
        """Send packets to one destination via ``region``. Connected and keeping up: written at
        once, in one write. Otherwise they wait in the region's queue, which drops its oldest
        packet when full."""
        try:
            if self._closed or len(dst_key) != F.KEY_LEN:
                return False
            pkts = [p for p in pkts if len(p) <= F.MAX_PACKET_SIZE]
            if not pkts:
                return False
            r = self._regions.get(region)
            if r is None:
                r = self._ensure(region)
                if r is None:
                    return False
            r.last_write = self._clock()
            q = r.queue
            client = r.client
            if (client is not None and not q and not r.stop
                    and client.write_buffer_size() < DIRECT_WRITE_HIGH_WATER):
                client.send_many_nowait(dst_key, pkts)
                c = self._counters[region]
                c["packets_sent"] += len(pkts)
                c["bytes_sent"] += sum(map(len, pkts))
                return True
            for pkt in pkts:
                if len(q) >= self.queue_len:
                    q.popleft()
                    self._drop(region, "queue_full")
                q.append((dst_key, pkt))
            if r.task is None:
                self._start(r)
            else:
                r.wake.set()
            return True
        except Exception:  # never raise into the data path
            log.exception("DERP send to region %d failed", region)
            return False

    async def ping(self, region: int, timeout: float = 5.0) -> float:
        """Round trip of a DERP Ping to ``region``'s server, in seconds (also kept as its
        status latency). Raises ConnectionError when the region is not connected, TimeoutError
        when no Pong comes."""
        r = self._regions.get(region)
        client = r.client if r is not None else None
        if r is None or client is None:
            raise ConnectionError(f"DERP region {region} is not connected")
        data = os.urandom(F.PING_LEN)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        r.pings[data] = fut
        start = time.perf_counter()
        try:
            await client.ping(data)
            await asyncio.wait_for(fut, timeout)
        finally:
            r.pings.pop(data, None)
        r.latency = time.perf_counter() - start
        return r.latency

    # --- reporting --------------------------------------------------------------------------

    def status(self) -> dict[int, RegionStatus]:
        """Every region with state (dialled, queued or home), by region ID."""
        now = self._clock()
        out: dict[int, RegionStatus] = {}
        for rid, r in sorted(self._regions.items()):
            out[rid] = RegionStatus(
                region=rid, code=r.definition.RegionCode, connected=r.client is not None,
                home=rid == self.home, node=r.node,
                server_key="nodekey:" + r.server_key.hex() if r.server_key else "",
                last_error=r.last_error, health=r.health, latency=r.latency,
                connected_for=(now - r.connected_at) if r.connected_at is not None else None,
                queued=len(r.queue), failures=r.failures,
                retry_in=max(0.0, r.next_dial - now))
        if self.home and self.home not in out:
            out[self.home] = RegionStatus(region=self.home, home=True)
        return out

    def counters(self, region: int) -> dict[str, int]:
        """The region's counters (a copy): packets/bytes sent and received, connects,
        reconnects, connect errors, disconnects, and ``dropped`` (all reasons)."""
        c = dict(self._counters.get(region) or dict.fromkeys(COUNTERS, 0))
        c["dropped"] = sum(n for (rid, _), n in self._drops.items() if rid == region)
        return c

    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        s: list[tuple[str, str, dict[str, str], float]] = []
        helps = {
            "packets_sent": "packets written to DERP servers",
            "bytes_sent": "payload bytes written to DERP servers",
            "packets_received": "packets received from DERP servers",
            "bytes_received": "payload bytes received from DERP servers",
            "connects": "DERP logins that succeeded",
            "reconnects": "DERP logins after the region's first",
            "connect_errors": "DERP dials that failed",
            "disconnects": "DERP connections that ended",
        }
        for rid in sorted(self._counters):
            c = self._counters[rid]
            labels = {"region": str(rid)}
            for name in COUNTERS:
                s.append((f"nodeagent_derp_{name}_total", helps[name], labels, float(c[name])))
        for (rid, reason), n in sorted(self._drops.items()):
            s.append(("nodeagent_derp_dropped_total",
                      "packets for DERP dropped before sending, by reason",
                      {"region": str(rid), "reason": reason}, float(n)))
        for rid, r in sorted(self._regions.items()):
            s.append(("nodeagent_derp_connected", "DERP connection up (1) or not (0)",
                      {"region": str(rid)}, float(r.client is not None)))
        s.append(("nodeagent_derp_home_region", "the home DERP region (0: none)", {},
                  float(self.home)))
        s.append(("nodeagent_derp_callback_errors_total",
                  "DERP callbacks that raised (logged)", {}, float(self._callback_errors)))
        return s

    # --- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection and stop every task; later sends return False."""
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Task[Any]] = []
        for r in list(self._regions.values()):
            t = self._drop_region(r, "closed", report=False)
            if t is not None:
                tasks.append(t)
        if self._janitor is not None:
            self._janitor.cancel()
            tasks.append(self._janitor)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- internals --------------------------------------------------------------------------

    def _usable(self, rid: int) -> DERPRegion | None:
        dm = self._map
        region = dm.Regions.get(rid) if dm is not None else None
        if region is None or not derp_nodes(region):
            return None
        return region

    def _ensure(self, rid: int) -> RegionConn | None:
        """The region's state, created (and its runner started, for the home) if needed."""
        r = self._regions.get(rid)
        if r is None:
            definition = self._usable(rid)
            if definition is None:
                return None
            r = self._regions[rid] = RegionConn(self, rid, definition, self._clock())
            self._counters.setdefault(rid, dict.fromkeys(COUNTERS, 0))
            self._maybe_start_janitor()
        if rid == self.home and r.task is None:
            self._start(r)
        return r

    def _start(self, r: RegionConn) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # queued; the next call from within the loop starts it
        r.task = loop.create_task(r.run(), name=f"derp-region-{r.id}")
        self._maybe_start_janitor()

    def _drop(self, rid: int, reason: str, n: int = 1) -> None:
        key = (rid, reason)
        self._drops[key] = self._drops.get(key, 0) + n

    def _count(self, rid: int, name: str, n: int = 1) -> None:
        self._counters[rid][name] += n

    def _drop_region(self, r: RegionConn, reason: str, *,
                     report: bool = True) -> asyncio.Task[None] | None:
        """Forget region ``r``: close its connection, drop its queue. Returns its runner."""
        if self._regions.get(r.id) is r:
            del self._regions[r.id]
        r.stop = True
        if r.queue:
            self._drop(r.id, reason, len(r.queue))
            r.queue.clear()
        was_up = r.client is not None
        task = r.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        r.wake.set()
        if was_up:
            log.log(logging.DEBUG if reason == "closed" else logging.INFO,
                    "DERP region %d: connection closed (%s)", r.id, reason.replace("_", " "))
            if report:
                r.report_down(force=True)
        return task

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._callback_raised(f"callback {getattr(fn, '__name__', fn)}")

    def _callback_raised(self, what: str) -> None:
        """Count a callback that raised (inside an ``except``); log the 1st and every 1000th."""
        self._callback_errors += 1
        if self._callback_errors == 1 or self._callback_errors % 1000 == 0:
            log.exception("DERP %s raised (%d so far)", what, self._callback_errors)

    def _maybe_start_janitor(self) -> None:
        if self._janitor is not None or self._closed:
            return
        if not any(rid != self.home for rid in self._regions):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._janitor = loop.create_task(self._clean_idle(), name="derp-idle-cleanup")

    async def _clean_idle(self) -> None:
        try:
            while not self._closed and any(rid != self.home for rid in self._regions):
                await asyncio.sleep(self.idle_check_interval)
                now = self._clock()
                for r in list(self._regions.values()):
                    if r.id != self.home and now - r.last_write >= self.idle_timeout:
                        self._drop_region(r, "idle")
        finally:
            self._janitor = None

    async def _default_dial(self, region: DERPRegion,
                            private_key: bytes) -> tuple[DerpClient, DERPNode]:
        return await dial_region(region, private_key, plain_http=self.plain_http)
