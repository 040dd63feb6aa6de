"""Sans-IO reply rate limiting for the derper's STUN server (anti-reflection).

Owns the per-source and global token buckets that decide whether an accepted binding request is
answered, and the throttle that keeps refusal logging to one line per interval. No sockets, no
logging; time comes from an injectable ``clock`` (seconds, monotonic).

Model:

- **Per source.** One token bucket per source: an IPv4 address, or an IPv6 /64 (the smallest
  block normally given to one site, so rotating through a victim's /64 gains nothing). ``rate``
  replies per second, up to ``burst`` in a row. A Tailscale client sends a handful of requests
  per netcheck, far below the defaults.
- **Global.** One more bucket shared by all sources (``global_rate`` per second, ``global_burst``
  in a row), so a flood with spoofed sources spread over many addresses — each with a fresh
  per-source bucket — is capped too.
- **Bounded memory.** The per-source table holds at most ``max_sources`` entries, kept in
  least-recently-seen order (a refused request counts as seen, so a flooding source keeps its
  drained bucket). A new source in a full table evicts the least recently seen one. An entry is
  only created when a reply is actually sent, so table churn is itself capped by the global
  budget. Each entry is one float (below), about 200 bytes with its key and table slot.

A request is answered only if both its source bucket and the global bucket hold a token; tokens
are taken from both only then. A request refused by its source's bucket costs the global budget
nothing, so one flooding source cannot starve everyone else.

Each bucket is stored as the instant at which it will be full again (``full_at``): with
``interval = 1/rate`` it holds ``burst - max(0, full_at - now) / interval`` tokens, taking one
moves ``full_at`` to ``max(full_at, now) + interval``, and ``full_at <= now`` means full —
exactly an ordinary token bucket, in one float per source.
"""

from __future__ import annotations

import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

ALLOWED = "allowed"
REFUSED_SOURCE = "source"
REFUSED_GLOBAL = "global"

DEFAULT_RATE = 50.0
DEFAULT_BURST = 200
DEFAULT_GLOBAL_RATE = 10000.0
DEFAULT_MAX_SOURCES = 32768
REFUSAL_LOG_INTERVAL = 60.0

# Float slack when comparing bucket debt with its limit: take() must not refuse a token that
# exact arithmetic would grant (e.g. after 0.1 + 0.1 + 0.1 seconds).
_EPS = 1e-9


@dataclass(frozen=True)
class StunRateLimits:
    """Reply limits of the STUN server. A rate of 0 (or infinity) switches that limit off."""

    rate: float = DEFAULT_RATE  # replies per second to one source
    burst: int = DEFAULT_BURST  # replies in a row to one source
    global_rate: float = DEFAULT_GLOBAL_RATE  # replies per second to everyone together
    global_burst: int | None = None  # default: one second's worth, at least ``burst``
    max_sources: int = DEFAULT_MAX_SOURCES  # per-source table size

    def __post_init__(self) -> None:
        for name in ("rate", "global_rate"):
            v = getattr(self, name)
            if not v >= 0:  # also rejects NaN
                raise ValueError(f"STUN rate limit {name}={v!r}: must be ≥ 0")
        if self.burst < 1 or (self.global_burst is not None and self.global_burst < 1):
            raise ValueError("STUN rate limit burst: must be ≥ 1")
        if self.max_sources < 1:
            raise ValueError("STUN rate limit max_sources: must be ≥ 1")

    @property
    def per_source_on(self) -> bool:
        return 0 < self.rate < math.inf

    @property
    def global_on(self) -> bool:
        return 0 < self.global_rate < math.inf

    @property
    def enabled(self) -> bool:
        return self.per_source_on or self.global_on

    def effective_global_burst(self) -> int:
        """The global burst: as configured, else ``max(ceil(global_rate), burst)``."""
        if self.global_burst is not None:
            return self.global_burst
        return max(math.ceil(self.global_rate), self.burst)


def source_key(host: str) -> str | bytes:
    """The per-source bucket key of a datagram's source address (the host part of ``addr``):
    the IPv4 address text (IPv4-mapped IPv6 unmapped), or the 8 packed bytes of an IPv6 /64."""
    if ":" not in host:
        return host
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    pct = host.find("%")
    if pct >= 0:
        host = host[:pct]
    try:
        return socket.inet_pton(socket.AF_INET6, host)[:8]
    except OSError:
        return host  # not an address (cannot come from a socket); still a stable key


