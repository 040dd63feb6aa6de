"""The DERP relay server: the ``/derp`` HTTP route, the client registry, delivery and metrics.

How the raw ``Upgrade: DERP`` stream is taken from aiohttp: the handler swaps the connection's
asyncio protocol (``request.transport.set_protocol``) for a :class:`RawConn`, writes the raw
``101 Switching Protocols`` (none under fast start), and keeps the handler awaiting the DERP
connection's end; aiohttp then finds the transport closed and writes nothing more. The RawConn
passes ``connection_lost`` on to the protocol it replaced, so aiohttp forgets the connection.
aiohttp's HTTP parser only supports ``websocket`` upgrades, so bytes that arrive in the same
read as the request (a fast-start client pipelining ClientInfo) would be swallowed by it:
listeners that need reliable fast start wrap aiohttp's protocol factory with
:meth:`DerpServer.wrap_protocol_factory`, which holds such bytes back and hands them to the
DERP connection. The WebSocket variant uses ``aiohttp.web.WebSocketResponse(protocols=("derp",))``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from nacl.public import PrivateKey

from nodeagent.derp import frames as F
from nodeagent_derper.server_conn import Conn
from nodeagent_derper.server_raw import RawConn
from nodeagent_derper.server_relay import tune_malloc
from nodeagent_derper.server_sniff import SniffProtocol
from nodeagent_derper.server_stats import DerpCollector
from nodeagent_derper.server_ws import WsConn

DUP_HEALTH = "another connection is using this node key; the most recent sender gets packets"
RESTART_RECONNECT_MS = 1000
RESTART_TRY_FOR_MS = 60000
DEFAULT_WRITE_TIMEOUT = 2.0  # as Tailscale's derper (--tcp-write-timeout)
DROP_REASONS = ("unknown_dest", "unknown_dest_on_fwd", "gone_disconnected", "queue_head",
                "queue_tail", "write_error", "dup_client", "mesh_write_full", "mesh_down")

# (node key, ClientInfo JSON, peer address) → admit? A falsy answer with a ``message`` attribute
# (nodeagent_derper.verify.Verdict) is sent to the refused client in a Health frame.
VerifyClient = Callable[[bytes, dict[str, Any], Any], Awaitable[Any]]


class DerpServer:
    """A DERP relay. Route ``/derp`` to :meth:`handle_http`; call :meth:`shutdown` on exit."""

    def __init__(self, private_key: bytes, *, mesh_key: str | None = None,
                 verify_client: VerifyClient | None = None, send_queue_depth: int = 32,
                 rate_limit_bytes_per_sec: float | None = None,
                 rate_limit_burst: int | None = None, handshake_timeout: float = 10.0,
                 keepalive_interval: float = F.KEEPALIVE_INTERVAL,
                 write_timeout: float = DEFAULT_WRITE_TIMEOUT,
                 registry: Any = None) -> None:
        self.private_key = bytes(private_key)
        self.public_key = bytes(PrivateKey(self.private_key).public_key)
        self.mesh_key_bytes = bytes.fromhex(mesh_key.strip()) if mesh_key else None
        if self.mesh_key_bytes is not None and len(self.mesh_key_bytes) != 32:
            raise ValueError("mesh key must be 64 hex digits")
        self.verify_client = verify_client
        self.send_queue_depth = send_queue_depth
        self.handshake_timeout = handshake_timeout
        self.keepalive_interval = keepalive_interval
        # Seconds a connection's writes may stay paused before it is closed; 0 disables.
        self.write_timeout = write_timeout
        self.server_key_frame = F.encode_server_key(self.public_key)
        self.server_info: dict[str, Any] = {"version": F.PROTOCOL_VERSION}
        self.rate: float | None = None
        self.rate_burst = 0
        self.set_rate_limit(rate_limit_bytes_per_sec, rate_limit_burst)
        self._upgrade_101 = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
            f"Derp-Version: {F.PROTOCOL_VERSION}\r\nDerp-Public-Key: {self.public_key.hex()}"
            "\r\n\r\n").encode()
        # registry
        self.live: set[Conn] = set()
        self.conns: dict[bytes, list[Conn]] = {}
        self.active: dict[bytes, Conn] = {}
        self.watchers: set[Conn] = set()
        # Client keys connected on mesh peers → the peer's forwarder (``mesh.MeshPeer``, with
        # ``forward(src, dst_and_packet, disco)``); owned and filled by ``mesh.Mesh``.
        self.remote: dict[bytes, Any] = {}
        self.dirty: list[Conn] = []
        self.held: dict[Any, SniffProtocol] = {}
        # Called with each connection that completes its login (the app frees the connection's
        # not-yet-authenticated slot).
        self.on_login: Callable[[Conn], None] | None = None
        self._closing = False
        # counters (plain ints: the hot path must not pay for a metrics library)
        self.accepts = 0
        self.websocket_accepts = 0
        self.home_conns = 0
        self.packets_received = self.bytes_received = self.disco_received = 0
        self.packets_sent = self.bytes_sent = 0
        self.forwarded_in = self.forwarded_out = 0
        self.got_ping = self.sent_pong = 0
        self.peer_gone_disconnected = self.peer_gone_not_here = 0
        self.unknown_frames = 0
        self.total_dup_conns = 0
        self.home_moves_in = self.home_moves_out = 0
        self.rate_limit_waits = 0
        self.drops: dict[tuple[str, str], list[int]] = {
            (r, k): [0, 0] for r in DROP_REASONS for k in ("disco", "other")}
        self.closed_reasons: dict[str, int] = {}
        if registry is None:
            from prometheus_client import CollectorRegistry
            registry = CollectorRegistry()
        self.registry = registry
        registry.register(DerpCollector(self))
        tune_malloc()  # a relay process's reads: heap buffers, not an mmap per read

    # --- HTTP entry points ----------------------------------------------------------------------

    async def handle_http(self, request: web.Request) -> web.StreamResponse:
        """The ``/derp`` route: raw ``Upgrade: DERP`` or the WebSocket variant."""
        upgrade = request.headers.get("Upgrade", "").strip().lower()
        if upgrade == "websocket" and "derp" in request.headers.get("Sec-WebSocket-Protocol", ""):
            return await self._handle_ws(request)
        if upgrade not in ("derp", "websocket"):
            return web.Response(status=426, text="DERP requires connection upgrade")
        if self._closing:
            return web.Response(status=503, text="DERP server shutting down")
        transport = request.transport
        if transport is None or transport.is_closing():
            return web.Response(status=500, text="connection lost")
        fast = request.headers.get("Derp-Fast-Start", "") == "1"
        sniff = self.held.pop(transport, None)
        early = sniff.take() if sniff is not None else b""
        conn = RawConn(self, transport, transport.get_extra_info("peername"),
                       bool(request.headers.get("Ideal-Node")), transport.get_protocol())
        transport.set_protocol(conn)
        self.accepts += 1
        if not fast:
            transport.write(self._upgrade_101)
        conn.start(early)
        try:
            await conn.done
        finally:
            conn.close("handler_cancelled")
            with contextlib.suppress(Exception):
                request.protocol.force_close()
        # The transport is closed: aiohttp's attempt to send this response fails quietly.
        return web.StreamResponse(status=101)

    async def _handle_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("derp",), compress=False, autoping=True,
                                   max_msg_size=4 * F.MAX_FRAME_AFTER_LOGIN)
        await ws.prepare(request)
        if ws.ws_protocol != "derp":
            await ws.close(code=1008, message=b"subprotocol derp required")
            return ws
        self.accepts += 1
        self.websocket_accepts += 1
        conn = WsConn(self, ws, request.transport.get_extra_info("peername")
                      if request.transport else None, bool(request.headers.get("Ideal-Node")))
        try:
            await conn.run()
        finally:
            conn.close("handler_cancelled")
            await asyncio.sleep(0)
        return ws

    async def handle_probe(self, request: web.Request) -> web.StreamResponse:
        """``/derp/probe`` and ``/derp/latency-check``."""
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="bogus probe method")
        return web.Response(status=200, headers={"Access-Control-Allow-Origin": "*"})

    def wrap_protocol_factory(self, factory: Callable[[], asyncio.Protocol]
                              ) -> Callable[[], asyncio.Protocol]:
        """Wrap aiohttp's protocol factory (``runner.server``) for reliable fast start."""
        return lambda: SniffProtocol(self, factory())

    # --- registry and delivery ------------------------------------------------------------------

    def flush(self) -> None:
        dirty = self.dirty
        if dirty:
            for c in dirty:
                c.flush_out()
            dirty.clear()

    def drop(self, reason: str, disco: bool, nbytes: int) -> None:
        d = self.drops[(reason, "disco" if disco else "other")]
        d[0] += 1
        d[1] += nbytes

    def register(self, conn: Conn) -> None:
        key = conn.key
        lst = self.conns.get(key)
        if lst is None:
            self.conns[key] = [conn]
        else:
            lst.append(conn)
            self.total_dup_conns += 1
            health = F.encode_health(DUP_HEALTH)
            for c in lst:
                c.dups = True
                c.send_ctrl(health)
        self.active[key] = conn
        if self.watchers:
            pp = self._peer_present(conn)
            for w in self.watchers:
                w.send_ctrl(pp)

    def unregister(self, conn: Conn) -> None:
        key = conn.key
        lst = self.conns.get(key)
        if lst is None or conn not in lst:
            return
        lst.remove(conn)
        if conn.preferred:
            self.home_conns -= 1
        self.watchers.discard(conn)
        if lst:
            if self.active.get(key) is conn:
                self.active[key] = lst[-1]
            if len(lst) == 1:
                lst[0].dups = False
                lst[0].send_ctrl(F.encode_health(""))
            self.flush()
            return
        del self.conns[key]
        self.active.pop(key, None)
        gone = F.encode_peer_gone(key, F.PeerGoneReason.DISCONNECTED)
        for dst in conn.sent_to:
            d = self.active.get(dst)
            if d is not None:
                self.peer_gone_disconnected += 1
                d.send_ctrl(gone)
        for w in self.watchers:
            w.send_ctrl(gone)
        self.flush()

    def note_preferred(self, conn: Conn, preferred: bool) -> None:
        if preferred == conn.preferred:
            return
        conn.preferred = preferred
        self.home_conns += 1 if preferred else -1
        if conn.loop.time() - conn.connected_at > 5.0:
            if preferred:
                self.home_moves_in += 1
            else:
                self.home_moves_out += 1

    def _peer_present(self, c: Conn) -> bytes:
        flags = 0
        if c.mesh:
            flags |= F.PEER_PRESENT_MESH_PEER
        if c.info is not None and c.info.is_prober:
            flags |= F.PEER_PRESENT_PROBER
        if c.not_ideal:
            flags |= F.PEER_PRESENT_NOT_IDEAL
        ip, port = bytes(16), 0
        if c.remote:
            import ipaddress
            with contextlib.suppress(ValueError, IndexError, TypeError):
                ip = ipaddress.ip_address(c.remote[0]).packed
                port = int(c.remote[1])
        return F.encode_peer_present(c.key, ip, port, flags or F.PEER_PRESENT_REGULAR)

    def add_watcher(self, conn: Conn) -> None:
        self.watchers.add(conn)
        for c in self.active.values():
            conn.send_ctrl(self._peer_present(c))

    def close_key(self, key: bytes) -> None:
        for c in list(self.conns.get(key, ())):
            c.close("closed_by_mesh_peer")

    # --- lifecycle and introspection -------------------------------------------------------------

    def set_rate_limit(self, bytes_per_sec: float | None, burst: int | None) -> None:
        """The per-client receive rate limit (None or 0: unlimited). Live connections use the
        new values from their next frame on; ServerInfo of later logins announces them."""
        self.rate = bytes_per_sec or None
        self.rate_burst = max(burst or 0, F.MAX_PACKET_SIZE + 32) if self.rate else 0
        info: dict[str, Any] = {"version": F.PROTOCOL_VERSION}
        if self.rate:
            info["TokenBucketBytesPerSecond"] = int(self.rate)
            info["TokenBucketBytesBurst"] = int(self.rate_burst)
        self.server_info = info

    async def shutdown(self, graceful: bool = True) -> None:
        """Tell every client to come back (Restarting), then close all connections."""
        self._closing = True
        conns = list(self.live)
        if graceful:
            restarting = F.encode_restarting(RESTART_RECONNECT_MS, RESTART_TRY_FOR_MS)
            for c in conns:
                if c.logged_in:
                    c.send_ctrl(restarting)
            self.flush()
        for c in conns:
            c.close("shutdown", abort=not graceful)
        if conns:
            await asyncio.wait([c.done for c in conns], timeout=5.0)
        await asyncio.sleep(0)

    def stats(self) -> dict[str, Any]:
        dup_keys = sum(1 for lst in self.conns.values() if len(lst) > 1)
        return {
            "accepts": self.accepts,
            "websocket_accepts": self.websocket_accepts,
            "current_connections": len(self.live),
            "current_home_connections": self.home_conns,
            "clients_total": len(self.conns),
            "current_dup_client_keys": dup_keys,
            "current_dup_client_conns": sum(len(v) for v in self.conns.values() if len(v) > 1),
            "total_dup_client_conns": self.total_dup_conns,
            "watchers": len(self.watchers),
            "packets_received": self.packets_received,
            "bytes_received": self.bytes_received,
            "packets_received_disco": self.disco_received,
            "packets_sent": self.packets_sent,
            "bytes_sent": self.bytes_sent,
            "packets_forwarded_in": self.forwarded_in,
            "packets_forwarded_out": self.forwarded_out,
            "got_ping": self.got_ping,
            "sent_pong": self.sent_pong,
            "peer_gone_disconnected_frames": self.peer_gone_disconnected,
            "peer_gone_not_here_frames": self.peer_gone_not_here,
            "unknown_frames": self.unknown_frames,
            "home_moves_in": self.home_moves_in,
            "home_moves_out": self.home_moves_out,
            "rate_limit_waits": self.rate_limit_waits,
            "mesh_key_refusals": self.closed_reasons.get("bad_mesh_key", 0),
            "remote_clients": len(self.remote),
            "packets_dropped": {f"{r}/{k}": v[0] for (r, k), v in self.drops.items() if v[0]},
            "bytes_dropped": {f"{r}/{k}": v[1] for (r, k), v in self.drops.items() if v[0]},
            "closed": dict(self.closed_reasons),
        }
