"""Asyncio DERP client: HTTP upgrade to DERP, login, then packets and events over one connection.

A thin adapter: it owns one TCP (optionally TLS) stream and moves bytes between it and the sans-IO
:class:`~nodeagent.derp.conn.ClientConnection`, which holds the protocol state (login, automatic
Pong replies, frames → events). It does the ``GET /derp`` upgrade (with ``Derp-Fast-Start: 1``
when the caller already knows the server key, so no HTTP response is awaited), waits until the
connection has logged in, and then hands out events. The event classes and :class:`DerpError`
are defined in :mod:`nodeagent.derp.conn` and re-exported here.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
from typing import Any
from urllib.parse import urlsplit

from nodeagent.derp.conn import (
    ClientConnection,
    DerpError,
    Event,
    Health,
    KeepAlive,
    PeerGone,
    PeerPresent,
    Ping,
    Pong,
    ReceivedPacket,
    Restarting,
    ServerInfo,
    check_upgrade_response,
    upgrade_request,
)

__all__ = [
    "DerpClient",
    "DerpError",
    "Event",
    "Health",
    "KeepAlive",
    "PeerGone",
    "PeerPresent",
    "Ping",
    "Pong",
    "ReceivedPacket",
    "Restarting",
    "ServerInfo",
]

_READ_SIZE = 256 << 10


class DerpClient:
    """One logged-in DERP connection. Create with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 private_key: bytes, server_public_key: bytes, *,
                 can_ack_pings: bool = True, conn: ClientConnection | None = None) -> None:
        """Wrap a stream already upgraded to DERP. ``conn`` is the protocol state to adopt
        (:meth:`connect` passes the one it logs in with); by default, a connection already
        logged in to ``server_public_key``."""
        self._reader = reader
        self._writer = writer
        if conn is None:
            conn = ClientConnection(private_key, server_public_key,
                                    can_ack_pings=can_ack_pings, logged_in=True)
        self._conn = conn
        self.public_key = conn.public_key
        self._closed = False
        self._early: list[Event] = []  # events that arrived before ServerInfo

    @property
    def server_public_key(self) -> bytes:
        return self._conn.server_public_key

    @property
    def server_info(self) -> dict[str, Any]:
        """The JSON of the latest ServerInfo frame."""
        return self._conn.server_info

    @classmethod
    async def connect(cls, url: str, private_key: bytes, *,
                      server_public_key: bytes | None = None,
                      ssl: ssl_mod.SSLContext | bool | None = None,
                      mesh_key: str | None = None, can_ack_pings: bool = True,
                      is_prober: bool = False, app_name: str = "",
                      ideal_node: str | None = None, timeout: float = 10.0,
                      dial_host: str | None = None) -> DerpClient:
        """Dial ``url`` (``http(s)://host[:port]/derp``), upgrade, log in, await ServerInfo.
        ``dial_host`` connects to that host instead (TLS name and Host header stay the URL's)."""
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"DERP url must be http(s)://host[:port]/path, got {url!r}")
        port = u.port or (443 if u.scheme == "https" else 80)
        if ssl is None and u.scheme == "https":
            ssl = True
        if u.scheme == "http":
            ssl = None
        host_hdr = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
        if ":" in u.hostname and u.port is None:
            host_hdr = f"[{u.hostname}]"
        elif ":" in u.hostname:
            host_hdr = f"[{u.hostname}]:{u.port}"
        path = (u.path or "/derp") + (f"?{u.query}" if u.query else "")

        async def run() -> DerpClient:
            reader, writer = await asyncio.open_connection(
                dial_host or u.hostname, port, ssl=ssl, limit=_READ_SIZE,
                server_hostname=u.hostname if ssl else None)
            try:
                return await cls._login(reader, writer, private_key, server_public_key,
                                        host_hdr, path, mesh_key, can_ack_pings, is_prober,
                                        app_name, ideal_node)
            except BaseException:
                writer.close()
                raise

        return await asyncio.wait_for(run(), timeout)

    @classmethod
    async def _login(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     private_key: bytes, server_key: bytes | None, host: str, path: str,
                     mesh_key: str | None, can_ack_pings: bool, is_prober: bool,
                     app_name: str, ideal_node: str | None) -> DerpClient:
        writer.write(upgrade_request(host, path, fast_start=server_key is not None,
                                     ideal_node=ideal_node))
        if server_key is None:
            check_upgrade_response(await reader.readuntil(b"\r\n\r\n"))
        conn = ClientConnection(private_key, server_key, can_ack_pings=can_ack_pings,
                                mesh_key=mesh_key, is_prober=is_prober, app_name=app_name)
        c = cls(reader, writer, private_key, conn.server_public_key,
                can_ack_pings=can_ack_pings, conn=conn)
        while True:
            ev = conn.next_event()
            c._flush()  # the ClientInfo (at once for fast start, else after ServerKey), Pongs
            if ev is None:
                try:
                    await c._fill()
                except ConnectionError as e:
                    # A server that refuses the login may say why first (a Health frame).
                    why = [x.problem for x in c._early if isinstance(x, Health) and x.problem]
                    if why:
                        raise ConnectionError(f"{e}: {why[-1]}") from None
                    raise
            elif conn.logged_in:
                return c  # ev is the ServerInfo that ended the login: now c.server_info
            else:
                c._early.append(ev)

    def _flush(self) -> None:
        """Write what the connection queued by itself (ClientInfo, Pongs)."""
        data = self._conn.data_to_send()
        if data:
            self._writer.write(data)

    async def _fill(self) -> None:
        data = await self._reader.read(_READ_SIZE)
        if not data:
            raise ConnectionError("DERP connection closed by server")
        self._conn.feed(data)

    async def recv(self) -> Event:
        """The next event; raises ConnectionError when the connection ends, and
        :class:`~nodeagent.derp.frames.ProtocolError` when the server breaks the protocol."""
        if self._early:
            return self._early.pop(0)
        conn = self._conn
        while True:
            ev = conn.next_event()
            self._flush()
            if ev is not None:
                return ev
            await self._fill()

    async def recv_batch(self, limit: int = 256) -> list[Event]:
        """Every event the buffered bytes complete (at most ``limit``, at least one: waits for
        bytes when none is ready). Cheaper than :meth:`recv` per event under load."""
        if self._early:
            out, self._early = self._early, []
            return out
        conn = self._conn
        while True:
            out: list[Event] = []
            while len(out) < limit and (ev := conn.next_event()) is not None:
                out.append(ev)
            self._flush()
            if out:
                return out
            await self._fill()

    async def send(self, dst_key: bytes, pkt: bytes) -> None:
        self._writer.write(self._conn.send_packet(dst_key, pkt))
        await self._writer.drain()

    def send_nowait(self, dst_key: bytes, pkt: bytes) -> None:
        """Queue a packet without waiting for the socket buffer (callers drain in batches)."""
        self._writer.write(self._conn.send_packet(dst_key, pkt))

    def write_nowait(self, frames: bytes) -> None:
        """Queue already-encoded frames (e.g. a derper's batch of ForwardPackets) unawaited."""
        self._writer.write(frames)

    def send_many_nowait(self, dst_key: bytes, pkts: list[bytes]) -> None:
        """Several packets to one destination in one write (a GSO burst from WireGuard)."""
        send_packet = self._conn.send_packet
        self._writer.write(b"".join([send_packet(dst_key, p) for p in pkts]))

    def write_buffer_size(self) -> int:
        """Bytes written but not yet taken by the socket."""
        return self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        await self._writer.drain()

    async def note_preferred(self, preferred: bool) -> None:
        self._writer.write(self._conn.note_preferred(preferred))
        await self._writer.drain()

    async def ping(self, data: bytes) -> None:
        self._writer.write(self._conn.ping(data))
        await self._writer.drain()

    async def watch_conns(self) -> None:
        self._writer.write(self._conn.watch_conns())
        await self._writer.drain()

    async def close_peer(self, key: bytes) -> None:
        self._writer.write(self._conn.close_peer(key))
        await self._writer.drain()

    async def forward_packet(self, src: bytes, dst: bytes, pkt: bytes) -> None:
        self._writer.write(self._conn.forward_packet(src, dst, pkt))
        await self._writer.drain()

    async def write_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (tests of server robustness)."""
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, ssl_mod.SSLError):
            pass

    @property
    def closed(self) -> bool:
        return self._closed