class TokenBucket:
    """``rate`` tokens per second, at most ``burst``; starts full. Stored as ``full_at``."""

    __slots__ = ("_burst", "_interval", "_limit", "full_at")

    def __init__(self, rate: float, burst: int) -> None:
        if not (0 < rate < math.inf) or burst < 1:
            raise ValueError("token bucket: want 0 < rate < inf and burst ≥ 1")
        self._burst = burst
        self._interval = 1.0 / rate
        self._limit = (burst - 1 + _EPS) * self._interval  # the most debt that leaves a token
        self.full_at = -math.inf

    def take(self, now: float) -> bool:
        """Take one token if there is one at ``now``; return whether one was taken."""
        if self.full_at - now > self._limit:
            return False
        self.full_at = max(self.full_at, now) + self._interval
        return True

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (for tests and diagnostics)."""
        return self._burst - max(0.0, self.full_at - now) / self._interval


class StunReplyLimiter:
    """Decides per accepted request whether to answer: ``check(host)`` returns ``ALLOWED``,
    ``REFUSED_SOURCE`` (the source's bucket is empty) or ``REFUSED_GLOBAL`` (the shared budget
    is). Shared by the IPv4 and IPv6 sockets of one server."""

    __slots__ = ("limits", "_clock", "_sources", "_interval", "_limit", "_max", "_global",
                 "evictions")

    def __init__(self, limits: StunRateLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._sources: OrderedDict[str | bytes, float] = OrderedDict()
        self._max = limits.max_sources
        if limits.per_source_on:
            self._interval = 1.0 / limits.rate
            self._limit = (limits.burst - 1 + _EPS) * self._interval
        else:
            self._interval = self._limit = 0.0
        self._global = (TokenBucket(limits.global_rate, limits.effective_global_burst())
                        if limits.global_on else None)
        self.evictions = 0  # entries dropped from a full table (idle or not)

    def __len__(self) -> int:
        """Sources currently tracked (never more than ``limits.max_sources``)."""
        return len(self._sources)

    def check(self, host: str) -> str:
        """Answer one request from ``host``? Takes the tokens when the answer is ``ALLOWED``."""
        now = self._clock()
        table = self._sources
        key: str | bytes = ""
        full_at: float | None = None
        if self._interval:
            key = source_key(host)
            full_at = table.get(key)
            if full_at is not None:
                table.move_to_end(key)  # seen: the least recently seen are evicted first
                if full_at - now > self._limit:
                    return REFUSED_SOURCE
        g = self._global
        if g is not None and not g.take(now):
            return REFUSED_GLOBAL
        if self._interval:
            if full_at is None:
                if len(table) >= self._max:
                    table.popitem(last=False)
                    self.evictions += 1
                table[key] = now + self._interval
            else:
                table[key] = max(full_at, now) + self._interval
        return ALLOWED


class RefusalReport:
    """Throttles refusal logging: ``note(verdict, host)`` returns a one-line summary at most
    once per ``interval`` seconds (on the first refusal, then on the first one after each
    interval), else ``None``. Each summary covers the refusals since the previous summary;
    refusals after the last summary of a flood are not reported here (the metrics count them)."""

    __slots__ = ("interval", "_clock", "_next", "_source", "_global", "_since")

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = -math.inf
        self._source = 0
        self._global = 0
        self._since: float | None = None

    def note(self, verdict: str, host: str) -> str | None:
        """Record one refusal (``REFUSED_SOURCE`` or ``REFUSED_GLOBAL``) from ``host``."""
        if verdict == REFUSED_GLOBAL:
            self._global += 1
        else:
            self._source += 1
        now = self._clock()
        if now < self._next:
            return None
        span = "" if self._since is None else f" in the last {now - self._since:.0f}s"
        msg = (f"STUN: rate limit refused {self._source + self._global} request(s){span} "
               f"({self._source} over the per-source limit, {self._global} over the global "
               f"limit); latest from {host}; reported at most every {self.interval:g}s")
        self._source = self._global = 0
        self._since = now
        self._next = now + self.interval
        return msg
