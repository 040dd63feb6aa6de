"""Sliding replay window for 64-bit transport counters (the ring-of-blocks scheme of RFC 6479).

The bitmap is a ring of 64-bit words; moving the window forward clears only the words it passes
over, so an advance costs at most one pass over the ring and an in-window check touches one word.
Window: ``(RING_WORDS - 1) * 64`` = 4032 counters behind the highest accepted one.
"""

from __future__ import annotations

RING_WORDS = 64  # power of two
_MASK = RING_WORDS - 1
WINDOW = (RING_WORDS - 1) * 64


class ReplayWindow:
    """Accept each counter at most once, and nothing older than ``WINDOW`` behind the newest."""

    __slots__ = ("_last", "_ring", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit  # counters >= limit are never valid (REJECT_AFTER_MESSAGES)
        self._last = 0
        self._ring = [0] * RING_WORDS

    def check(self, counter: int) -> bool:
        """True if ``counter`` would be accepted (does not record it)."""
        if counter >= self._limit:
            return False
        last = self._last
        if counter > last:
            return True
        if last - counter > WINDOW:
            return False
        return not (self._ring[(counter >> 6) & _MASK] >> (counter & 63)) & 1

    def update(self, counter: int) -> bool:
        """Record ``counter``; False (and nothing recorded) if it is a replay or too old."""
        last = self._last
        if counter == last + 1 and counter < self._limit:
            # in-order fast path: bits above ``last`` are clear; a new word starts fresh
            self._last = counter
            bit = counter & 63
            if bit:
                self._ring[(counter >> 6) & _MASK] |= 1 << bit
            else:
                self._ring[(counter >> 6) & _MASK] = 1
            return True
        if counter >= self._limit:
            return False
        ring = self._ring
        block = counter >> 6
        if counter > last:
            cur = last >> 6
            diff = block - cur
            if diff:
                if diff >= RING_WORDS:
                    ring[:] = [0] * RING_WORDS
                else:
                    for i in range(cur + 1, block + 1):
                        ring[i & _MASK] = 0
            self._last = counter
        elif last - counter > WINDOW:
            return False
        i = block & _MASK
        bit = 1 << (counter & 63)
        w = ring[i]
        if w & bit:
            return False
        ring[i] = w | bit
        return True
