"""One region's DERP connection inside :class:`~nodeagent.derp.manager.DerpManager`.

Owns a region's state (:class:`RegionConn`: its write queue, client, failures, last error,
pending pings) and its life (magicsock.md §2, §8-§9): dial, log in, send NotePreferred (true
only on the home region's connection; again whenever the home changes), write the queue, turn
server frames into the manager's callbacks, and after a failed dial or a lost connection report
the region down (once until the next success) and back off: the n-th consecutive failure waits
``min(n² * 10 ms, 5 s) * random[0.5, 1.5)`` (:func:`backoff_delay`, reset by a successful
login). The home region redials after the backoff; another region redials when a packet is
waiting for it. A server's Restarting frame postpones the next dial by the announced delay
instead. A server that takes no bytes for 10 s counts as lost. Also owns what the manager
reports per region (:class:`RegionStatus`, :data:`COUNTERS`).

The manager creates, starts and forgets regions; a region reads the manager's clock, home,
callbacks and counters.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodeagent.derp.client import (
    DerpClient,
    Health,
    PeerGone,
    Pong,
    ReceivedPacket,
    Restarting,
)
from nodeagent.derp.dial import DerpDialError, describe_error
from nodeagent.tailcfg import DERPNode, DERPRegion

if TYPE_CHECKING:
    from nodeagent.derp.manager import DerpManager

log = logging.getLogger("nodeagent.derp")

__all__ = ["COUNTERS", "MAX_BACKOFF", "WRITE_TIMEOUT", "RegionConn", "RegionStatus",
           "backoff_delay"]

WRITE_TIMEOUT = 10.0  # a server that takes no bytes for this long is given up
BACKOFF_UNIT = 0.010
MAX_BACKOFF = 5.0

COUNTERS = ("packets_sent", "bytes_sent", "packets_received", "bytes_received",
            "connects", "reconnects", "connect_errors", "disconnects")


def backoff_delay(failures: int, jitter: float) -> float:
    """Seconds to wait before the next dial after ``failures`` consecutive failures:
    ``min(failures² * 10 ms, 5 s) * (0.5 + jitter)`` with ``jitter`` in [0, 1); 0 for none."""
    if failures <= 0:
        return 0.0
    return min(failures * failures * BACKOFF_UNIT, MAX_BACKOFF) * (0.5 + jitter)


@dataclass
class RegionStatus:
    """What :meth:`DerpManager.status` reports for one region."""

    region: int
    code: str = ""
    connected: bool = False
    home: bool = False
    node: str = ""  # HostName of the node connected to
    server_key: str = ""  # "nodekey:<hex>" of that server (kept after a disconnect)
    last_error: str = ""
    health: str = ""  # the server's last Health text ("" = fine)
    latency: float | None = None  # seconds: round trip of the last DerpManager.ping
    connected_for: float | None = None  # seconds since the login, while connected
    queued: int = 0
    failures: int = 0  # consecutive failed dials / lost connections
    retry_in: float = 0.0  # seconds until the next dial may start

    def to_json(self) -> dict[str, Any]:
        return {"RegionID": self.region, "RegionCode": self.code, "Connected": self.connected,
                "Home": self.home, "Node": self.node, "ServerKey": self.server_key,
                "LastError": self.last_error, "Health": self.health,
                "LatencySeconds": self.latency, "ConnectedSeconds": self.connected_for,
                "Queued": self.queued, "Failures": self.failures, "RetryIn": self.retry_in}


class RegionConn:
    """One region's connection state and the task that keeps it (see the module docstring)."""

    __slots__ = ("client", "connected_at", "definition", "down_reported", "failures",
                 "health", "id", "last_error", "last_write", "latency", "mgr", "next_dial",
                 "node", "pings", "preferred_sent", "queue", "reader_done", "reader_error",
                 "restart", "server_key", "stop", "task", "wake")

    def __init__(self, mgr: DerpManager, rid: int, definition: DERPRegion, now: float) -> None:
        self.mgr = mgr
        self.id = rid
        self.definition = definition
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.client: DerpClient | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.last_write = now
        self.failures = 0
        self.next_dial = 0.0
        self.last_error = ""
        self.health = ""
        self.server_key = b""
        self.node = ""
        self.connected_at: float | None = None
        self.preferred_sent: bool | None = None
        self.restart: tuple[float, float] | None = None  # (reconnect in, try for), seconds
        self.reader_done = False
        self.reader_error = ""
        self.down_reported = False
        self.stop = False
        self.latency: float | None = None
        self.pings: dict[bytes, asyncio.Future[float]] = {}

    def report_down(self, force: bool = False) -> None:
        """Call the manager's ``on_region_down`` (once until the next login, unless forced)."""
        if self.down_reported and not force:
            return
        self.down_reported = True
        m = self.mgr
        if m._on_region_down is not None:
            m._call(m._on_region_down, self.id)

    def _failed(self, error: str) -> None:
        m = self.mgr
        self.failures += 1
        self.last_error = error
        delay = backoff_delay(self.failures, m._rng())
        self.next_dial = max(self.next_dial, m._clock() + delay)
        self.report_down()

    async def run(self) -> None:
        """Dial, serve, back off, redial — while the region is wanted."""
        m = self.mgr
        try:
            while not (m._closed or self.stop):
                wait = self.next_dial - m._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not (self.queue or self.id == m.home) or self.stop:
                    break  # nothing needs this region now; the next send dials again
                try:
                    dial = m._dial or m._default_dial
                    client, node = await dial(self.definition, m.private_key)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    m._count(self.id, "connect_errors")
                    msg = str(e) if isinstance(e, DerpDialError) else describe_error(e)
                    if self.failures == 0 or msg != self.last_error:
                        log.info("DERP region %d: %s", self.id, msg)
                    self._failed(msg)
                    continue
                if self.stop:
                    await client.close()
                    break
                await self._serve(client, node)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: say so, leave the region idle until the next send
            log.exception("DERP region %d: connection task failed", self.id)
            self.last_error = f"internal error: {describe_error(e)}"
        finally:
            if self.task is asyncio.current_task():
                self.task = None

    async def _serve(self, client: DerpClient, node: DERPNode) -> None:
        """One logged-in connection: write the queue and NotePreferred until it ends."""
        m = self.mgr
        c = m._counters[self.id]
        c["connects"] += 1
        if c["connects"] > 1:
            c["reconnects"] += 1
        self.client = client
        self.node = node.HostName
        self.server_key = client.server_public_key
        self.connected_at = m._clock()
        self.failures = 0
        self.next_dial = 0.0
        self.last_error = ""
        self.down_reported = False
        self.restart = None
        self.reader_done = False
        self.reader_error = ""
        self.preferred_sent = None
        log.info("DERP region %d: connected to %s (server nodekey:%s)%s", self.id,
                 node.HostName, client.server_public_key.hex()[:16],
                 " [home]" if self.id == m.home else "")
        reader = asyncio.get_running_loop().create_task(self._read(client))
        error = ""
        try:
            while not (self.reader_done or self.stop):
                self.wake.clear()
                want = self.id == m.home
                if self.preferred_sent is not want:
                    await client.note_preferred(want)
                    self.preferred_sent = want
                q = self.queue
                if q:
                    n = nbytes = 0
                    while q:
                        dst, pkt = q.popleft()
                        client.send_nowait(dst, pkt)
                        n += 1
                        nbytes += len(pkt)
                    c["packets_sent"] += n
                    c["bytes_sent"] += nbytes
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await client.drain()
                    continue
                await self.wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = f"write failed: {describe_error(e)}"
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            self.client = None
            self.connected_at = None
            for fut in self.pings.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("DERP connection closed"))
            try:
                await asyncio.shield(client.close())
            except Exception:  # the connection is gone either way
                pass
        if self.stop or m._closed:
            return
        c["disconnects"] += 1
        error = self.reader_error or error or "connection closed"
        if self.restart is not None:
            delay, _ = self.restart
            self.last_error = f"server restarting: {error}"
            self.failures = 0
            self.next_dial = m._clock() + delay
            log.info("DERP region %d: server restarting, redialling in %.1fs", self.id, delay)
            self.report_down()
        else:
            log.info("DERP region %d: connection lost: %s", self.id, error)
            self._failed(error)

    async def _read(self, client: DerpClient) -> None:
        m = self.mgr
        c = m._counters[self.id]
        rid = self.id
        on_packet = m._on_packet
        try:
            while True:
                for ev in await client.recv_batch():
                    if type(ev) is ReceivedPacket:
                        c["packets_received"] += 1
                        c["bytes_received"] += len(ev.data)
                        try:
                            on_packet(rid, ev.src, ev.data)
                        except Exception:
                            m._callback_raised("on_packet")
                    elif isinstance(ev, PeerGone):
                        if m._on_peer_gone is not None:
                            m._call(m._on_peer_gone, rid, ev.key)
                    elif isinstance(ev, Health):
                        self.health = ev.problem
                        if ev.problem:
                            log.warning("DERP region %d: server reports: %s", rid, ev.problem)
                        if m._on_health is not None:
                            m._call(m._on_health, rid, ev.problem)
                    elif isinstance(ev, Restarting):
                        self.restart = (ev.reconnect_in_ms / 1000.0, ev.try_for_ms / 1000.0)
                    elif isinstance(ev, Pong):
                        fut = self.pings.get(ev.data)
                        if fut is not None and not fut.done():
                            fut.set_result(0.0)
                    # Ping: the adapter already queued the Pong; KeepAlive, ServerInfo: nothing.
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.reader_error = describe_error(e)
        finally:
            self.reader_done = True
            self.wake.set()
