"""nodeagent's control protocol: message shapes, msgpack framing and the encrypted channel.

Sans-IO: bytes in, values out; every decoder raises only :class:`ProtoError`.

Transport (HTTP or HTTPS, served by ``nodeagent.control.server``)::

    GET  /key?v=CAP          → {"PublicKey": <32 bytes>, "MinCapabilityVersion": N}  (plain)
    POST /machine/register?v=CAP   body: envelope(register)  → sealed(register-ok) | error
    GET  /machine/map?v=CAP  WebSocket: server hello, then sealed frames both ways

Encryption and authentication. The server owns a long-term X25519 key (the *server key*); the
client fetches it from ``/key`` once and pins it per server URL (trust on first use), refusing to
talk if it later changes. Every request body is an *envelope* ``{"Version": CAP, "MachineKey":
<32-byte machine public key>, "Sealed": <NaCl box>}``; the box (XSalsa20-Poly1305 under the X25519
shared secret of the machine key and the server key) proves possession of the machine private key,
hides the content, and is answered with a box only that machine can open. Inside every box is
``{"D": direction, "S": sequence, "T": unix time, "M": message}``: the direction tag stops a
message being reflected back at its sender, strictly increasing sequence numbers stop replays
within a stream, and the server accepts a stand-alone request (registration) only if ``T`` is at
most :data:`MAX_CLOCK_SKEW` seconds old and at most :data:`MAX_FUTURE_SKEW` seconds ahead of its
clock. Each box carries a random 24-byte nonce that the box authenticates; the server remembers
the :func:`replay_key` (machine key + nonce) of every stand-alone request for as long as its
timestamp is acceptable and refuses the same request a second time (``nodeagent.control.replay``).
A map stream starts with a plaintext hello carrying a random challenge that the client's first
(sealed) message must echo, so a recorded stream cannot be replayed. Node keys are bound to a
machine key at registration: a request naming a node key that belongs to another machine is
refused, so a node can neither impersonate another node key nor receive another node's map or
c2n traffic; the node key of a node an admin deleted is refused for good. Errors before
authentication are plaintext ``{"Error": text}``; they carry no tailnet data.

The capability version (``nodeagent.version.CAPABILITY_VERSION``) travels in the URL and in every
envelope; a server refuses versions below :data:`MIN_CAPABILITY_VERSION` with a message naming
both numbers.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from nodeagent.tailcfg import NetworkMap, netmap_from_wire

MIN_CAPABILITY_VERSION = 139
MAX_CLOCK_SKEW = 300.0  # how old a stand-alone request may be (seconds)
MAX_FUTURE_SKEW = 60.0  # how far ahead of the server's clock it may be dated
NONCE_LEN = 24  # the NaCl box nonce that starts every sealed message
MAX_MESSAGE = 16 << 20
CHALLENGE_LEN = 16

C2S = "c2s"
S2C = "s2c"


class ProtoError(ValueError):
    """Bytes or a message that do not follow the protocol."""


class VersionError(ProtoError):
    """The peer's capability version cannot be served."""


class ServerError(ProtoError):
    """The server answered with an error message."""


def version_problem(v: Any) -> str | None:
    """None when capability version ``v`` is served, else a one-line reason."""
    if isinstance(v, bool) or not isinstance(v, int):
        return "missing or malformed capability version"
    if v < MIN_CAPABILITY_VERSION:
        return (f"client capability version {v} is too old: this control server needs "
                f"{MIN_CAPABILITY_VERSION} or newer (upgrade nodeagent)")
    return None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    if len(data) > MAX_MESSAGE:
        raise ProtoError(f"message of {len(data)} bytes is over the {MAX_MESSAGE} limit")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises many unrelated types on garbage
        raise ProtoError(f"bad msgpack: {type(e).__name__}") from None


# --- message shape checking ------------------------------------------------------------------

_B32 = "bytes32"
_STRS = "list[str]"
_OPT = "?"

