"""DERP frame codec (sans-IO): constants, an incremental frame reader, and frame builders/parsers.

Wire facts come from specs/derp.md: a frame is a 1-byte type, a 4-byte big-endian payload length,
then the payload. ClientInfo/ServerInfo carry NaCl-boxed JSON. Nothing here does I/O; parsers of
network bytes raise :class:`FrameError` (and nothing else) on malformed input. The client's
connection state machine built on these pieces lives in :mod:`nodeagent.derp.conn`.
"""

from __future__ import annotations

import json
import os
import struct
from enum import IntEnum
from typing import Any, NamedTuple

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"DERP\xf0\x9f\x94\x91"  # "DERP" + U+1F511 in UTF-8
KEY_LEN = 32
NONCE_LEN = 24
FRAME_HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
MAX_CLIENT_INFO_LEN = 256 << 10
PROTOCOL_VERSION = 2
KEEPALIVE_INTERVAL = 60.0
# Largest frame a server has to accept once logged in: ForwardPacket = two keys + a packet.
MAX_FRAME_AFTER_LOGIN = 2 * KEY_LEN + MAX_PACKET_SIZE
PING_LEN = 8
MAX_PING_LEN = 1000
# Disco packets (specs/disco.md): magic, sender disco key, nonce; anything shorter is not disco.
DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"
DISCO_MIN_LEN = len(DISCO_MAGIC) + KEY_LEN + NONCE_LEN


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01
    MESH_CONN_BROKE = 0xF0  # invented locally, never on the wire


PEER_PRESENT_REGULAR = 0x01
PEER_PRESENT_MESH_PEER = 0x02
PEER_PRESENT_PROBER = 0x04
PEER_PRESENT_NOT_IDEAL = 0x08

_HDR = struct.Struct(">BI")
_RESTARTING = struct.Struct(">II")
_V4_MAPPED = bytes(10) + b"\xff\xff"


class ProtocolError(Exception):
    """Base of every error the peer's bytes can cause: the connection cannot go on; close it.

    :class:`FrameError` (a malformed frame) and ``nodeagent.derp.conn.DerpError`` (a well-formed
    frame the client's state machine does not accept, or a refused upgrade) derive from it.
    """


class FrameError(ProtocolError):
    """A malformed frame or a frame beyond the reader's length limit: close the connection."""


def looks_like_disco(pkt: bytes | memoryview, offset: int = 0) -> bool:
    """True when the packet at ``offset`` starts with the disco magic and is long enough."""
    return len(pkt) - offset >= DISCO_MIN_LEN and bytes(pkt[offset:offset + 6]) == DISCO_MAGIC


