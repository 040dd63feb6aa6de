"""Live watch of the aggregate: the LocalAPI stream ``GET debug-rejects?watch=1``.

Owns three things:

- :class:`Coalescer`, the sans-IO rule of when a stream writes: a snapshot at once for the first
  change after a quiet spell, then at most one per ``interval`` (changes in between are merged
  into the next one), and a heartbeat after ``heartbeat`` seconds without a line.
- :class:`WatchHub`, the aggregator's one change observer. It installs itself as
  ``Aggregator.on_change`` only while at least one stream watches, so with no watcher a note
  pays one attribute load and a ``None`` check. A storm of notes wakes the event loop once per
  loop iteration, whatever thread they come from.
- :func:`serve_watch`, the asyncio handler writing newline-delimited JSON objects:
  ``{"Type": "snapshot", "Time": T, "Rejects": <DebugRejectsResponse>}`` first and after
  changes, ``{"Type": "heartbeat", "Time": T}`` when quiet, and ``{"Type": "closing", ...}``
  as the last line when the LocalAPI server stops. The stream ends when the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from nodeagent.localapi.routes import server_closing
from nodeagent_connreject.aggregator import Aggregator, rfc3339_nano

INTERVAL = 0.2  # at most one snapshot per this many seconds per stream
HEARTBEAT = 10.0  # a line at least this often, so both ends notice a dead peer
CLIENT_CHECK = 0.5  # how often an idle stream looks whether its client has gone


class Coalescer:
    """When a watch stream writes; times are caller-supplied seconds (monotonic)."""

    def __init__(self, interval: float = INTERVAL, heartbeat: float = HEARTBEAT) -> None:
        self.interval = interval
        self.heartbeat = heartbeat
        self.dirty = True  # the first thing a stream sends is a snapshot
        self.last_snapshot = float("-inf")
        self.last_line = float("-inf")

    def changed(self) -> None:
        self.dirty = True

    def due(self, now: float) -> str | None:
        """``"snapshot"``, ``"heartbeat"`` or None (nothing to write yet)."""
        if self.dirty and now >= self.last_snapshot + self.interval:
            return "snapshot"
        if now >= self.last_line + self.heartbeat:
            return "heartbeat"
        return None

    def sent(self, kind: str, now: float) -> None:
        self.last_line = now
        if kind == "snapshot":
            self.dirty = False
            self.last_snapshot = now

    def wait_for(self, now: float) -> float:
        """Seconds until :meth:`due` may answer something other than None, with no change."""
        t = self.last_line + self.heartbeat
        if self.dirty:
            t = min(t, self.last_snapshot + self.interval)
        return max(0.0, t - now)


class WatchHub:
    """Fans the aggregator's change callback out to the open streams' asyncio events."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self._events: list[asyncio.Event] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the streams' (the agent's) loop
        self._thread = 0  # and the thread running it
        self._pending = False
        self.wakeups = 0  # loop wake-ups delivered (tests check storms coalesce)

    @property
    def watchers(self) -> int:
        return len(self._events)

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._events.append(ev)
        self.agg.on_change = self._changed
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        self._events = [e for e in self._events if e is not ev]
        if not self._events:
            self.agg.on_change = None

    def _changed(self) -> None:
        """The aggregator's ``on_change``: called per kept note, so only the first call until
        the loop has run the wake-up does any work."""
        if self._pending:
            return
        loop = self._loop
        if loop is None or not self._events:
            return
        self._pending = True
        if threading.get_ident() == self._thread:
            loop.call_soon(self._wake)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody to wake
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._pending = False
        self.wakeups += 1
        for ev in self._events:
            ev.set()


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _now() -> str:
    return rfc3339_nano(time.time_ns())


async def serve_watch(request: web.Request, hub: WatchHub,
                      body: Callable[[], dict[str, Any]], *, interval: float = INTERVAL,
                      heartbeat: float = HEARTBEAT) -> web.StreamResponse:
    """Stream the aggregate (``body()`` is the DebugRejectsResponse) until the client goes or
    the LocalAPI server stops."""
    closing = server_closing(request)
    changed = hub.subscribe()
    co = Coalescer(interval, heartbeat)
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson",
                                                   "Cache-Control": "no-store"})
    try:
        await resp.prepare(request)
        while True:
            if closing.is_set():
                await resp.write(_line({"Type": "closing", "Time": _now()}))
                break
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            now = loop.time()
            kind = co.due(now)
            if kind == "snapshot":
                changed.clear()  # what happened before this snapshot is in it
                await resp.write(_line({"Type": "snapshot", "Time": _now(), "Rejects": body()}))
                co.sent(kind, now)
                continue
            if kind == "heartbeat":
                await resp.write(_line({"Type": "heartbeat", "Time": _now()}))
                co.sent(kind, now)
                continue
            timeout = min(co.wait_for(now), CLIENT_CHECK)
            if co.dirty:  # a change is waiting for the interval to pass: just sleep
                await asyncio.sleep(timeout)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
            if changed.is_set():
                co.changed()
        return resp
    except ConnectionError:
        return resp  # the client went
    finally:
        hub.unsubscribe(changed)