# Fields each message type must (or, with a trailing ?, may) carry.
_SCHEMAS: dict[str, dict[str, str]] = {
    "register": {"NodeKey": _B32, "AuthKey": "str", "Hostname": "str", "OS": "str",
                 "DiscoKey": "bytes?", "ReqID": "bytes"},
    "register-ok": {"ReqID": "bytes", "Node": "dict"},
    "map": {"NodeKey": _B32, "Challenge": "bytes", "Hostname": "str", "OS": "str",
            "Endpoints": _STRS, "HomeDERP": "int", "DiscoKey": "bytes?"},
    "update": {"Endpoints": _STRS + _OPT, "HomeDERP": "int?"},
    "c2n-response": {"ID": "int", "Status": "int", "Headers": "dict", "Body": "bytes"},
    "explain": {"ID": "int", "Src": "str", "Dst": "str", "Port": "int", "Proto": "int"},
    "explain-result": {"ID": "int", "Result": "dict?", "Error": "str?"},
    "netmap": {"NetMap": "dict", "KeepAlive": "float"},
    "delta": {"PeersChanged": "list", "PeersRemoved": "list[int]"},
    "keepalive": {},
    "c2n": {"ID": "int", "Method": "str", "Path": "str", "Headers": "dict", "Body": "bytes"},
    "error": {"Error": "str", "Fatal": "bool"},
}
CLIENT_TYPES = frozenset(("register", "map", "update", "c2n-response", "keepalive", "explain"))
SERVER_TYPES = frozenset(("register-ok", "netmap", "delta", "keepalive", "c2n", "error",
                          "explain-result"))


def _type_ok(v: Any, spec: str) -> bool:
    if spec.endswith("?"):
        if v is None:
            return True
        spec = spec[:-1]
    if spec == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if spec == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if spec == "bytes32":
        return isinstance(v, bytes) and len(v) == 32
    if spec == "list[str]":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if spec == "list[int]":
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                           for x in v)
    return isinstance(v, {"str": str, "bytes": bytes, "dict": dict, "list": list,
                          "bool": bool}[spec])


def check_message(obj: Any, allowed: frozenset[str]) -> dict[str, Any]:
    """Validate a decoded message: its ``Type`` is in ``allowed`` and fields have their types."""
    if not isinstance(obj, dict):
        raise ProtoError("message is not a map")
    t = obj.get("Type")
    if not isinstance(t, str) or t not in allowed:
        raise ProtoError(f"unexpected message type {t!r}"[:120])
    for name, spec in _SCHEMAS[t].items():
        if name not in obj and spec.endswith("?"):
            continue
        if name not in obj or not _type_ok(obj[name], spec):
            raise ProtoError(f"{t} message: field {name} is missing or not {spec.rstrip('?')}")
    return obj


def msg(type_: str, **fields: Any) -> dict[str, Any]:
    return {"Type": type_, **fields}


# --- envelopes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Envelope:
    version: int
    machine_key: bytes
    sealed: bytes


def encode_envelope(version: int, machine_key: bytes, sealed: bytes) -> bytes:
    return pack({"Version": version, "MachineKey": machine_key, "Sealed": sealed})


def decode_envelope(data: bytes) -> Envelope:
    """Raises :class:`VersionError` (after the shape check) for unsupported versions."""
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise ProtoError("envelope is not a map")
    mk, sealed, v = obj.get("MachineKey"), obj.get("Sealed"), obj.get("Version")
    if not isinstance(mk, bytes) or len(mk) != 32:
        raise ProtoError("envelope: MachineKey must be 32 bytes")
    if not isinstance(sealed, bytes):
        raise ProtoError("envelope: Sealed must be bytes")
    problem = version_problem(v)
    if problem:
        raise VersionError(problem)
    return Envelope(v, mk, sealed)


def encode_error(text: str) -> bytes:
    return pack({"Error": text})


def decode_reply(data: bytes) -> bytes:
    """A server reply body → its sealed bytes; a plaintext error raises :class:`ServerError`."""
    obj = unpack(data)
    if isinstance(obj, dict) and isinstance(obj.get("Error"), str):
        raise ServerError(obj["Error"][:500])
    if isinstance(obj, dict) and isinstance(obj.get("Sealed"), bytes):
        return obj["Sealed"]
    raise ProtoError("reply is neither sealed nor an error")


def decode_key_reply(data: bytes) -> bytes:
    obj = unpack(data)
    if isinstance(obj, dict) and isinstance(obj.get("Error"), str):
        raise ServerError(obj["Error"][:500])
    pk = obj.get("PublicKey") if isinstance(obj, dict) else None
    if not isinstance(pk, bytes) or len(pk) != 32:
        raise ProtoError("key reply: PublicKey must be 32 bytes")
    return pk


# --- the sealed channel ----------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """A stand-alone request opened by :meth:`Channel.open_request`."""

    message: Any
    stamp: float  # the sender's unix time ``T``
    nonce: bytes  # the box's nonce: unique per sealed message


def replay_key(machine_key: bytes, nonce: bytes) -> bytes:
    """The name of one sealed request for replay detection: a box from one machine key with one
    nonce can only be the same box again (the nonce is authenticated by the box)."""
    return hashlib.blake2b(machine_key + nonce, digest_size=16).digest()


