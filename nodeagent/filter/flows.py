"""The flow table: a bounded LRU of flows this host initiated, so their replies pass inbound.

Keys are ``(proto | family bit, src ip, src port, dst ip, dst port)`` as seen outbound; the family
bit (256 for IPv6) keeps an IPv4 flow from ever equalling an IPv6 one whose addresses happen to
have the same integer value. An inbound packet asks with the reversed tuple (:func:`reply_key`).

Eviction is least-recently-used: recording a flow and answering a reply both refresh it. Entries
carry no timeout by default (Tailscale's flow cache has none either); with ``ttl`` set, an entry
idle (no packet either way) for longer than that no longer admits replies and is dropped when
next looked at (or evicted by LRU order).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

FlowKey = tuple[int, int, int, int, int]

FAMILY_V6 = 256


def flow_key(version: int, proto: int, src: int, sport: int, dst: int, dport: int) -> FlowKey:
    """The key of an outbound packet's flow."""
    return (proto | FAMILY_V6 if version == 6 else proto, src, sport, dst, dport)


def reply_key(version: int, proto: int, src: int, sport: int, dst: int, dport: int) -> FlowKey:
    """The key of the outbound flow that an inbound packet would be a reply to."""
    return (proto | FAMILY_V6 if version == 6 else proto, dst, dport, src, sport)


class FlowTable:
    """Bounded LRU set of outbound flows (optionally with an idle timeout)."""

    __slots__ = ("capacity", "ttl", "clock", "entries", "evictions")

    def __init__(
        self,
        capacity: int = 8192,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"flow table capacity must be >= 1, got {capacity}")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"flow ttl must be > 0, got {ttl}")
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        # key → time last refreshed (0.0 when there is no ttl, so the clock is never read).
        self.entries: OrderedDict[FlowKey, float] = OrderedDict()
        self.evictions = 0

    def record(self, key: FlowKey) -> None:
        """Note an outbound packet of ``key``'s flow (new or refreshed, most recent)."""
        entries = self.entries
        now = 0.0 if self.ttl is None else self.clock()
        if key in entries:
            entries[key] = now
            entries.move_to_end(key)
            return
        entries[key] = now
        if len(entries) > self.capacity:
            entries.popitem(last=False)
            self.evictions += 1

    def seen(self, key: FlowKey) -> bool:
        """Whether ``key`` is a live flow; a hit refreshes it (replies keep a flow alive too)."""
        entries = self.entries
        t = entries.get(key)
        if t is None:
            return False
        if self.ttl is not None:
            now = self.clock()
            if now - t > self.ttl:
                del entries[key]
                return False
            entries[key] = now
        entries.move_to_end(key)
        return True

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def clear(self) -> None:
        self.entries.clear()
