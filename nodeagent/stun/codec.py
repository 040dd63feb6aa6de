"""Sans-IO STUN codec: the binding request/response subset Tailscale uses (RFC 5389 framing).

Owns building and parsing of binding requests and success responses, the FINGERPRINT check and
the classification of incoming datagrams for a server. Bytes in, bytes/tuples out; no sockets,
no logging. Server-side classification never raises; the client-side response parser raises
``StunError`` naming the problem.

Deliberate extension beyond Tailscale (see specs/stun.md): besides Tailscale's own requests
(SOFTWARE ``tailnode`` + FINGERPRINT) any well-formed RFC 5389 binding request is accepted, and,
unless ``classic=False``, an RFC 3489 ("classic STUN", no magic cookie) binding request whose
header length matches the datagram exactly is answered with a plain MAPPED-ADDRESS, because old
clients such as stund's ``stun`` reject attributes they do not know.

Reply size: a response built here is the 20-byte header plus exactly one (XOR-)MAPPED-ADDRESS
attribute — ``mapped_address_attr_len(host)`` bytes, 12 for IPv4, 24 for IPv6 — with no padding
and no other attribute. Every request ``parse_binding_request`` accepts is at least a 20-byte
header, so a reply never exceeds its request by more than that one attribute (see the derper's
``stun_server`` for why this matters).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import zlib

HEADER_LEN = 20
MAGIC = b"\x21\x12\xa4\x42"
MAGIC_INT = 0x2112A442
TXID_LEN = 12
CLASSIC_TXID_LEN = 16

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E
SOFTWARE_TAILNODE = b"tailnode"

FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# Accepted request kinds (first element of parse_binding_request's result).
KIND_TAILNODE = "tailnode"
KIND_RFC5389 = "rfc5389"
KIND_RFC3489 = "rfc3489"
ACCEPTED_KINDS = frozenset({KIND_TAILNODE, KIND_RFC5389, KIND_RFC3489})

# Drop reasons (first element when the request is not answered).
DROP_NOT_STUN = "not_stun"
DROP_NOT_BINDING = "not_binding"
DROP_MALFORMED = "malformed"
DROP_BAD_FINGERPRINT = "bad_fingerprint"
DROP_NOT_TAILNODE = "not_tailnode"
DROP_REASONS = (DROP_NOT_STUN, DROP_NOT_BINDING, DROP_MALFORMED, DROP_BAD_FINGERPRINT,
                DROP_NOT_TAILNODE)

_HH = struct.Struct(">HH")
_HHI = struct.Struct(">HHI")
_V4MAPPED = b"\x00" * 10 + b"\xff\xff"
_XOR_PORT = MAGIC_INT >> 16
_NO_TXID = b""


class StunError(ValueError):
    """A datagram that is not a usable STUN binding response; the message names why."""


def new_txid() -> bytes:
    """A fresh random 12-byte transaction ID."""
    return os.urandom(TXID_LEN)


def fingerprint(data: bytes | bytearray | memoryview) -> int:
    """The FINGERPRINT value for a message whose bytes (up to the attribute) are ``data``."""
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """Tailscale's "is STUN" test: ≥ 20 bytes, top two bits zero, magic cookie in place."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == MAGIC


# --- building ----------------------------------------------------------------------------------


def build_binding_request(txid: bytes, software: bytes | None = SOFTWARE_TAILNODE,
                          with_fingerprint: bool = True) -> bytes:
    """A binding request. Defaults give Tailscale's exact 40-byte request."""
    if len(txid) != TXID_LEN:
        raise ValueError("STUN transaction ID must be 12 bytes")
    attrs = bytearray()
    if software is not None:
        attrs += _HH.pack(ATTR_SOFTWARE, len(software)) + software
        attrs += b"\x00" * (-len(software) % 4)
    length = len(attrs) + (8 if with_fingerprint else 0)
    msg = bytearray(_HH.pack(BINDING_REQUEST, length) + MAGIC + txid)
    msg += attrs
    if with_fingerprint:
        fp = fingerprint(msg)
        msg += _HH.pack(ATTR_FINGERPRINT, 4) + fp.to_bytes(4, "big")
    return bytes(msg)


