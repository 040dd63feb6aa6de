"""Memory of recent stand-alone requests, so a captured one cannot be played again.

A registration request is a single sealed box accepted while its timestamp is at most
``max_age`` seconds old (``proto.MAX_CLOCK_SKEW``); inside that window the same bytes would be
accepted again. The server therefore remembers each accepted request's *replay key* (derived
from the machine key and the box's random nonce, see ``proto.replay_key``) until its timestamp
leaves the window, and refuses a key it already holds.

Memory is bounded: at most ``max_entries`` keys. When the cache is full of keys that have not
expired, the one whose timestamp is oldest is forgotten and the cache's *floor* rises to that
timestamp: from then on any request stamped at or before the floor is refused as too old, so a
forgotten key can never be replayed. Under a flood the effective window shrinks; with honest
traffic (timestamps close to now) nothing changes. The clock is injectable for tests.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable

DEFAULT_MAX_ENTRIES = 32768
_TOO_OLD = ("request is older than the server can check for replays right now (too many "
            "recent requests); send a new one")


class NonceCache:
    """Replay keys of requests seen in the last ``max_age`` seconds (by their own timestamps)."""

    def __init__(self, max_age: float, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        self._seen: set[bytes] = set()
        self._heap: list[tuple[float, bytes]] = []  # (request timestamp, key), oldest first
        self.floor = -math.inf  # requests stamped at or before this are refused
        self.evicted = 0  # unexpired keys forgotten because the cache was full

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: bytes) -> bool:
        return key in self._seen

    def expire(self, now: float | None = None) -> None:
        """Forget keys whose requests are now older than ``max_age``."""
        limit = (self._clock() if now is None else now) - self.max_age
        heap = self._heap
        while heap and heap[0][0] < limit:
            self._seen.discard(heapq.heappop(heap)[1])

    def admit(self, key: bytes, stamp: float) -> str | None:
        """Remember ``key`` of a request stamped ``stamp``: None the first time, else a one-line
        reason to refuse the request (replayed, or too old to tell)."""
        now = self._clock()
        if not math.isfinite(stamp) or stamp < now - self.max_age:
            return "request timestamp is too far from the server's clock"
        self.expire(now)
        if key in self._seen:
            return "request replayed: the server has already accepted this exact request"
        full = len(self._seen) >= self.max_entries
        if stamp <= self.floor or (full and stamp <= self._heap[0][0]):
            return _TOO_OLD
        if full:
            old_stamp, old_key = heapq.heappop(self._heap)
            self._seen.discard(old_key)
            self.floor = max(self.floor, old_stamp)
            self.evicted += 1
        self._seen.add(key)
        heapq.heappush(self._heap, (stamp, key))
        return None
