"""DERP carried in binary WebSocket messages (subprotocol ``derp``) on the relay side.

The DERP byte stream is the concatenation of message payloads; frame and message boundaries need
not align. Writes go through one writer task per connection because aiohttp's WebSocket sends
are coroutines; its pending byte count plays the role of a TCP transport's write buffer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from nodeagent_derper.server_conn import Conn

if TYPE_CHECKING:
    from nodeagent_derper.server import DerpServer


_WS_HIGH = 256 << 10
_WS_LOW = 64 << 10


class WsConn(Conn):
    """DERP inside binary WebSocket messages: a writer task drains what the relay queues."""

    __slots__ = ("ws", "wbuf", "wpending", "wevent", "rresume", "writer_task", "close_task")

    def __init__(self, srv: DerpServer, ws: Any, remote: tuple[Any, ...] | None,
                 not_ideal: bool) -> None:
        Conn.__init__(self, srv, remote, not_ideal)
        self.ws = ws
        self.wbuf: list[bytes] = []
        self.wpending = 0
        self.wevent = asyncio.Event()
        self.rresume = asyncio.Event()
        self.rresume.set()
        self.writer_task = self.loop.create_task(self._writer())
        self.close_task: asyncio.Task[None] | None = None

    def _write_now(self, data: bytes) -> None:
        self.wbuf.append(data)
        self.wpending += len(data)
        if self.wpending > _WS_HIGH and not self.write_paused:
            self.pause_writing()
        self.wevent.set()

    async def _writer(self) -> None:
        while True:
            await self.wevent.wait()
            self.wevent.clear()
            while self.wbuf:
                data = b"".join(self.wbuf)
                self.wbuf.clear()
                try:
                    await self.ws.send_bytes(data)
                except (ConnectionError, RuntimeError):
                    self.close("write_error", abort=True)
                    return
                self.wpending -= len(data)
                if self.write_paused and self.wpending <= _WS_LOW:
                    self.resume_writing()
            if self.closed:
                return

    def _pause_reading(self) -> None:
        self.rresume.clear()

    def _resume_reading(self) -> None:
        self.rresume.set()

    def _close_transport(self, abort: bool) -> None:
        self.rresume.set()
        self.close_task = self.loop.create_task(self._ws_close(abort))

    async def _ws_close(self, abort: bool) -> None:
        if not abort and self.wbuf:
            self.wevent.set()
            try:
                await asyncio.wait_for(asyncio.shield(self.writer_task), 2.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
        self.writer_task.cancel()
        try:
            await self.ws.close()
        except (ConnectionError, RuntimeError):
            pass

    async def run(self) -> None:
        """Read binary messages until the peer or the relay ends the connection."""
        from aiohttp import WSMsgType

        ws = self.ws
        self.start()
        while not self.closed:
            if not self.rresume.is_set():
                await self.rresume.wait()
                continue
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                self.on_data(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                              WSMsgType.ERROR):
                break
        self.close("eof")