class Channel:
    """One direction-tagged, sequence-numbered NaCl box channel between a machine and the server.

    ``private`` is this side's X25519 private key, ``peer`` the other side's public key.
    """

    __slots__ = ("_box", "_send_dir", "_recv_dir", "_send_seq", "_recv_seq")

    def __init__(self, private: bytes, peer: bytes, *, server: bool) -> None:
        try:
            self._box = Box(PrivateKey(private), PublicKey(peer))
        except (CryptoError, TypeError, ValueError) as e:
            raise ProtoError(f"bad key: {e}") from None
        self._send_dir, self._recv_dir = (S2C, C2S) if server else (C2S, S2C)
        self._send_seq = 0
        self._recv_seq = 0

    def seal(self, message: dict[str, Any]) -> bytes:
        self._send_seq += 1
        inner = pack({"D": self._send_dir, "S": self._send_seq, "T": time.time(), "M": message})
        return bytes(self._box.encrypt(inner, os.urandom(24)))

    def open(self, data: bytes, *, max_skew: float | None = None,
             max_ahead: float | None = None) -> Any:
        """Decrypt and check direction, ordering and (optionally) freshness; returns ``M``.

        With ``max_skew`` the timestamp may be that many seconds old and ``max_ahead`` (default:
        ``max_skew``) seconds in the future."""
        if max_skew is None:
            return self._open(data, None, None, 0.0)[0]
        ahead = max_skew if max_ahead is None else max_ahead
        return self._open(data, max_skew, ahead, time.time())[0]

    def open_request(self, data: bytes, *, max_age: float = MAX_CLOCK_SKEW,
                     max_ahead: float = MAX_FUTURE_SKEW, now: float | None = None) -> Request:
        """Open a stand-alone request: as :meth:`open` with a freshness check (``max_age``
        seconds old, ``max_ahead`` seconds ahead of ``now``), also giving its timestamp and
        nonce (for :func:`replay_key`)."""
        m, ts = self._open(data, max_age, max_ahead, time.time() if now is None else now)
        return Request(m, ts, bytes(data[:NONCE_LEN]))

    def _open(self, data: bytes, max_age: float | None, max_ahead: float | None,
              now: float) -> tuple[Any, float]:
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) < 40:
            raise ProtoError("sealed message too short")
        try:
            plain = self._box.decrypt(bytes(data))
        except CryptoError:
            raise ProtoError("cannot decrypt: wrong key or corrupted message") from None
        inner = unpack(plain)
        if not isinstance(inner, dict) or inner.get("D") != self._recv_dir:
            raise ProtoError("sealed message has the wrong direction")
        seq, ts = inner.get("S"), inner.get("T")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq <= self._recv_seq:
            raise ProtoError("sealed message replayed or out of order")
        stamp = 0.0
        if max_age is not None:
            if isinstance(ts, bool) or not isinstance(ts, int | float) or not (
                    now - max_age <= ts < math.inf):  # also false for NaN
                raise ProtoError("request timestamp is too far from the server's clock "
                                 f"(more than {max_age:g}s old or unreadable)")
            stamp = float(ts)
            if max_ahead is not None and stamp - now > max_ahead:
                raise ProtoError(f"request is dated {stamp - now:.0f}s in the future, more "
                                 f"than {max_ahead:g}s ahead of the server's clock")
        self._recv_seq = seq
        return inner.get("M"), stamp


def new_challenge() -> bytes:
    return os.urandom(CHALLENGE_LEN)


def encode_hello(challenge: bytes, server_key: bytes) -> bytes:
    return pack({"Challenge": challenge, "ServerKey": server_key})


def decode_hello(data: bytes) -> tuple[bytes, bytes]:
    obj = unpack(data)
    if isinstance(obj, dict) and isinstance(obj.get("Error"), str):
        raise ServerError(obj["Error"][:500])
    if not isinstance(obj, dict):
        raise ProtoError("hello is not a map")
    ch, sk = obj.get("Challenge"), obj.get("ServerKey")
    if not isinstance(ch, bytes) or len(ch) != CHALLENGE_LEN:
        raise ProtoError("hello: bad challenge")
    if not isinstance(sk, bytes) or len(sk) != 32:
        raise ProtoError("hello: bad server key")
    return ch, sk


def decode_netmap(obj: Any) -> NetworkMap:
    try:
        return netmap_from_wire(obj)
    except Exception as e:  # tailcfg's decoders raise WireError, ValueError or TypeError
        raise ProtoError(f"bad netmap: {e}") from None