class FrameReader:
    """Incremental frame splitter: :meth:`feed` bytes, then call :meth:`next` until it returns None.

    ``max_len`` bounds the payload length; a longer header raises :class:`FrameError` at once,
    before any of the payload is buffered. The limit may be changed between frames (a server
    allows a large ClientInfo during login and only packet-sized frames afterwards).
    """

    __slots__ = ("_buf", "_pos", "max_len")

    def __init__(self, max_len: int = MAX_INFO_LEN) -> None:
        self._buf = b""
        self._pos = 0
        self.max_len = max_len

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos >= len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos:] + bytes(data)
        self._pos = 0

    def next(self) -> tuple[int, bytes] | None:
        """The next complete (type, payload), or None when more bytes are needed."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < FRAME_HEADER_LEN:
            return None
        ftype, n = _HDR.unpack_from(buf, pos)
        if n > self.max_len:
            raise FrameError(f"frame type {ftype:#04x} length {n} exceeds limit {self.max_len}")
        end = pos + FRAME_HEADER_LEN + n
        if end > len(buf):
            return None
        self._pos = end
        return ftype, buf[pos + FRAME_HEADER_LEN:end]

    def pending(self) -> int:
        """Bytes buffered but not yet returned as a frame."""
        return len(self._buf) - self._pos

    def take_pending(self) -> bytes:
        """Remove and return the buffered bytes not yet returned as a frame (a caller that
        parses a stream itself takes over the partial frame and later feeds back its own rest)."""
        rest = self._buf[self._pos:]
        self._buf = b""
        self._pos = 0
        return rest


def frame(ftype: int, payload: bytes = b"") -> bytes:
    return _HDR.pack(ftype, len(payload)) + payload


def frame_header(ftype: int, length: int) -> bytes:
    return _HDR.pack(ftype, length)


def _key(k: bytes) -> bytes:
    if len(k) != KEY_LEN:
        raise ValueError(f"key must be {KEY_LEN} bytes, got {len(k)}")
    return bytes(k)


# --- builders -----------------------------------------------------------------------------------

def encode_server_key(server_public: bytes) -> bytes:
    return frame(FrameType.SERVER_KEY, MAGIC + _key(server_public))


def encode_client_info(client_private: bytes, server_public: bytes, info: dict[str, Any],
                       nonce: bytes | None = None) -> bytes:
    """ClientInfo frame: client public key, then nonce + box(JSON) from client to server."""
    priv = PrivateKey(client_private)
    box = Box(priv, PublicKey(_key(server_public)))
    sealed = box.encrypt(json.dumps(info, separators=(",", ":")).encode(),
                         nonce or os.urandom(NONCE_LEN))
    return frame(FrameType.CLIENT_INFO, bytes(priv.public_key) + bytes(sealed))


def encode_server_info(server_private: bytes, client_public: bytes, info: dict[str, Any],
                       nonce: bytes | None = None) -> bytes:
    box = Box(PrivateKey(server_private), PublicKey(_key(client_public)))
    sealed = box.encrypt(json.dumps(info, separators=(",", ":")).encode(),
                         nonce or os.urandom(NONCE_LEN))
    return frame(FrameType.SERVER_INFO, bytes(sealed))


def encode_send_packet(dst: bytes, pkt: bytes) -> bytes:
    if len(pkt) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(pkt)} bytes exceeds {MAX_PACKET_SIZE}")
    return _HDR.pack(FrameType.SEND_PACKET, KEY_LEN + len(pkt)) + _key(dst) + pkt


def encode_recv_packet(src: bytes, pkt: bytes) -> bytes:
    if len(pkt) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(pkt)} bytes exceeds {MAX_PACKET_SIZE}")
    return _HDR.pack(FrameType.RECV_PACKET, KEY_LEN + len(pkt)) + _key(src) + pkt


def encode_forward_packet(src: bytes, dst: bytes, pkt: bytes) -> bytes:
    if len(pkt) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(pkt)} bytes exceeds {MAX_PACKET_SIZE}")
    return (_HDR.pack(FrameType.FORWARD_PACKET, 2 * KEY_LEN + len(pkt))
            + _key(src) + _key(dst) + pkt)


KEEPALIVE_FRAME = frame(FrameType.KEEP_ALIVE)
WATCH_CONNS_FRAME = frame(FrameType.WATCH_CONNS)


def encode_keepalive() -> bytes:
    return KEEPALIVE_FRAME


def encode_watch_conns() -> bytes:
    return WATCH_CONNS_FRAME


def encode_note_preferred(preferred: bool) -> bytes:
    return frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def encode_peer_gone(key: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    return frame(FrameType.PEER_GONE, _key(key) + bytes((reason,)))


def encode_peer_present(key: bytes, ip: bytes | None = None, port: int = 0,
                        flags: int = 0) -> bytes:
    """PeerPresent: key, then IP (4 or 16 raw bytes; IPv4 sent v4-mapped) + port, then flags."""
    payload = _key(key)
    if ip is not None:
        if len(ip) == 4:
            ip = _V4_MAPPED + ip
        if len(ip) != 16:
            raise ValueError("ip must be 4 or 16 bytes")
        payload += bytes(ip) + port.to_bytes(2, "big") + bytes((flags,))
    return frame(FrameType.PEER_PRESENT, payload)


def encode_close_peer(key: bytes) -> bytes:
    return frame(FrameType.CLOSE_PEER, _key(key))


def encode_ping(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise ValueError("ping data must be 8 bytes")
    return frame(FrameType.PING, bytes(data))


def encode_pong(data: bytes) -> bytes:
    if len(data) != PING_LEN:
        raise ValueError("pong data must be 8 bytes")
    return frame(FrameType.PONG, bytes(data))


def encode_health(problem: str) -> bytes:
    return frame(FrameType.HEALTH, problem.encode())


def encode_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return frame(FrameType.RESTARTING, _RESTARTING.pack(reconnect_in_ms, try_for_ms))


# --- parsers (FrameError on anything malformed) --------------------------------------------------

class ClientInfo(NamedTuple):
    key: bytes
    mesh_key: bytes | None
    version: int
    can_ack_pings: bool
    is_prober: bool
    app_name: str
    raw: dict[str, Any]


class PeerPresent(NamedTuple):
    key: bytes
    ip: bytes | None  # 16 bytes as sent (IPv4 v4-mapped)
    port: int
    flags: int


def decode_server_key(payload: bytes) -> bytes:
    if len(payload) < len(MAGIC) + KEY_LEN or payload[:len(MAGIC)] != MAGIC:
        raise FrameError("bad ServerKey frame (magic or length)")
    return payload[len(MAGIC):len(MAGIC) + KEY_LEN]


def _open_json(box: Box, sealed: bytes) -> dict[str, Any]:
    try:
        plain = box.decrypt(sealed)
    except (CryptoError, ValueError, TypeError) as e:
        raise FrameError(f"box does not open: {e}") from None
    try:
        obj = json.loads(plain)
    except (ValueError, RecursionError) as e:
        raise FrameError(f"bad JSON in box: {e}") from None
    if not isinstance(obj, dict):
        raise FrameError("boxed JSON is not an object")
    return obj


def _make_box(private: bytes, public: bytes) -> Box:
    try:
        return Box(PrivateKey(private), PublicKey(public))
    except (CryptoError, ValueError, TypeError) as e:
        raise FrameError(f"bad key: {e}") from None


def decode_client_info(server_private: bytes, payload: bytes) -> ClientInfo:
    """Open a ClientInfo payload with the server's private key; validate the JSON fields."""
    if not KEY_LEN + NONCE_LEN <= len(payload) <= MAX_CLIENT_INFO_LEN:
        raise FrameError(f"ClientInfo length {len(payload)} out of range")
    key = payload[:KEY_LEN]
    obj = _open_json(_make_box(server_private, key), payload[KEY_LEN:])
    # Go's JSON decoder matches field names case-insensitively; so do we.
    low = {k.lower(): v for k, v in obj.items() if isinstance(k, str)}
    mesh = low.get("meshkey")
    mesh_key: bytes | None = None
    if mesh not in (None, ""):
        if not isinstance(mesh, str) or len(mesh.strip()) != 64:
            raise FrameError("meshKey must be 64 hex digits")
        try:
            mesh_key = bytes.fromhex(mesh.strip())
        except ValueError:
            raise FrameError("meshKey is not hex") from None
    version = low.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise FrameError("version must be an integer")
    can_ack = low.get("canackpings", False)
    prober = low.get("isprober", False)
    app = low.get("appname", "")
    if not isinstance(can_ack, bool) or not isinstance(prober, bool) or not isinstance(app, str):
        raise FrameError("bad ClientInfo field type")
    return ClientInfo(key, mesh_key, version, can_ack, prober, app, obj)


