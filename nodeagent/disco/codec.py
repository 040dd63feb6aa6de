"""Sans-IO disco codec: the path-discovery messages magicsock exchanges (specs/disco.md).

Owns the outer packet (magic ‖ sender disco public key ‖ nonce ‖ NaCl box), sealing and opening
the box between two disco key pairs, and the inner messages Ping (0x01), Pong (0x02) and
CallMeMaybe (0x03) with their 18-byte endpoint sub-encoding. Bytes in, bytes/dataclasses out; no
sockets, no asyncio, no logging.

Error contract: every parser of network bytes (``decode_message``, ``decode_endpoint``,
``sender_key``, ``open_packet``, ``DiscoBox.open``) raises :class:`DiscoError` and nothing else on
bad input; ``looks_like_disco`` never raises. An inner message of a type this codec does not
implement (0x00, the relay types 0x04 to 0x09, anything newer) decodes to ``None`` whatever its body
— the receiver ignores it, exactly as it ignores a malformed one. The builders raise
:class:`DiscoError` (a ``ValueError``) for a message that cannot be put on the wire.

Parse rules follow Tailscale's ``disco/disco.go`` (reference/disco.md §4): the version byte is
ignored except by CallMeMaybe; a Ping body must hold the 12-byte transaction ID, the next 32
bytes (if all there) are the sender's node key, whatever follows is padding (only its length is
kept); a Pong needs 30 body bytes; a CallMeMaybe whose body is empty, not a multiple of 18 or
has a version other than 0 carries no endpoints. Bytes beyond what a message uses are ignored.

Two representation choices (the wire cannot tell them apart):

* A Ping without a node key and with 32 or more bytes of padding would read back as a Ping with
  a node key, so ``encode_message`` refuses it. Tailscale clients always send the node key.
* A node key is kept as the 32 raw bytes it is on the wire, also when they are all zero (which
  Tailscale reads as "no key"); deciding what a zero key means is the receiver's business.

Addresses are ``(ip_text, port)``: IPv4 dotted-quad for an IPv4(-mapped) address, RFC 5952
compressed text otherwise. A zone (``fe80::1%eth0``) is dropped on encoding, as on the wire.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import TypeAlias

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

MAGIC = b"TS\xf0\x9f\x92\xac"  # "TS" + U+1F4AC in UTF-8
MAGIC_LEN = len(MAGIC)
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = MAGIC_LEN + KEY_LEN + NONCE_LEN  # 62: magic, sender disco key, nonce
BOX_OVERHEAD = 16  # Poly1305 tag in front of the ciphertext
PACKET_OVERHEAD = HEADER_LEN + BOX_OVERHEAD  # 78: a packet is this plus the inner message
TX_ID_LEN = 12
ENDPOINT_LEN = 16 + 2
PONG_BODY_LEN = TX_ID_LEN + ENDPOINT_LEN  # 30
VERSION = 0

# The pseudo address a DERP path is written as (the port is the DERP region ID): the observed
# source a pong reports for a ping that arrived via DERP.
DERP_MAGIC_IP = "127.3.3.40"

TYPE_PING = 0x01
TYPE_PONG = 0x02
TYPE_CALL_ME_MAYBE = 0x03
# Known on the wire but not implemented here (UDP relay); they decode to None.
TYPE_BIND_UDP_RELAY_ENDPOINT = 0x04
TYPE_BIND_UDP_RELAY_ENDPOINT_CHALLENGE = 0x05
TYPE_BIND_UDP_RELAY_ENDPOINT_ANSWER = 0x06
TYPE_CALL_ME_MAYBE_VIA = 0x07
TYPE_ALLOCATE_UDP_RELAY_ENDPOINT_REQUEST = 0x08
TYPE_ALLOCATE_UDP_RELAY_ENDPOINT_RESPONSE = 0x09

_PORT = struct.Struct(">H")
_V4_MAPPED = bytes(10) + b"\xff\xff"
_ZERO12 = bytes(12)
_INET = socket.AF_INET
_INET6 = socket.AF_INET6

Endpoint: TypeAlias = tuple[str, int]


class DiscoError(ValueError):
    """A disco packet or inner message that cannot be used (or built); the message says why."""


@dataclass(frozen=True, slots=True)
class Ping:
    """"Are you there on this path?" ``node_key`` is the sender's 32-byte WireGuard node public
    key (``None``: not sent, as by very old clients); ``padding`` zero bytes follow it (path-MTU
    probes)."""

    tx_id: bytes
    node_key: bytes | None
    padding: int = 0


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to a Ping: its ``tx_id`` and the source address the ping was seen from
    (``(DERP_MAGIC_IP, region_id)`` for a ping that came via DERP)."""

    tx_id: bytes
    src: Endpoint


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    """"Ping me on these addresses now" (sent via DERP, for simultaneous hole punching)."""

    endpoints: tuple[Endpoint, ...]


Message: TypeAlias = Ping | Pong | CallMeMaybe


# --- small helpers ------------------------------------------------------------------------------


