"""Resource guards shared by every server we run: derper, control server and LocalAPI.

Owns what keeps a stranger (or a careless client) from locking everyone else out:

- :func:`raise_nofile_limit` — the soft ``RLIMIT_NOFILE`` raised to the hard limit at start, as
  Go's runtime does for every Go program (Tailscale's servers get it for free; CPython does not).
- :func:`request_timeout` — how long an HTTP connection may sit without a whole request before
  it is closed (aiohttp's keep-alive timer is armed from accept and while idle between requests;
  its default of an hour lets idle sockets pile up). ``NODEAGENT_HTTP_REQUEST_TIMEOUT`` overrides
  it (seconds), which tests use to see the deadline act quickly.
- :class:`ConnLimiter` — a protocol-factory wrapper bounding simultaneous connections per key
  (source IP for the derper's not-yet-authenticated clients, peer uid for the LocalAPI).
- :class:`ThrottledLog` and :func:`throttle_accept_errors` — one log line per interval for errors
  that can repeat many times a second (accept failing with EMFILE), with a count of the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("nodeagent.netguard")

DEFAULT_REQUEST_TIMEOUT = 15.0
ACCEPT_LOG_INTERVAL = 30.0
_ACCEPT_RESOURCE_MESSAGE = "socket.accept() out of system resource"


def raise_nofile_limit() -> int:
    """Raise the soft open-file limit to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux refuses an infinite NOFILE; the kernel's ceiling is what "no limit" means.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(
                resource.RLIMIT_NOFILE)[1]))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def request_timeout() -> float:
    """Seconds a connection may wait for a whole request; ``NODEAGENT_HTTP_REQUEST_TIMEOUT``."""
    raw = os.environ.get("NODEAGENT_HTTP_REQUEST_TIMEOUT", "")
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if value > 0:
            return value
        log.warning("NODEAGENT_HTTP_REQUEST_TIMEOUT=%r is not a positive number of seconds; "
                    "using %.0f", raw, DEFAULT_REQUEST_TIMEOUT)
    return DEFAULT_REQUEST_TIMEOUT


class ThrottledLog:
    """Log a recurring problem at most once per ``interval`` seconds, counting the rest."""

    __slots__ = ("logger", "interval", "clock", "_next", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = ACCEPT_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> bool:
        """Log now if the interval has passed (returns True), else count it silently."""
        now = self.clock()
        if now < self._next:
            self._suppressed += 1
            return False
        self._next = now + self.interval
        if self._suppressed:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, self._suppressed, self.interval)
            self._suppressed = 0
        self.logger.warning(msg, *args)
        return True


def throttle_accept_errors(loop: asyncio.AbstractEventLoop, logger: logging.Logger) -> None:
    """Route asyncio's own "accept out of resources" reports through a :class:`ThrottledLog`.

    asyncio (and uvloop) retry accept after EMFILE by themselves; only the log needs taming.
    Every other report goes to the handler that was installed before.
    """
    previous = loop.get_exception_handler()
    throttled = ThrottledLog(logger)

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if message.startswith(_ACCEPT_RESOURCE_MESSAGE):
            exc = context.get("exception")
            throttled.warning("accept failed: %s; retrying (open files limit reached?)",
                              exc or message)
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


class _Slot(asyncio.Protocol):
    """Protocol wrapper holding one limiter slot until the connection ends or is let go."""

    __slots__ = ("_limiter", "_inner", "_key", "_name", "_held", "_refused")

    def __init__(self, limiter: ConnLimiter, inner: asyncio.Protocol,
                 key: Hashable | None = None, name: Hashable | None = None) -> None:
        self._limiter = limiter
        self._inner = inner
        self._key = key
        self._name = name
        self._held = key is not None  # acquired by the caller (the derper's accept loop)
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lim = self._limiter
        if not self._held:
            key = lim.key_of(transport) if lim.key_of is not None else None
            if key is not None:
                if not lim.try_acquire(key):
                    lim.refuse(key)
                    self._refused = True
                    transport.abort()
                    return
                self._key, self._held = key, True
        self._inner.connection_made(transport)

    def release(self) -> None:
        if self._held:
            self._held = False
            lim = self._limiter
            if self._name is not None and lim.by_name.get(self._name) is self:
                del lim.by_name[self._name]
            lim.release(self._key)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.release()
        if not self._refused:
            self._inner.connection_lost(exc)


class ConnLimiter:
    """At most ``limit`` simultaneous connections per key (a source IP, a peer uid).

    Two ways in: :meth:`wrap` asks ``key_of(transport)`` when a connection is made (None: not
    limited) and aborts a connection over the limit before the wrapped protocol sees it; or the
    caller acquires a slot itself at accept time (:meth:`try_acquire`, before a TLS handshake
    costs anything) and hands it over with :meth:`wrap_held`, naming the connection (its peer
    address) so :meth:`release_name` can give the slot back early, as the derper does once a
    client has logged in. Refusals are counted in ``refused`` and logged once per interval.
    """

    def __init__(self, limit: int, logger: logging.Logger, what: str,
                 key_of: Callable[[asyncio.BaseTransport], Hashable | None] | None = None
                 ) -> None:
        self.limit = limit
        self.key_of = key_of
        self.what = what
        self.counts: dict[Hashable, int] = {}
        self.by_name: dict[Hashable, _Slot] = {}
        self.refused = 0
        self.log = ThrottledLog(logger)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Slot(self, factory())

    def wrap_held(self, factory: Callable[[], asyncio.Protocol], key: Hashable,
                  name: Hashable) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            slot = _Slot(self, factory(), key, name)
            self.by_name[name] = slot
            return slot
        return make

    def refuse(self, key: Hashable) -> None:
        self.refused += 1
        self.log.warning("refused a connection: %s %s already holds %d", self.what, key,
                         self.limit)

    def try_acquire(self, key: Hashable) -> bool:
        n = self.counts.get(key, 0)
        if n >= self.limit:
            return False
        self.counts[key] = n + 1
        return True

    def release(self, key: Hashable) -> None:
        n = self.counts.get(key, 0) - 1
        if n > 0:
            self.counts[key] = n
        else:
            self.counts.pop(key, None)

    def release_name(self, name: Hashable) -> bool:
        """Give back the slot of the connection called ``name``; False if it holds none."""
        slot = self.by_name.get(name)
        if slot is None:
            return False
        slot.release()
        return True
