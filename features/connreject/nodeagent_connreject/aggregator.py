"""Connection-rejection events and the LRU-bounded aggregator that merges them.

The aggregator is the counterpart of Tailscale's net/connreject: observations are merged by
(direction, proto, peer address, reason) — the peer is Dst's address for outgoing events and
Src's for incoming ones — into one event per key with a count and first/last times. Each
direction keeps its own LRU of at most ``max_entries`` keys. It starts disabled; notes while
disabled are dropped, and disabling clears both directions so a disabled snapshot is empty (a
deliberate difference from Tailscale, whose code keeps old entries).

It is called from the data plane (the event loop) and read from LocalAPI/c2n handlers and may
be used from other threads, so every mutation holds one lock; the critical section is a dict
lookup and a move to the end.

Change notification: one optional ``on_change`` callable (the watch streams' hub installs it
only while someone watches) is called after every change — a kept note, a switch of the gate,
a clear. With no watcher that costs one attribute load and a ``None`` check per note.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OUTGOING = "outgoing"
INCOMING = "incoming"
DIRECTIONS = (OUTGOING, INCOMING)

SOURCES = ("tsmp_recv", "tsmp_sent", "pendopen_timeout")
REASONS = ("unknown", "acl", "shields", "host-ip-forwarding", "host-firewall", "no-peer",
           "peer-unreachable", "timeout")

MOBILE_PLATFORMS = ("ios", "android", "tvos")
DEFAULT_MAX_ENTRIES = 256
MOBILE_MAX_ENTRIES = 32


def default_max_entries(platform: str = sys.platform) -> int:
    """256 per direction; 32 on mobile platforms, where memory is scarcer."""
    return MOBILE_MAX_ENTRIES if platform in MOBILE_PLATFORMS else DEFAULT_MAX_ENTRIES


@dataclass(slots=True)
class Event:
    """One aggregated rejection. Times are integer nanoseconds since the Unix epoch (UTC);
    0 means unset and is filled in by :meth:`Aggregator.note`."""

    Direction: str
    Proto: int
    Src: str
    Dst: str
    Reason: str
    Source: str
    MaybeBroken: bool = False
    First: int = 0
    Last: int = 0
    Count: int = 0

    def to_json(self) -> dict[str, Any]:
        """The wire form: field names and formats exactly as the connreject spec says."""
        return {
            "First": rfc3339_nano(self.First),
            "Last": rfc3339_nano(self.Last),
            "Count": self.Count,
            "Direction": self.Direction,
            "Proto": self.Proto,
            "Src": self.Src,
            "Dst": self.Dst,
            "Reason": self.Reason,
            "Source": self.Source,
            "MaybeBroken": self.MaybeBroken,
        }


def rfc3339_nano(ns: int) -> str:
    """RFC 3339 in UTC with up to nine fractional digits, trailing zeros trimmed (Go's form)."""
    sec, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def peer_address(endpoint: str) -> str:
    """The address part of ``"100.64.0.1:80"`` or ``"[fd7a::1]:80"`` (ports are not in the key)."""
    if endpoint.startswith("["):
        end = endpoint.find("]")
        return endpoint[1:end] if end > 0 else endpoint
    head, sep, _ = endpoint.rpartition(":")
    return head if sep else endpoint


Key = tuple[int, str, str]  # (proto, peer address, reason); the direction selects the buffer


class Aggregator:
    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._enabled = False
        self._out: OrderedDict[Key, Event] = OrderedDict()
        self._in: OrderedDict[Key, Event] = OrderedDict()
        self.noted: dict[tuple[str, str], int] = {}  # (direction, reason) → observations kept
        self.dropped_disabled = 0
        self.dropped_bad = 0
        self.evicted = 0
        # Called (no arguments, possibly from another thread) after every change; None: nobody.
        self.on_change: Callable[[], None] | None = None

    @property
    def enabled(self) -> bool:
        return self._enabled

    def admit(self) -> bool:
        """True while recording; otherwise counts one dropped observation. A cheap check for a
        caller about to format an observation's fields (the data plane's note callback)."""
        if self._enabled:
            return True
        self.dropped_disabled += 1
        return False

    def set_enabled(self, on: bool) -> bool:
        """Switch recording; returns the previous value. Switching off clears both directions."""
        with self._lock:
            prev = self._enabled
            self._enabled = bool(on)
            if not on:
                self._out.clear()
                self._in.clear()
        cb = self.on_change
        if cb is not None and prev != bool(on):
            cb()
        return prev

    def clear(self) -> int:
        """Forget every aggregated event (both directions); returns how many there were."""
        with self._lock:
            n = len(self._out) + len(self._in)
            self._out.clear()
            self._in.clear()
        cb = self.on_change
        if cb is not None:
            cb()
        return n

    def set_max_entries(self, n: int) -> None:
        """Resize both directions, evicting the least recent entries if they are now too many."""
        with self._lock:
            self.max_entries = n
            for buf in (self._out, self._in):
                self._trim(buf)
        cb = self.on_change
        if cb is not None:
            cb()

    def note(self, ev: Event) -> None:
        """Merge one observation. Dropped when disabled, ``max_entries <= 0`` or the direction
        is unknown. Unset Last/First/Count become now/Last/1."""
        self.note_fields(ev.Direction, ev.Proto, ev.Src, ev.Dst, ev.Reason, ev.Source,
                         ev.MaybeBroken, ev.Last, ev.Count, ev.First)

    def note_fields(self, direction: str, proto: int, src: str, dst: str, reason: str,
                    source: str, maybe_broken: bool, last: int = 0, count: int = 0,
                    first: int = 0) -> None:
        """:meth:`note` without building an Event first: the data plane's path, which on a
        repeated key (the common case in a storm) allocates nothing."""
        if not self._enabled:
            self.dropped_disabled += 1
            return
        if direction == OUTGOING:
            buf = self._out
            peer = peer_address(dst)
        elif direction == INCOMING:
            buf = self._in
            peer = peer_address(src)
        else:
            self.dropped_bad += 1
            return
        if last == 0:
            last = time.time_ns()
        if count == 0:
            count = 1
        key = (proto, peer, reason)
        with self._lock:
            if not self._enabled or self.max_entries <= 0:
                self.dropped_disabled += 1
                return
            old = buf.get(key)
            if old is None:
                buf[key] = Event(direction, proto, src, dst, reason, source, maybe_broken,
                                 first or last, last, count)
                self._trim(buf)
            else:
                old.Last = last
                old.Count += count
                old.Src = src
                old.Dst = dst
                old.Source = source
                old.MaybeBroken = maybe_broken
                buf.move_to_end(key)
            nk = (direction, reason)
            self.noted[nk] = self.noted.get(nk, 0) + 1
        cb = self.on_change
        if cb is not None:
            cb()

    def _trim(self, buf: OrderedDict[Key, Event]) -> None:
        while len(buf) > max(self.max_entries, 0):
            buf.popitem(last=False)
            self.evicted += 1

    def outgoing(self) -> list[Event]:
        """Copies of the outgoing events, oldest first."""
        with self._lock:
            return [_copy(e) for e in self._out.values()]

    def incoming(self) -> list[Event]:
        """Copies of the incoming events, oldest first."""
        with self._lock:
            return [_copy(e) for e in self._in.values()]

    def response(self) -> dict[str, Any]:
        """The DebugRejectsResponse body: lists are empty (never null) when disabled."""
        with self._lock:
            enabled = self._enabled
            out = [e.to_json() for e in self._out.values()] if enabled else []
            inc = [e.to_json() for e in self._in.values()] if enabled else []
        return {"Enabled": enabled, "Outgoing": out, "Incoming": inc}


def _copy(e: Event) -> Event:
    return Event(e.Direction, e.Proto, e.Src, e.Dst, e.Reason, e.Source, e.MaybeBroken, e.First,
                 e.Last, e.Count)
