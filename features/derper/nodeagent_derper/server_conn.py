"""One DERP client connection inside the relay: login, frame dispatch, bounded send queues.

A connection does its work synchronously in the transport's callbacks (no task per connection
for the raw TCP variant): bytes in → :class:`FrameReader` → dispatch → frames appended to the
destination's outgoing list, which the server flushes once per read pass (one write per
destination per pass); once logged in (no rate limit), :func:`server_relay.relay` does the
same with less work per packet. While a destination's transport is paused (its socket buffer is
full) its packets go to bounded per-kind queues instead, dropping the oldest — a slow receiver never
stalls the sender or anyone else. A connection whose writes stay paused longer than the server's
write timeout (Tailscale's derper: 2 s per write) is closed: a peer that stopped reading must not
hold its memory and its place in the registry forever.
"""

from __future__ import annotations

import asyncio
import hmac
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from nodeagent.derp import frames as F
from nodeagent_derper.server_relay import relay

if TYPE_CHECKING:
    from nodeagent_derper.server import DerpServer

T = F.FrameType
_SEND = int(T.SEND_PACKET)
_RECV = int(T.RECV_PACKET)
_KEY_LEN = F.KEY_LEN
_DISCO_MAGIC = F.DISCO_MAGIC
_DISCO_MIN = F.DISCO_MIN_LEN
_PKT_MAX = F.KEY_LEN + F.MAX_PACKET_SIZE
_RATE_CAP = F.MAX_PACKET_SIZE + 32  # one frame never needs more tokens than this
_FRAME_OVERHEAD = F.FRAME_HEADER_LEN + F.KEY_LEN
_hdr = F.frame_header
_NOT_HERE_RATE = 1.0  # PeerGone(not here) frames per second per connection, burst 3
_NOT_HERE_BURST = 3.0


