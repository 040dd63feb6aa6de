"""Protocol wrapper that keeps aiohttp from swallowing DERP bytes sent right after the upgrade.

aiohttp's HTTP parser knows only ``websocket`` upgrades; for ``Upgrade: DERP`` it discards the
rest of the read that held the request and parses later bytes as HTTP. A fast-start client sends
ClientInfo without waiting for a response, so those bytes can be lost. This wrapper sits between
the transport and aiohttp's protocol: it passes the request head of a ``/derp`` DERP upgrade to
aiohttp and holds everything after it until :meth:`DerpServer.handle_http` claims it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodeagent_derper.server import DerpServer

_HEAD_MAX = 16 << 10
_SNIFF, _PASS, _HOLD = 0, 1, 2


def _is_derp_upgrade(head: bytes) -> bool:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) < 2 or parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != b"/derp":
        return False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade":
            return value.strip().lower() == b"derp"
    return False


class SniffProtocol(asyncio.Protocol):
    __slots__ = ("_srv", "_inner", "_state", "_buf", "_transport")

    def __init__(self, srv: DerpServer, inner: Any) -> None:
        self._srv = srv
        self._inner = inner
        self._state = _SNIFF
        self._buf = b""
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state == _PASS:
            self._inner.data_received(data)
            return
        if self._state == _HOLD:
            self._buf += data
            return
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _HEAD_MAX:
                self._state = _PASS
                self._buf = b""
                self._inner.data_received(buf)
            else:
                self._buf = buf
            return
        end += 4
        if not _is_derp_upgrade(buf[:end]):
            self._state = _PASS
            self._buf = b""
            self._inner.data_received(buf)
            return
        self._state = _HOLD
        self._buf = buf[end:]
        self._srv.held[self._transport] = self
        self._inner.data_received(buf[:end])

    def take(self) -> bytes:
        """Hand over the held bytes; from now on the DERP connection owns the transport."""
        data, self._buf = self._buf, b""
        self._state = _PASS
        return data

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._srv.held.pop(self._transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