def _packed_addr(host: str | bytes) -> bytes:
    """Packed 4- or 16-byte address; IPv4-mapped IPv6 is unmapped to 4 bytes."""
    if isinstance(host, str):
        pct = host.find("%")
        if pct >= 0:
            host = host[:pct]
        raw = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    else:
        raw = bytes(host)
        if len(raw) not in (4, 16):
            raise ValueError("address must be 4 or 16 bytes")
    if len(raw) == 16 and raw[:12] == _V4MAPPED:
        return raw[12:]
    return raw


def mapped_address_attr_len(host: str | bytes) -> int:
    """Bytes on the wire of one XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) attribute for ``host``:
    4 (type, length) + 4 (reserved, family, port) + the address — 12 for IPv4 and IPv4-mapped
    IPv6, 24 for IPv6. Raises ``ValueError``/``OSError`` for something that is no address."""
    return 8 + len(_packed_addr(host))


def build_binding_response(txid: bytes, host: str | bytes, port: int) -> bytes:
    """Success response with exactly one XOR-MAPPED-ADDRESS for ``host:port`` (Tailscale's
    form). An IPv4 (or IPv4-mapped) host is encoded with family 0x01."""
    addr = _packed_addr(host)
    key = MAGIC + txid
    xored = (int.from_bytes(addr, "big") ^ int.from_bytes(key[:len(addr)], "big")).to_bytes(
        len(addr), "big")
    family = FAMILY_IPV4 if len(addr) == 4 else FAMILY_IPV6
    vlen = 4 + len(addr)
    return b"".join((_HH.pack(BINDING_SUCCESS, 4 + vlen), MAGIC, txid,
                     _HH.pack(ATTR_XOR_MAPPED_ADDRESS, vlen),
                     _HH.pack(family, port ^ _XOR_PORT), xored))


def build_classic_response(txid16: bytes, host: str | bytes, port: int) -> bytes:
    """RFC 3489 success response: the request's 16-byte transaction ID echoed and one plain
    MAPPED-ADDRESS (classic clients know nothing else)."""
    addr = _packed_addr(host)
    family = FAMILY_IPV4 if len(addr) == 4 else FAMILY_IPV6
    vlen = 4 + len(addr)
    return b"".join((_HH.pack(BINDING_SUCCESS, 4 + vlen), txid16,
                     _HH.pack(ATTR_MAPPED_ADDRESS, vlen), _HH.pack(family, port), addr))


def build_response_for(kind: str, txid: bytes, host: str | bytes, port: int) -> bytes:
    """The answer to an accepted request of ``kind`` (from ``parse_binding_request``)."""
    if kind == KIND_RFC3489:
        return build_classic_response(txid, host, port)
    return build_binding_response(txid, host, port)


# --- server side: classify a request -----------------------------------------------------------


def _walk_request_attrs(data: bytes, end: int) -> tuple[str | None, bool, bool]:
    """Walk attributes in ``data[20:end]``: (drop reason or None, saw tailnode, saw FP)."""
    off = HEADER_LEN
    tailnode = False
    while off < end:
        if off + 4 > end:
            return DROP_MALFORMED, False, False
        atype, alen = _HH.unpack_from(data, off)
        vstart = off + 4
        nxt = vstart + alen + (-alen % 4)
        if nxt > end:
            return DROP_MALFORMED, False, False
        if atype == ATTR_SOFTWARE:
            if data[vstart:vstart + alen] == SOFTWARE_TAILNODE:
                tailnode = True
        elif atype == ATTR_FINGERPRINT:
            if alen != 4 or nxt != end:
                return DROP_MALFORMED, False, False  # FINGERPRINT must be the last attribute
            want = int.from_bytes(data[vstart:vstart + 4], "big")
            if fingerprint(memoryview(data)[:off]) != want:
                return DROP_BAD_FINGERPRINT, False, False
            return None, tailnode, True
        off = nxt
    return None, tailnode, False