def new_tx_id() -> bytes:
    """A fresh random 12-byte transaction ID for a Ping."""
    return os.urandom(TX_ID_LEN)


def derp_endpoint(region_id: int) -> Endpoint:
    """The pseudo endpoint standing for DERP region ``region_id``."""
    return (DERP_MAGIC_IP, region_id)


def is_derp_endpoint(ep: Endpoint) -> bool:
    """True for an endpoint written as ``DERP_MAGIC_IP:<region>``."""
    return ep[0] == DERP_MAGIC_IP


def looks_like_disco(pkt: bytes | bytearray | memoryview) -> bool:
    """True when ``pkt`` starts with the disco magic and holds at least the 62-byte header (the
    DERP server's test). Never raises for a bytes-like argument."""
    return len(pkt) >= HEADER_LEN and pkt[:MAGIC_LEN] == MAGIC


def sender_key(packet: bytes | bytearray | memoryview) -> bytes:
    """The raw 32-byte sender disco public key of a disco-looking packet (not authenticated
    until the box opens)."""
    if not looks_like_disco(packet):
        raise DiscoError("not a disco packet (magic or length)")
    return bytes(packet[MAGIC_LEN:MAGIC_LEN + KEY_LEN])


# --- endpoints ----------------------------------------------------------------------------------


def encode_endpoint(ep: Endpoint) -> bytes:
    """``(ip, port)`` as 16 address bytes (IPv4 as ``::ffff:a.b.c.d``) and a big-endian port."""
    try:
        ip, port = ep
        if not isinstance(ip, str):
            raise TypeError(f"address must be text, not {type(ip).__name__}")
        pct = ip.find("%")
        if pct >= 0:
            ip = ip[:pct]
        if ":" in ip:
            raw = socket.inet_pton(_INET6, ip)
        else:
            raw = _V4_MAPPED + socket.inet_pton(_INET, ip)
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        return raw + _PORT.pack(port)
    except (OSError, ValueError, TypeError, struct.error) as e:
        raise DiscoError(f"bad endpoint {ep!r}: {e}") from None


def _endpoint_at(buf: bytes, off: int) -> Endpoint:
    raw = buf[off:off + 16]
    port = (buf[off + 16] << 8) | buf[off + 17]
    head = raw[:12]
    if head == _V4_MAPPED:
        return socket.inet_ntop(_INET, raw[12:]), port
    if head == _ZERO12:
        # inet_ntop would write "::a.b.c.d" here; RFC 5952 (and Go) use plain hex groups
        return str(ipaddress.IPv6Address(raw)), port
    return socket.inet_ntop(_INET6, raw), port  # RFC 5952: lowercase, longest zero run >= 2


def decode_endpoint(data: bytes | bytearray | memoryview) -> Endpoint:
    """Decode exactly 18 endpoint bytes; an IPv4-mapped address comes back as plain IPv4."""
    if len(data) != ENDPOINT_LEN:
        raise DiscoError(f"endpoint must be {ENDPOINT_LEN} bytes, got {len(data)}")
    return _endpoint_at(bytes(data), 0)


# --- inner messages -----------------------------------------------------------------------------


