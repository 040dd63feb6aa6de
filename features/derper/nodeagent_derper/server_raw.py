"""DERP over the hijacked TCP/TLS stream on the relay side (the ``Upgrade: DERP`` route):
:class:`RawConn` is a server connection that is itself the transport's asyncio protocol, so
bytes go straight from the socket into the connection with no task per connection. The
WebSocket variant is :mod:`nodeagent_derper.server_ws`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from nodeagent_derper.server_conn import Conn

if TYPE_CHECKING:
    from nodeagent_derper.server import DerpServer


class RawConn(Conn, asyncio.Protocol):
    """DERP over the hijacked TCP/TLS stream: this object becomes the transport's protocol.

    ``http_protocol`` is the protocol this connection replaced (aiohttp's request handler, or the
    fast-start sniffer around it). It is told when the transport closes, exactly once, so aiohttp
    drops the connection from its table: without that every connection ever served stays
    referenced by the HTTP server (a leak any stranger could drive).
    """

    __slots__ = ("transport", "http_protocol")

    def __init__(self, srv: DerpServer, transport: asyncio.Transport,
                 remote: tuple[Any, ...] | None, not_ideal: bool,
                 http_protocol: asyncio.BaseProtocol | None = None) -> None:
        Conn.__init__(self, srv, remote, not_ideal)
        self.transport = transport
        self.http_protocol = http_protocol

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()
        http, self.http_protocol = self.http_protocol, None
        if http is not None:
            http.connection_lost(exc)

    def _write_now(self, data: bytes) -> None:
        self.transport.write(data)

    def _pause_reading(self) -> None:
        try:
            self.transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass

    def _resume_reading(self) -> None:
        try:
            self.transport.resume_reading()
        except (RuntimeError, AttributeError):
            pass

    def _close_transport(self, abort: bool) -> None:
        if abort:
            self.transport.abort()
        else:
            self.transport.close()