class Conn:
    """Transport-independent part of a server-side DERP connection."""

    __slots__ = (
        "srv", "loop", "reader", "key", "info", "logged_in", "closed", "mesh", "preferred",
        "out", "q_ctrl", "q_disco", "q_other", "write_paused", "read_paused", "deferred",
        "sent_to", "dups", "tokens", "tok_last", "timer", "done", "dirty", "watcher",
        "ng_tokens", "ng_last", "remote", "not_ideal", "connected_at", "pong_queued",
        "verify_task", "wtimer", "__weakref__",
    )

    def __init__(self, srv: DerpServer, remote: tuple[Any, ...] | None, not_ideal: bool) -> None:
        self.srv = srv
        self.loop = asyncio.get_running_loop()
        self.reader = F.FrameReader(F.MAX_CLIENT_INFO_LEN)
        self.key: bytes = b""
        self.info: F.ClientInfo | None = None
        self.logged_in = False
        self.closed = False
        self.mesh = False
        self.preferred = False
        self.out: list[bytes] = []
        # Queues exist only once the socket has backed up (idle clients cost less memory).
        self.q_ctrl: deque[bytes] | None = None
        self.q_disco: deque[bytes] | None = None
        self.q_other: deque[bytes] | None = None
        self.write_paused = False
        self.read_paused = False
        self.deferred: tuple[int, bytes] | None = None
        self.sent_to: set[bytes] = set()
        self.dups = False
        self.tokens = float(srv.rate_burst)
        self.tok_last = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.dirty = False
        self.watcher = False
        self.ng_tokens = _NOT_HERE_BURST
        self.ng_last = 0.0
        self.remote = remote
        self.not_ideal = not_ideal
        self.connected_at = self.loop.time()
        self.pong_queued = False
        self.verify_task: asyncio.Task[None] | None = None
        self.wtimer: asyncio.TimerHandle | None = None

    # --- transport hooks (subclasses) ---------------------------------------------------------

    def _write_now(self, data: bytes) -> None:
        raise NotImplementedError

    def _pause_reading(self) -> None:
        raise NotImplementedError

    def _resume_reading(self) -> None:
        raise NotImplementedError

    def _close_transport(self, abort: bool) -> None:
        raise NotImplementedError

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, initial: bytes = b"") -> None:
        """Send ServerKey, arm the handshake timer, and process bytes that arrived early."""
        srv = self.srv
        srv.live.add(self)
        self.timer = self.loop.call_later(srv.handshake_timeout, self._handshake_expired)
        self._write_now(srv.server_key_frame)
        if initial:
            self.on_data(initial)

    def _handshake_expired(self) -> None:
        self.timer = None
        if not self.logged_in:
            self.close("handshake_timeout")

    def _keepalive(self) -> None:
        if self.closed:
            return
        self.send_ctrl(F.KEEPALIVE_FRAME)
        self.srv.flush()
        self._arm_keepalive()

    def _arm_keepalive(self) -> None:
        iv = self.srv.keepalive_interval
        self.timer = self.loop.call_later(iv + random.random() * min(5.0, iv * 0.1),
                                          self._keepalive)

    def close(self, reason: str, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        srv = self.srv
        srv.closed_reasons[reason] = srv.closed_reasons.get(reason, 0) + 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.verify_task is not None:
            self.verify_task.cancel()
        if self.wtimer is not None:
            self.wtimer.cancel()
            self.wtimer = None
        if self.logged_in:
            srv.unregister(self)
        srv.live.discard(self)
        for q, disco in ((self.q_disco, True), (self.q_other, False)):
            if q:
                for fr in q:
                    srv.drop("gone_disconnected", disco, len(fr) - _FRAME_OVERHEAD)
                q.clear()
        if self.out and not abort:
            self._write_now(b"".join(self.out))
        self.out.clear()
        self._close_transport(abort)
        if not self.done.done():
            self.done.set_result(None)

    def on_lost(self) -> None:
        self.close("eof")

    # --- inbound ------------------------------------------------------------------------------

    def on_data(self, data: bytes) -> None:
        if self.closed:
            return
        if (self.logged_in and not self.read_paused and not self.dups
                and (self.mesh or self.srv.rate is None)):
            relay(self, data)
        else:
            self.reader.feed(data)
            if not self.read_paused:
                self.process()
        self.srv.flush()

    def process(self) -> None:
        rd = self.reader
        rate = self.srv.rate
        while not self.closed and not self.read_paused:
            try:
                fr = rd.next()
            except F.FrameError:
                self.close("frame_too_large")
                return
            if fr is None:
                return
            if not self.logged_in:
                self._login(fr[0], fr[1])
                continue
            if rate is not None and not self.mesh and not self._take_tokens(len(fr[1])):
                self.deferred = fr
                return
            self.handle(fr[0], fr[1])

    def _take_tokens(self, n: int) -> bool:
        srv = self.srv
        now = self.loop.time()
        self.tokens = min(srv.rate_burst, self.tokens + (now - self.tok_last) * srv.rate)
        self.tok_last = now
        self.tokens -= min(n, _RATE_CAP)
        if self.tokens >= 0:
            return True
        # Reserve the tokens and stop reading until they exist: TCP back-pressure, no drop.
        srv.rate_limit_waits += 1
        self.read_paused = True
        self._pause_reading()
        self.loop.call_later(-self.tokens / srv.rate, self._resume)
        return False

    def _resume(self) -> None:
        if self.closed:
            return
        self.read_paused = False
        fr = self.deferred
        if fr is not None:
            self.deferred = None
            self.handle(fr[0], fr[1])
        self.process()
        self.srv.flush()
        if not self.read_paused and not self.closed:
            self._resume_reading()

    def _login(self, ftype: int, payload: bytes) -> None:
        srv = self.srv
        if ftype != T.CLIENT_INFO:
            self.close("bad_login")
            return
        try:
            info = F.decode_client_info(srv.private_key, payload)
        except F.FrameError:
            self.close("bad_client_info")
            return
        self.info = info
        self.key = info.key
        self.mesh = (info.mesh_key is not None and srv.mesh_key_bytes is not None
                     and hmac.compare_digest(info.mesh_key, srv.mesh_key_bytes))
        if info.mesh_key is not None and not self.mesh:
            # A mesh key that is not ours: refused (saying why), not demoted to a plain client.
            self.send_ctrl(F.encode_health("mesh key mismatch"))
            self.close("bad_mesh_key")
            return
        if srv.verify_client is None or self.mesh:
            self._complete_login()
            return
        self.read_paused = True
        self._pause_reading()
        self.verify_task = self.loop.create_task(self._verify(info))

    async def _verify(self, info: F.ClientInfo) -> None:
        try:
            ok = await self.srv.verify_client(  # type: ignore[misc]
                info.key, dict(info.raw), self.remote)
        except asyncio.CancelledError:
            raise
        except Exception:
            ok = False
        self.verify_task = None
        if self.closed:
            return
        if not ok:
            # A refusal that says why (verify.Verdict) is told to the client in a Health frame.
            why = getattr(ok, "message", "")
            if why:
                self.send_ctrl(F.encode_health(why))
            self.close("not_admitted")
            return
        self._complete_login()
        self._resume()

    def _complete_login(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.logged_in = True
        self.reader.max_len = F.MAX_FRAME_AFTER_LOGIN
        srv = self.srv
        # ServerInfo first: frames caused by registering (e.g. a duplicate-key Health) follow it.
        self.send_ctrl(F.encode_server_info(srv.private_key, self.key, srv.server_info))
        srv.register(self)
        self._arm_keepalive()
        if srv.on_login is not None:
            srv.on_login(self)

    def handle(self, ftype: int, payload: bytes) -> None:
        srv = self.srv
        if self.dups:
            srv.active[self.key] = self  # last writer is active
        if ftype == _SEND:
            n = len(payload)
            if n < _KEY_LEN or n > _PKT_MAX:
                self.close("bad_frame")
                return
            dst = payload[:_KEY_LEN]
            plen = n - _KEY_LEN
            disco = plen >= _DISCO_MIN and payload.startswith(_DISCO_MAGIC, _KEY_LEN)
            srv.packets_received += 1
            srv.bytes_received += plen
            if disco:
                srv.disco_received += 1
            d = srv.active.get(dst)
            if d is None:
                fwd = srv.remote.get(dst)
                if fwd is None:
                    self._no_dest(dst, disco, plen)
                else:
                    fwd.forward(self.key, payload, disco)  # connected on a mesh peer
                return
            if dst not in self.sent_to:
                self.sent_to.add(dst)
            d.send_packet(_hdr(_RECV, n) + self.key + payload[_KEY_LEN:], disco)
            return
        if ftype == T.PING:
            try:
                data = F.decode_ping(payload)
            except F.FrameError:
                self.close("bad_frame")
                return
            srv.got_ping += 1
            if not self.pong_queued:
                srv.sent_pong += 1
                self.send_ctrl(F.encode_pong(data), pong=True)
            return
        if ftype == T.NOTE_PREFERRED:
            try:
                pref = F.decode_note_preferred(payload)
            except F.FrameError:
                self.close("bad_frame")
                return
            srv.note_preferred(self, pref)
            return
        if ftype in (T.FORWARD_PACKET, T.WATCH_CONNS, T.CLOSE_PEER):
            if not self.mesh:
                self.close("unprivileged_frame")
                return
            self._mesh_frame(ftype, payload)
            return
        srv.unknown_frames += 1

    def _mesh_frame(self, ftype: int, payload: bytes) -> None:
        srv = self.srv
        try:
            if ftype == T.FORWARD_PACKET:
                src, dst, pkt = F.decode_forward_packet(payload)
                disco = F.looks_like_disco(pkt)
                srv.forwarded_in += 1
                d = srv.active.get(dst)
                if d is None:
                    srv.drop("unknown_dest_on_fwd", disco, len(pkt))
                    return
                d.send_packet(F.encode_recv_packet(src, pkt), disco)
            elif ftype == T.WATCH_CONNS:
                F.decode_empty(payload, "WatchConns")
                if self.key != srv.public_key:
                    srv.add_watcher(self)
            else:
                srv.close_key(F.decode_close_peer(payload))
        except F.FrameError:
            self.close("bad_frame")

    def _no_dest(self, dst: bytes, disco: bool, plen: int) -> None:
        srv = self.srv
        srv.drop("dup_client" if dst in srv.conns else "unknown_dest", disco, plen)
        if not disco:
            return
        now = self.loop.time()
        self.ng_tokens = min(_NOT_HERE_BURST,
                             self.ng_tokens + (now - self.ng_last) * _NOT_HERE_RATE)
        self.ng_last = now
        if self.ng_tokens >= 1.0:
            self.ng_tokens -= 1.0
            srv.peer_gone_not_here += 1
            self.send_ctrl(F.encode_peer_gone(dst, F.PeerGoneReason.NOT_HERE))

    # --- outbound -----------------------------------------------------------------------------

    def send_packet(self, frame: bytes, disco: bool) -> None:
        srv = self.srv
        if self.closed:
            srv.drop("gone_disconnected", disco, len(frame) - _FRAME_OVERHEAD)
            return
        if not self.write_paused:
            self.out.append(frame)
            srv.packets_sent += 1
            srv.bytes_sent += len(frame) - _FRAME_OVERHEAD
            if not self.dirty:
                self.dirty = True
                srv.dirty.append(self)
            return
        q = self.q_disco if disco else self.q_other
        if q is None:
            q = deque()
            if disco:
                self.q_disco = q
            else:
                self.q_other = q
        if len(q) >= srv.send_queue_depth:
            old = q.popleft()
            srv.drop("queue_head", disco, len(old) - _FRAME_OVERHEAD)
        q.append(frame)

    def send_ctrl(self, frame: bytes, pong: bool = False) -> None:
        if self.closed:
            return
        if not self.write_paused:
            self.out.append(frame)
            if not self.dirty:
                self.dirty = True
                self.srv.dirty.append(self)
            return
        if pong:
            self.pong_queued = True
        q = self.q_ctrl
        if q is None:
            q = self.q_ctrl = deque()
        if len(q) >= 4 * self.srv.send_queue_depth:
            q.popleft()
        q.append(frame)

    def flush_out(self) -> None:
        self.dirty = False
        out = self.out
        if out and not self.closed:
            self._write_now(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        wt = self.srv.write_timeout
        if wt and self.wtimer is None and not self.closed:
            self.wtimer = self.loop.call_later(wt, self._write_stalled)

    def _write_stalled(self) -> None:
        self.wtimer = None
        if self.write_paused:
            self.close("write_timeout", abort=True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.wtimer is not None:
            self.wtimer.cancel()
            self.wtimer = None
        if self.closed:
            return
        srv = self.srv
        parts: list[bytes] = list(self.q_ctrl or ())
        self.q_ctrl = None
        self.pong_queued = False
        for q in (self.q_disco, self.q_other):
            if not q:
                continue
            for fr in q:
                srv.packets_sent += 1
                srv.bytes_sent += len(fr) - _FRAME_OVERHEAD
            parts.extend(q)
            q.clear()
        if parts:
            self._write_now(b"".join(parts))