def _bytes_of(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise DiscoError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != length:
        raise DiscoError(f"{what} must be {length} bytes, got {len(value)}")
    return bytes(value)


def encode_message(msg: Message) -> bytes:
    """The inner plaintext of ``msg``: type, version 0, body."""
    if isinstance(msg, Ping):
        tx = _bytes_of(msg.tx_id, TX_ID_LEN, "Ping tx_id")
        pad = msg.padding
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise DiscoError(f"Ping padding must be a non-negative int, got {pad!r}")
        if msg.node_key is None:
            if pad >= KEY_LEN:
                raise DiscoError("a Ping without a node key cannot carry 32 or more bytes of "
                                 "padding (it would read back as a node key)")
            return b"\x01\x00" + tx + bytes(pad)
        key = _bytes_of(msg.node_key, KEY_LEN, "Ping node_key")
        return b"\x01\x00" + tx + key + bytes(pad)
    if isinstance(msg, Pong):
        tx = _bytes_of(msg.tx_id, TX_ID_LEN, "Pong tx_id")
        return b"\x02\x00" + tx + encode_endpoint(msg.src)
    if isinstance(msg, CallMeMaybe):
        return b"\x03\x00" + b"".join(encode_endpoint(ep) for ep in msg.endpoints)
    raise DiscoError(f"not a disco message: {type(msg).__name__}")


def decode_message(inner: bytes | bytearray | memoryview) -> Message | None:
    """Parse an inner (opened) message. ``None`` for a type this codec does not implement;
    :class:`DiscoError` for one too short to be what its type says."""
    p = bytes(inner)
    n = len(p)
    if n < 2:
        raise DiscoError(f"disco message of {n} bytes has no type and version")
    mtype = p[0]
    if mtype == TYPE_PING:
        if n < 2 + TX_ID_LEN:
            raise DiscoError(f"Ping body of {n - 2} bytes is shorter than a transaction ID")
        key_end = 2 + TX_ID_LEN + KEY_LEN
        if n >= key_end:
            return Ping(p[2:2 + TX_ID_LEN], p[2 + TX_ID_LEN:key_end], n - key_end)
        return Ping(p[2:2 + TX_ID_LEN], None, n - 2 - TX_ID_LEN)
    if mtype == TYPE_PONG:
        if n < 2 + PONG_BODY_LEN:
            raise DiscoError(f"Pong body of {n - 2} bytes, want {PONG_BODY_LEN}")
        return Pong(p[2:2 + TX_ID_LEN], _endpoint_at(p, 2 + TX_ID_LEN))
    if mtype == TYPE_CALL_ME_MAYBE:
        body = n - 2
        if body == 0 or body % ENDPOINT_LEN or p[1] != VERSION:
            return CallMeMaybe(())
        return CallMeMaybe(tuple(_endpoint_at(p, off) for off in range(2, n, ENDPOINT_LEN)))
    return None


# --- the box ------------------------------------------------------------------------------------


def _make_box(private: bytes, public: bytes) -> Box:
    try:
        return Box(PrivateKey(bytes(private)), PublicKey(bytes(public)))
    except (CryptoError, ValueError, TypeError) as e:
        # A wrong length, or a low-order public key whose shared secret is zero.
        raise DiscoError(f"unusable disco key: {e}") from None


def _seal(box: Box, header: bytes, msg: Message, nonce: bytes | None) -> bytes:
    plain = encode_message(msg)
    if nonce is None:
        nonce = os.urandom(NONCE_LEN)
    elif len(nonce) != NONCE_LEN:
        raise DiscoError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    try:
        sealed = box.encrypt(plain, bytes(nonce))
    except (CryptoError, ValueError, TypeError) as e:
        raise DiscoError(f"cannot seal: {e}") from None
    return header + bytes(sealed)  # sealed = nonce ‖ tag ‖ ciphertext


def _open(box: Box, packet: bytes) -> Message | None:
    if len(packet) < PACKET_OVERHEAD:
        raise DiscoError(f"disco packet of {len(packet)} bytes is too short for a box")
    try:
        plain = box.decrypt(packet[HEADER_LEN:], packet[MAGIC_LEN + KEY_LEN:HEADER_LEN])
    except (CryptoError, ValueError, TypeError):
        raise DiscoError("disco box does not open (wrong key or corrupted)") from None
    return decode_message(plain)


def seal(sender_private: bytes, receiver_public: bytes, msg: Message,
         nonce: bytes | None = None) -> bytes:
    """The whole packet carrying ``msg`` from ``sender_private`` to ``receiver_public``: magic ‖
    sender disco public key ‖ nonce (random unless given) ‖ box. Computes the shared key each
    call; a sender on the hot path keeps a :class:`DiscoBox` per peer instead."""
    box = _make_box(sender_private, receiver_public)
    ours = bytes(PrivateKey(bytes(sender_private)).public_key)
    return _seal(box, MAGIC + ours, msg, nonce)


def open_packet(receiver_private: bytes,
                packet: bytes | bytearray | memoryview) -> tuple[bytes, Message | None]:
    """Open a disco packet addressed to ``receiver_private``: ``(sender disco public key,
    message)``, the message ``None`` for a well-formed type this codec does not implement.
    Raises :class:`DiscoError` for anything else (not disco, a box that does not open, a
    malformed inner message)."""
    pkt = bytes(packet)
    sender = sender_key(pkt)
    return sender, _open(_make_box(receiver_private, sender), pkt)


class DiscoBox:
    """The precomputed NaCl box between our disco private key and one peer's disco public key:
    the shared key is computed once, here, and reused by every :meth:`seal` and :meth:`open`."""

    __slots__ = ("_box", "_header", "our_public", "their_public")

    def __init__(self, our_private: bytes, their_public: bytes) -> None:
        self._box = _make_box(our_private, their_public)
        self.our_public = bytes(PrivateKey(bytes(our_private)).public_key)
        self.their_public = bytes(their_public)
        self._header = MAGIC + self.our_public

    def seal(self, msg: Message, nonce: bytes | None = None) -> bytes:
        """The whole packet carrying ``msg`` to the peer (random nonce unless given)."""
        return _seal(self._box, self._header, msg, nonce)

    def open(self, packet: bytes | bytearray | memoryview) -> Message | None:
        """The message of a packet the peer sealed to us (``None`` for a well-formed type this
        codec does not implement). :class:`DiscoError` if it is not disco, comes from another
        sender key, does not open or is malformed inside."""
        pkt = bytes(packet)
        if sender_key(pkt) != self.their_public:
            raise DiscoError("disco packet from another sender key")
        return _open(self._box, pkt)

    def __repr__(self) -> str:
        return f"DiscoBox(our={self.our_public.hex()[:16]}…, their={self.their_public.hex()[:16]}…)"
