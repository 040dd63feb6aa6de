"""Asyncio DERP client: HTTP upgrade to DERP, login, then packets and events over one connection.

The adapter over :mod:`nodeagent.derp.frames`: it owns one TCP (optionally TLS) stream. It does
the ``GET /derp`` upgrade (with ``Derp-Fast-Start: 1`` when the caller already knows the server
key, so no HTTP response is awaited), sends the boxed ClientInfo, waits for ServerInfo, and then
turns incoming frames into small event objects. Server pings are answered automatically.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from nacl.public import PrivateKey

from nodeagent.derp import frames as F

_READ_SIZE = 256 << 10


@dataclass(slots=True, frozen=True)
class ReceivedPacket:
    src: bytes
    data: bytes


@dataclass(slots=True, frozen=True)
class PeerGone:
    key: bytes
    reason: int


@dataclass(slots=True, frozen=True)
class PeerPresent:
    key: bytes
    ip: bytes | None
    port: int
    flags: int


@dataclass(slots=True, frozen=True)
class Pong:
    data: bytes


@dataclass(slots=True, frozen=True)
class Ping:
    data: bytes


@dataclass(slots=True, frozen=True)
class KeepAlive:
    pass


@dataclass(slots=True, frozen=True)
class Health:
    problem: str  # empty: healthy again


@dataclass(slots=True, frozen=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(slots=True, frozen=True)
class ServerInfo:
    info: dict[str, Any]


Event = (ReceivedPacket | PeerGone | PeerPresent | Pong | Ping | KeepAlive | Health | Restarting
         | ServerInfo)
_KEEPALIVE = KeepAlive()


class DerpError(Exception):
    """The server refused the upgrade or login, or broke the protocol."""


class DerpClient:
    """One logged-in DERP connection. Create with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 private_key: bytes, server_public_key: bytes, *,
                 can_ack_pings: bool = True) -> None:
        self._reader = reader
        self._writer = writer
        self._private = private_key
        self.public_key = bytes(PrivateKey(private_key).public_key)
        self.server_public_key = server_public_key
        self.server_info: dict[str, Any] = {}
        self._frames = F.FrameReader(F.MAX_INFO_LEN)
        self._can_ack_pings = can_ack_pings
        self._closed = False
        self._early: list[Event] = []  # events that arrived before ServerInfo

    @classmethod
    async def connect(cls, url: str, private_key: bytes, *,
                      server_public_key: bytes | None = None,
                      ssl: ssl_mod.SSLContext | bool | None = None,
                      mesh_key: str | None = None, can_ack_pings: bool = True,
                      is_prober: bool = False, app_name: str = "",
                      ideal_node: str | None = None, timeout: float = 10.0) -> DerpClient:
        """Dial ``url`` (``http(s)://host[:port]/derp``), upgrade, log in, await ServerInfo."""
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
                u.hostname, port, ssl=ssl, limit=_READ_SIZE,
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
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: Upgrade",
                 "Upgrade: DERP", "User-Agent: nodeagent-derp"]
        if ideal_node:
            lines.append(f"Ideal-Node: {ideal_node}")
        if server_key is not None:
            lines.append("Derp-Fast-Start: 1")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if server_key is None:
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0].split(b" ")
            if len(status) < 2 or status[1] != b"101":
                raise DerpError(f"server refused DERP upgrade: {head[:200]!r}")
        c = cls(reader, writer, private_key, server_key or b"", can_ack_pings=can_ack_pings)
        if server_key is None:
            ftype, payload = await c._read_frame()
            if ftype != F.FrameType.SERVER_KEY:
                raise DerpError(f"expected ServerKey frame, got type {ftype:#04x}")
            c.server_public_key = F.decode_server_key(payload)
        info: dict[str, Any] = {"version": F.PROTOCOL_VERSION, "CanAckPings": can_ack_pings}
        if mesh_key:
            info["meshKey"] = mesh_key
        if is_prober:
            info["IsProber"] = True
        if app_name:
            info["AppName"] = app_name
        writer.write(F.encode_client_info(private_key, c.server_public_key, info))
        while True:
            ftype, payload = await c._read_frame()
            if ftype == F.FrameType.SERVER_INFO:
                c.server_info = F.decode_server_info(private_key, c.server_public_key, payload)
                return c
            if ftype == F.FrameType.SERVER_KEY:
                # Fast start: the server still sends its key first; it must be the one we used.
                if F.decode_server_key(payload) != c.server_public_key:
                    raise DerpError("server key differs from the one given for fast start")
                continue
            ev = c._event(ftype, payload)
            if ev is not None:
                c._early.append(ev)

    async def _read_frame(self) -> tuple[int, bytes]:
        while True:
            fr = self._frames.next()
            if fr is not None:
                return fr
            data = await self._reader.read(_READ_SIZE)
            if not data:
                raise ConnectionError("DERP connection closed by server")
            self._frames.feed(data)

    async def recv(self) -> Event:
        """The next event; raises ConnectionError when the connection ends."""
        if self._early:
            return self._early.pop(0)
        while True:
            ftype, payload = await self._read_frame()
            ev = self._event(ftype, payload)
            if ev is not None:
                return ev

    def _event(self, ftype: int, payload: bytes) -> Event | None:
        T = F.FrameType
        if ftype == T.RECV_PACKET:
            src, pkt = F.decode_recv_packet(payload)
            return ReceivedPacket(src, pkt)
        if ftype == T.KEEP_ALIVE:
            return _KEEPALIVE
        if ftype == T.PEER_GONE:
            return PeerGone(*F.decode_peer_gone(payload))
        if ftype == T.PONG:
            return Pong(F.decode_pong(payload))
        if ftype == T.PING:
            data = F.decode_pong(payload)
            if self._can_ack_pings and not self._closed:
                self._writer.write(F.encode_pong(data))
            return Ping(data)
        if ftype == T.HEALTH:
            return Health(F.decode_health(payload))
        if ftype == T.RESTARTING:
            return Restarting(*F.decode_restarting(payload))
        if ftype == T.PEER_PRESENT:
            p = F.decode_peer_present(payload)
            return PeerPresent(p.key, p.ip, p.port, p.flags)
        if ftype == T.SERVER_INFO:
            self.server_info = F.decode_server_info(self._private, self.server_public_key,
                                                    payload)
            return ServerInfo(self.server_info)
        return None  # ServerKey after fast start and unknown types are skipped

    async def send(self, dst_key: bytes, pkt: bytes) -> None:
        self._writer.write(F.encode_send_packet(dst_key, pkt))
        await self._writer.drain()

    def send_nowait(self, dst_key: bytes, pkt: bytes) -> None:
        """Queue a packet without waiting for the socket buffer (callers drain in batches)."""
        self._writer.write(F.encode_send_packet(dst_key, pkt))

    async def drain(self) -> None:
        await self._writer.drain()

    async def note_preferred(self, preferred: bool) -> None:
        self._writer.write(F.encode_note_preferred(preferred))
        await self._writer.drain()

    async def ping(self, data: bytes) -> None:
        self._writer.write(F.encode_ping(data))
        await self._writer.drain()

    async def watch_conns(self) -> None:
        self._writer.write(F.encode_watch_conns())
        await self._writer.drain()

    async def close_peer(self, key: bytes) -> None:
        self._writer.write(F.encode_close_peer(key))
        await self._writer.drain()

    async def forward_packet(self, src: bytes, dst: bytes, pkt: bytes) -> None:
        self._writer.write(F.encode_forward_packet(src, dst, pkt))
        await self._writer.drain()

    async def write_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (tests of server robustness)."""
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, ssl_mod.SSLError):
            pass

    @property
    def closed(self) -> bool:
        return self._closed