def decode_server_info(client_private: bytes, server_public: bytes,
                       payload: bytes) -> dict[str, Any]:
    if not NONCE_LEN <= len(payload) <= NONCE_LEN + MAX_INFO_LEN:
        raise FrameError(f"ServerInfo length {len(payload)} out of range")
    return _open_json(_make_box(client_private, server_public), payload)


def decode_send_packet(payload: bytes) -> tuple[bytes, bytes]:
    """SendPacket → (destination key, packet)."""
    if len(payload) < KEY_LEN or len(payload) > KEY_LEN + MAX_PACKET_SIZE:
        raise FrameError(f"SendPacket length {len(payload)} out of range")
    return payload[:KEY_LEN], payload[KEY_LEN:]


def decode_recv_packet(payload: bytes) -> tuple[bytes, bytes]:
    """RecvPacket (v2) → (source key, packet)."""
    if len(payload) < KEY_LEN or len(payload) > KEY_LEN + MAX_PACKET_SIZE:
        raise FrameError(f"RecvPacket length {len(payload)} out of range")
    return payload[:KEY_LEN], payload[KEY_LEN:]


def decode_forward_packet(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """ForwardPacket → (source key, destination key, packet)."""
    if len(payload) < 2 * KEY_LEN or len(payload) > 2 * KEY_LEN + MAX_PACKET_SIZE:
        raise FrameError(f"ForwardPacket length {len(payload)} out of range")
    return payload[:KEY_LEN], payload[KEY_LEN:2 * KEY_LEN], payload[2 * KEY_LEN:]


def decode_note_preferred(payload: bytes) -> bool:
    if len(payload) != 1:
        raise FrameError("NotePreferred payload must be 1 byte")
    return payload[0] != 0


def decode_peer_gone(payload: bytes) -> tuple[bytes, int]:
    """PeerGone → (key, reason); a missing reason byte (old servers) means disconnected."""
    if len(payload) < KEY_LEN:
        raise FrameError("PeerGone too short")
    reason = payload[KEY_LEN] if len(payload) > KEY_LEN else PeerGoneReason.DISCONNECTED
    return payload[:KEY_LEN], int(reason)


def decode_peer_present(payload: bytes) -> PeerPresent:
    n = len(payload)
    if n < KEY_LEN:
        raise FrameError("PeerPresent too short")
    ip: bytes | None = None
    port = 0
    flags = 0
    if n >= KEY_LEN + 18:
        ip = payload[KEY_LEN:KEY_LEN + 16]
        port = int.from_bytes(payload[KEY_LEN + 16:KEY_LEN + 18], "big")
    if n >= KEY_LEN + 19:
        flags = payload[KEY_LEN + 18]
    return PeerPresent(payload[:KEY_LEN], ip, port, flags)


def decode_close_peer(payload: bytes) -> bytes:
    if len(payload) != KEY_LEN:
        raise FrameError("ClosePeer payload must be 32 bytes")
    return payload


def decode_ping(payload: bytes) -> bytes:
    """Ping → the 8 bytes to echo. Servers accept 8..1000 bytes and echo the first 8."""
    if not PING_LEN <= len(payload) <= MAX_PING_LEN:
        raise FrameError(f"Ping length {len(payload)} out of range")
    return payload[:PING_LEN]


def decode_pong(payload: bytes) -> bytes:
    if len(payload) < PING_LEN:
        raise FrameError("Pong too short")
    return payload[:PING_LEN]


def decode_health(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


def decode_restarting(payload: bytes) -> tuple[int, int]:
    """Restarting → (reconnect in ms, try for ms)."""
    if len(payload) < _RESTARTING.size:
        raise FrameError("Restarting too short")
    a, b = _RESTARTING.unpack_from(payload)
    return a, b


def decode_empty(payload: bytes, name: str) -> None:
    if payload:
        raise FrameError(f"{name} must be empty")
