"""FakeTun: an in-memory stand-in for :class:`~nodeagent.tundev.device.TunDevice` in unit tests.

Same surface as the real device (``start``, ``write_many``, ``close``, ``name``, ``mtu``, ``fd``,
``write_errors``). ``inject`` plays the kernel: packets the host "sends" reach ``on_packets`` in
batches of at most ``READ_BATCH``, queued until ``start`` like a real TUN queue. ``written``
records what the data path wrote to the host; ``wait_written`` lets an async test wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from nodeagent.tundev.device import READ_BATCH, TunError


class FakeTun:
    """A TUN without a kernel. Not thread-safe: use it from one event-loop thread."""

    def __init__(self, name: str = "faketun0", mtu: int = 1280) -> None:
        self.name = name
        self.mtu = mtu
        self.fd = -1
        self.written: list[bytes] = []
        self.write_errors = 0  # writes after close, as the real device counts them
        self.read_errors = 0
        self.closed = False
        self.started = False
        self._loop: Any = None
        self._on_packets: Callable[[list[bytes]], None] | None = None
        self._pending: list[bytes] = []  # injected before start, delivered on start
        self._waiters: list[tuple[int, asyncio.Future[list[bytes]]]] = []

    # --- TunLike ---------------------------------------------------------------------------
    def start(self, loop: Any, on_packets: Callable[[list[bytes]], None]) -> None:
        if self.closed:
            raise TunError(f"TUN {self.name!r} is closed")
        if self.started:
            raise TunError(f"TUN {self.name!r} is already started")
        self.started = True
        self._loop = loop
        self._on_packets = on_packets
        if self._pending:
            # Like a real reader: queued packets arrive from the loop, not inside start().
            loop.call_soon(self._flush_pending)

    def write_many(self, pkts: list[bytes]) -> None:
        if self.closed:
            self.write_errors += len(pkts)
            return
        self.written.extend(bytes(p) for p in pkts)
        if self._waiters:
            self._wake()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_packets = None
        self._pending.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(TunError(f"TUN {self.name!r} closed while waiting for writes"))
        self._waiters.clear()

    # --- test side ---------------------------------------------------------------------------
    def inject(self, pkts: Iterable[bytes]) -> None:
        """Deliver packets to ``on_packets`` now (batches of READ_BATCH), or queue them until
        ``start``. Injecting into a closed device is a test bug and raises."""
        if self.closed:
            raise TunError(f"TUN {self.name!r} is closed")
        items = [bytes(p) for p in pkts]
        if self._on_packets is None:
            self._pending.extend(items)
            return
        self._deliver(items)

    def _flush_pending(self) -> None:
        items, self._pending = self._pending, []
        if items and self._on_packets is not None:
            self._deliver(items)

    def _deliver(self, items: list[bytes]) -> None:
        for i in range(0, len(items), READ_BATCH):
            cb = self._on_packets
            if cb is None:  # the callback closed us mid-delivery
                return
            cb(items[i:i + READ_BATCH])

    async def wait_written(self, n: int, timeout: float = 5.0) -> list[bytes]:
        """Wait until at least ``n`` packets have been written; return a copy of ``written``.
        Raises ``TimeoutError`` saying how many arrived."""
        if len(self.written) >= n:
            return list(self.written)
        if self.closed:
            raise TunError(f"TUN {self.name!r} is closed")
        fut: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name}: waited {timeout}s for {n} written packets, "
                               f"got {len(self.written)}") from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _wake(self) -> None:
        have = len(self.written)
        for n, fut in self._waiters:
            if have >= n and not fut.done():
                fut.set_result(list(self.written))

    def clear_written(self) -> None:
        self.written.clear()
