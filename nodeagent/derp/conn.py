"""The client side of one DERP connection as a sans-IO state machine: :class:`ClientConnection`.

Owns the client's protocol state after the HTTP upgrade: the login (ServerKey → ClientInfo →
ServerInfo, or ClientInfo first when the server key is known in advance — "fast start"), the
automatic Pong answering a server's Ping, and turning frames into the event objects defined here
(:class:`ReceivedPacket`, :class:`PeerGone`, ...). It also builds the upgrade request and checks
the upgrade response, as pure functions.

Bytes in, events and bytes out: the caller feeds whatever the transport delivered to
:meth:`ClientConnection.receive_data` (or :meth:`~ClientConnection.feed` and then
:meth:`~ClientConnection.next_event` one event at a time), and writes
:meth:`~ClientConnection.data_to_send` after each of those calls. Frames the client initiates
come from methods returning their bytes (:meth:`~ClientConnection.send_packet`, ...). No
sockets, no asyncio, no clocks; :mod:`nodeagent.derp.client` is the asyncio adapter over it.

Errors: the peer's bytes make these methods raise :class:`~nodeagent.derp.frames.ProtocolError`
and nothing else — :class:`~nodeagent.derp.frames.FrameError` for a malformed frame,
:class:`DerpError` for a well-formed frame that the login does not allow. A protocol error is
fatal: the connection enters :attr:`ConnState.ERROR`, ignores further input and raises the same
error again from every later :meth:`~ClientConnection.next_event`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

from nodeagent.derp import frames as F
from nodeagent.derp.frames import ProtocolError

__all__ = [
    "ClientConnection",
    "ConnState",
    "DerpError",
    "Event",
    "Health",
    "KeepAlive",
    "PeerGone",
    "PeerPresent",
    "Ping",
    "Pong",
    "ProtocolError",
    "ReceivedPacket",
    "Restarting",
    "ServerInfo",
    "check_upgrade_response",
    "upgrade_request",
]


class DerpError(ProtocolError):
    """The server refused the upgrade or login, or broke the protocol."""


# --- events -------------------------------------------------------------------------------------

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


# --- HTTP upgrade -------------------------------------------------------------------------------

def upgrade_request(host: str, path: str = "/derp", *, fast_start: bool = False,
                    ideal_node: str | None = None, user_agent: str = "nodeagent-derp") -> bytes:
    """The ``GET`` that upgrades an HTTP/1.1 connection to DERP.

    ``host`` is the Host header value as sent (brackets and port included). With
    ``fast_start`` the server answers with no HTTP response at all: DERP frames follow at once.
    """
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: Upgrade",
             "Upgrade: DERP", f"User-Agent: {user_agent}"]
    if ideal_node:
        lines.append(f"Ideal-Node: {ideal_node}")
    if fast_start:
        lines.append("Derp-Fast-Start: 1")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_upgrade_response(head: bytes) -> None:
    """Raise :class:`DerpError` unless the response head (through the blank line) is a 101."""
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or status[1] != b"101":
        raise DerpError(f"server refused DERP upgrade: {head[:200]!r}")


# --- the state machine --------------------------------------------------------------------------

class ConnState(Enum):
    """Where a :class:`ClientConnection` is in its life."""

    AWAIT_SERVER_KEY = "await_server_key"  # nothing received yet; ClientInfo not sent
    AWAIT_SERVER_INFO = "await_server_info"  # ClientInfo queued or sent
    LOGGED_IN = "logged_in"  # ServerInfo received
    ERROR = "error"  # the peer broke the protocol; the connection is unusable


_T = F.FrameType
_RECV_PACKET = int(_T.RECV_PACKET)


class ClientConnection:
    """One client-side DERP connection's protocol state (see the module docstring).

    ``server_public_key`` known in advance means fast start: the ClientInfo is queued at once
    (read it with :meth:`data_to_send`), and a ServerKey the server still sends must match. Without
    it, the first frame must be ServerKey, and the ClientInfo is queued when it arrives.
    ``logged_in=True`` adopts a connection whose login was done elsewhere (the server key is then
    only used to open later ServerInfo frames).

    Events that arrive before the login ends are returned like any other; the first
    :class:`ServerInfo` event is the one that ends the login (:attr:`logged_in` is then true).
    A server's Ping is answered with a Pong (queued for :meth:`data_to_send`) when
    ``can_ack_pings``, and is reported as a :class:`Ping` event either way.
    """

    __slots__ = ("_client_info", "_closed", "_error", "_out", "_reader", "can_ack_pings",
                 "private_key", "public_key", "server_info", "server_public_key", "state")

    def __init__(self, private_key: bytes, server_public_key: bytes | None = None, *,
                 can_ack_pings: bool = True, mesh_key: str | None = None,
                 is_prober: bool = False, app_name: str = "", logged_in: bool = False) -> None:
        self.private_key = bytes(private_key)
        self.public_key = bytes(PrivateKey(self.private_key).public_key)
        self.server_public_key = bytes(server_public_key) if server_public_key else b""
        self.server_info: dict[str, Any] = {}
        self.can_ack_pings = can_ack_pings
        info: dict[str, Any] = {"version": F.PROTOCOL_VERSION, "CanAckPings": can_ack_pings}
        if mesh_key:
            info["meshKey"] = mesh_key
        if is_prober:
            info["IsProber"] = True
        if app_name:
            info["AppName"] = app_name
        self._client_info = info
        self._reader = F.FrameReader(F.MAX_INFO_LEN)
        self._out: list[bytes] = []
        self._error: ProtocolError | None = None
        self._closed = False
        if logged_in:
            self.state = ConnState.LOGGED_IN
        elif not self.server_public_key:
            self.state = ConnState.AWAIT_SERVER_KEY
        else:
            self.state = ConnState.AWAIT_SERVER_INFO
            self._queue_client_info()

    @property
    def logged_in(self) -> bool:
        return self.state is ConnState.LOGGED_IN

    # --- input ----------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes received from the server (after the upgrade). Ignored after an error."""
        if self._error is None:
            self._reader.feed(data)

    def next_event(self) -> Event | None:
        """The next event from the buffered bytes, or None when more bytes are needed.

        Frames that make no event (ServerKey, unknown types) are consumed silently. Raises
        :class:`~nodeagent.derp.frames.ProtocolError` (see the module docstring).
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        try:
            reader = self._reader
            while (fr := reader.next()) is not None:
                ev = self._handle(fr[0], fr[1])
                if ev is not None:
                    return ev
            return None
        except ProtocolError as e:
            self._error = e
            self.state = ConnState.ERROR
            self._out.clear()
            raise

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed ``data`` and return every event it completes. On a protocol error the events
        decoded before it from this call are lost with the exception (use :meth:`next_event`
        to get them one by one)."""
        self.feed(data)
        events: list[Event] = []
        while (ev := self.next_event()) is not None:
            events.append(ev)
        return events

    def data_to_send(self) -> bytes:
        """Bytes the connection itself wants sent (ClientInfo, Pongs), then forgets them."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self) -> None:
        """The transport is going away: drop queued output and stop answering pings."""
        self._closed = True
        self._out.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    # --- frames the client sends (no state change) ----------------------------------------------

    def send_packet(self, dst_key: bytes, pkt: bytes) -> bytes:
        return F.encode_send_packet(dst_key, pkt)

    def note_preferred(self, preferred: bool) -> bytes:
        return F.encode_note_preferred(preferred)

    def ping(self, data: bytes) -> bytes:
        return F.encode_ping(data)

    def watch_conns(self) -> bytes:
        return F.encode_watch_conns()

    def close_peer(self, key: bytes) -> bytes:
        return F.encode_close_peer(key)

    def forward_packet(self, src: bytes, dst: bytes, pkt: bytes) -> bytes:
        return F.encode_forward_packet(src, dst, pkt)

    # --- internals ------------------------------------------------------------------------------

    def _queue_client_info(self) -> None:
        try:
            frame = F.encode_client_info(self.private_key, self.server_public_key,
                                         self._client_info)
        except CryptoError:  # libsodium refuses a low-order key
            raise DerpError("server public key is not usable (low-order point)") from None
        self._out.append(frame)

    def _handle(self, ftype: int, payload: bytes) -> Event | None:
        state = self.state
        if state is ConnState.LOGGED_IN:
            return self._event(ftype, payload)
        if state is ConnState.AWAIT_SERVER_KEY:
            if ftype != _T.SERVER_KEY:
                raise DerpError(f"expected ServerKey frame, got type {ftype:#04x}")
            self.server_public_key = F.decode_server_key(payload)
            self._queue_client_info()
            self.state = ConnState.AWAIT_SERVER_INFO
            return None
        if ftype == _T.SERVER_KEY:
            # Fast start: the server still sends its key first; it must be the one we used.
            if F.decode_server_key(payload) != self.server_public_key:
                raise DerpError("server key differs from the one given for fast start")
            return None
        ev = self._event(ftype, payload)
        if ftype == _T.SERVER_INFO:
            self.state = ConnState.LOGGED_IN
        return ev

    def _event(self, ftype: int, payload: bytes) -> Event | None:
        if ftype == _RECV_PACKET:
            src, pkt = F.decode_recv_packet(payload)
            return ReceivedPacket(src, pkt)
        if ftype == _T.KEEP_ALIVE:
            return _KEEPALIVE
        if ftype == _T.PEER_GONE:
            return PeerGone(*F.decode_peer_gone(payload))
        if ftype == _T.PONG:
            return Pong(F.decode_pong(payload))
        if ftype == _T.PING:
            data = F.decode_pong(payload)  # any length ≥ 8: echo the first 8 bytes
            if self.can_ack_pings and not self._closed:
                self._out.append(F.encode_pong(data))
            return Ping(data)
        if ftype == _T.HEALTH:
            return Health(F.decode_health(payload))
        if ftype == _T.RESTARTING:
            return Restarting(*F.decode_restarting(payload))
        if ftype == _T.PEER_PRESENT:
            p = F.decode_peer_present(payload)
            return PeerPresent(p.key, p.ip, p.port, p.flags)
        if ftype == _T.SERVER_INFO:
            self.server_info = F.decode_server_info(self.private_key, self.server_public_key,
                                                    payload)
            return ServerInfo(self.server_info)
        return None  # ServerKey after the login and unknown types are skipped