def parse_binding_request(data: bytes, *, strict: bool = False,
                          classic: bool = True) -> tuple[str, bytes]:
    """Classify a datagram arriving at a STUN server. Never raises.

    Returns ``(kind, txid)`` for a request to answer (kind in ``ACCEPTED_KINDS``; txid is 12
    bytes, or 16 for ``rfc3489``), else ``(drop_reason, b"")``. ``strict`` restores Tailscale's
    rule (SOFTWARE ``tailnode`` and a trailing valid FINGERPRINT required; no classic STUN).
    """
    n = len(data)
    if n < HEADER_LEN or data[0] & 0xC0:
        return DROP_NOT_STUN, _NO_TXID
    mtype, mlen = _HH.unpack_from(data, 0)
    if data[4:8] != MAGIC:
        # Classic STUN has no cookie, so insist on an exact length to tell it from noise.
        if strict or not classic or mtype != BINDING_REQUEST or mlen % 4 or \
                HEADER_LEN + mlen != n:
            return DROP_NOT_STUN, _NO_TXID
        reason, _, _ = _walk_request_attrs(data, n)
        if reason is not None:
            return reason, _NO_TXID
        return KIND_RFC3489, bytes(data[4:HEADER_LEN])
    if mtype != BINDING_REQUEST:
        return DROP_NOT_BINDING, _NO_TXID
    if mlen % 4 or HEADER_LEN + mlen != n:
        # Over UDP a message is exactly one datagram: a length that disagrees is corruption
        # (and would let a damaged header hide the FINGERPRINT that protects the rest).
        return DROP_MALFORMED, _NO_TXID
    reason, tailnode, has_fp = _walk_request_attrs(data, HEADER_LEN + mlen)
    if reason is not None:
        return reason, _NO_TXID
    if strict and not (tailnode and has_fp):
        return DROP_NOT_TAILNODE, _NO_TXID
    return (KIND_TAILNODE if tailnode else KIND_RFC5389), bytes(data[8:HEADER_LEN])


# --- client side: parse a response -------------------------------------------------------------


def _decode_address(val: bytes, xor_key: bytes | None) -> tuple[str, int]:
    if len(val) < 4:
        raise StunError("malformed STUN response: address attribute too short")
    family = val[1]
    if family == FAMILY_IPV4:
        alen = 4
    elif family == FAMILY_IPV6:
        alen = 16
    else:
        raise StunError(f"malformed STUN response: unknown address family {family}")
    if len(val) < 4 + alen:
        raise StunError("malformed STUN response: address attribute too short")
    port = int.from_bytes(val[2:4], "big")
    raw = val[4:4 + alen]
    if xor_key is not None:
        port ^= _XOR_PORT
        raw = (int.from_bytes(raw, "big") ^ int.from_bytes(xor_key[:alen], "big")).to_bytes(
            alen, "big")
    if alen == 16 and raw[:12] != _V4MAPPED:
        return str(ipaddress.IPv6Address(raw)), port  # canonical text form (RFC 5952)
    return socket.inet_ntop(socket.AF_INET, raw[-4:]), port


def parse_binding_response(data: bytes) -> tuple[bytes, str, int]:
    """Parse a binding success response: ``(txid, host, port)``. XOR-MAPPED-ADDRESS (0x0020 or
    0x8020; the last one wins) is preferred, MAPPED-ADDRESS is the fallback; IPv4-mapped
    results are unmapped. Raises ``StunError``; the caller compares the transaction ID."""
    data = bytes(data)
    if not is_stun(data):
        raise StunError("not a STUN message")
    mtype, mlen = _HH.unpack_from(data, 0)
    if mtype != BINDING_SUCCESS:
        raise StunError(f"not a STUN binding success response (type 0x{mtype:04x})")
    end = HEADER_LEN + mlen
    if end > len(data):
        raise StunError("malformed STUN response: length beyond the datagram")
    txid = data[8:HEADER_LEN]
    xor_val: bytes | None = None
    plain_val: bytes | None = None
    off = HEADER_LEN
    while off < end:
        if off + 4 > end:
            raise StunError("malformed STUN response: truncated attribute")
        atype, alen = _HH.unpack_from(data, off)
        nxt = off + 4 + alen + (-alen % 4)
        if nxt > end:
            raise StunError("malformed STUN response: truncated attribute")
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            xor_val = data[off + 4:off + 4 + alen]
        elif atype == ATTR_MAPPED_ADDRESS:
            plain_val = data[off + 4:off + 4 + alen]
        off = nxt
    if xor_val is not None:
        host, port = _decode_address(xor_val, MAGIC + txid)
    elif plain_val is not None:
        host, port = _decode_address(plain_val, None)
    else:
        raise StunError("malformed STUN response: no mapped address")
    return txid, host, port
