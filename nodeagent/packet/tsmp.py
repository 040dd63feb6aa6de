"""TSMP (IP protocol 99) messages between agents: rejects, ping/pong and disco adverts.

Layouts and addressing follow ``specs/tsmp.md``. A :class:`TSMPReject` always describes the
*original* flow (initiator → refusing peer) whichever side holds it: the refusing node builds the
packet from the dropped packet's ``Parsed``, and the initiator reading it gets the same flow back
(flow src = TSMP IP destination + port at offset 3, flow dst = TSMP IP source + port at offset 5).

This module also owns the small vocabulary around rejects: reason bytes, their display names, and
the mapping onto connreject's Reason strings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nodeagent.packet.build import build_ip
from nodeagent.packet.parse import endpoint_str, ipv4_ident, ipv6_flow_label
from nodeagent.packet.parsed import (
    IPV4,
    IPV6,
    PROTO_FRAGMENT,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_TSMP,
    PROTO_UDP,
    Parsed,
)

Buffer = bytes | bytearray | memoryview

# Message types: the first byte of the TSMP body.
TSMP_TYPE_REJECT = 0x21  # '!'
TSMP_TYPE_PING = 0x70  # 'p'
TSMP_TYPE_PONG = 0x6F  # 'o'
TSMP_TYPE_DISCO_ADVERT = 0x61  # 'a'

# Reject reason bytes.
TSMP_REASON_NONE = 0x00
TSMP_REASON_ACL = 0x41  # 'A'
TSMP_REASON_SHIELDS = 0x53  # 'S'
TSMP_REASON_HOST_IP_FORWARDING = 0x46  # 'F'
TSMP_REASON_HOST_FIREWALL = 0x57  # 'W'
TSMP_REASON_APP_CONNECTOR_TRANSIT_IP_UNKNOWN = 0x54  # 'T'

TSMP_FLAG_MAYBE_BROKEN = 0x01

TSMP_REJECT_MIN_LEN = 7
TSMP_PING_DATA_LEN = 8
DISCO_KEY_LEN = 32

_REASON_NAMES = {
    TSMP_REASON_ACL: "acl",
    TSMP_REASON_SHIELDS: "shields",
    TSMP_REASON_HOST_IP_FORWARDING: "host-ip-forwarding-unavailable",
    TSMP_REASON_HOST_FIREWALL: "host-firewall",
    TSMP_REASON_APP_CONNECTOR_TRANSIT_IP_UNKNOWN: "app-connector-transit-ip-unknown",
}

# connreject's Reason vocabulary differs from the display names (note "host-ip-forwarding").
_CONNREJECT_REASONS = {
    TSMP_REASON_ACL: "acl",
    TSMP_REASON_SHIELDS: "shields",
    TSMP_REASON_HOST_IP_FORWARDING: "host-ip-forwarding",
    TSMP_REASON_HOST_FIREWALL: "host-firewall",
}

_PROTO_NAMES = {
    PROTO_ICMP: "ICMPv4",
    2: "IGMP",
    PROTO_TCP: "TCP",
    PROTO_UDP: "UDP",
    PROTO_ICMPV6: "ICMPv6",
    PROTO_TSMP: "TSMP",
    PROTO_SCTP: "SCTP",
    PROTO_FRAGMENT: "Fragment",
}

_REJECT_HDR = struct.Struct("!BBBHH")
_PORT = struct.Struct("!H")


def reason_name(reason_byte: int) -> str:
    """Display name of a reject reason byte: ``acl``, ``shields``, ... or ``0x7a`` if unknown."""
    name = _REASON_NAMES.get(reason_byte)
    return name if name is not None else f"0x{reason_byte & 0xFF:02x}"


def connreject_reason(reason_byte: int) -> str:
    """The connreject Reason string for a TSMP reason byte (``unknown`` for anything else)."""
    return _CONNREJECT_REASONS.get(reason_byte, "unknown")


def proto_name(proto: int) -> str:
    """Short protocol name as used in TSMP log lines (``TCP``, ``UDP``, ``IPProto-47``...)."""
    name = _PROTO_NAMES.get(proto)
    return name if name is not None else f"IPProto-{proto}"


@dataclass(frozen=True, slots=True)
class TSMPReject:
    """A rejected flow: ``src`` is the initiator, ``dst`` the peer that refused (ports included)."""

    version: int
    proto: int
    reason_byte: int
    src_ip: int
    dst_ip: int
    src_port: int
    dst_port: int
    maybe_broken: bool = False

    @property
    def reason_name(self) -> str:
        return reason_name(self.reason_byte)

    @property
    def connreject_reason(self) -> str:
        return connreject_reason(self.reason_byte)

    @property
    def src_str(self) -> str:
        return endpoint_str(self.version, self.src_ip, self.src_port)

    @property
    def dst_str(self) -> str:
        return endpoint_str(self.version, self.dst_ip, self.dst_port)

    def __str__(self) -> str:
        return (
            f"TSMP-reject-flow{{{proto_name(self.proto)} {self.src_str} > {self.dst_str}}}: "
            f"{self.reason_name}"
        )


def encode_tsmp_reject(r: TSMPReject) -> bytes:
    """The packet the refusing node sends for ``r``: from the refused ``dst`` back to ``src``."""
    if not 0 <= r.proto <= 0xFF:
        raise ValueError(f"protocol {r.proto} cannot be carried in a TSMP reject")
    body = _REJECT_HDR.pack(
        TSMP_TYPE_REJECT, r.proto, r.reason_byte & 0xFF, r.src_port & 0xFFFF, r.dst_port & 0xFFFF
    )
    if r.maybe_broken:
        body += bytes((TSMP_FLAG_MAYBE_BROKEN,))
    return build_ip(r.version, r.dst_ip, r.src_ip, PROTO_TSMP, body)


def build_tsmp_reject(dropped: Parsed, reason_byte: int, maybe_broken: bool = False) -> bytes:
    """A TSMP reject answering the dropped packet, addressed back to its sender.

    The dropped packet must have parsed as IPv4/IPv6 with a real protocol number (a non-first
    fragment's ``PROTO_FRAGMENT`` raises ValueError).
    """
    if dropped.kind not in (IPV4, IPV6):
        raise ValueError("the dropped packet did not parse as IPv4 or IPv6")
    return encode_tsmp_reject(
        TSMPReject(
            dropped.ip_version,
            dropped.proto,
            reason_byte,
            dropped.src_ip,
            dropped.dst_ip,
            dropped.src_port,
            dropped.dst_port,
            maybe_broken,
        )
    )


def _body(buf: Buffer, p: Parsed) -> Buffer | None:
    """The TSMP body of a parsed packet, or None when it is not a usable TSMP packet."""
    if p.proto != PROTO_TSMP or (p.kind != IPV4 and p.kind != IPV6):
        return None
    end = p.length
    if end > len(buf):
        return None
    off = p.payload_offset
    if off < 0 or off >= end:
        return None
    return buf[off:end]


def tsmp_type(buf: Buffer, p: Parsed) -> int:
    """The message type byte of a parsed TSMP packet, or -1 when it is not one."""
    body = _body(buf, p)
    return -1 if body is None else body[0]


def parse_tsmp_reject(buf: Buffer, p: Parsed) -> TSMPReject | None:
    """Read a reject from a parsed TSMP packet; None if it is not a well-formed reject."""
    body = _body(buf, p)
    if body is None or len(body) < TSMP_REJECT_MIN_LEN or body[0] != TSMP_TYPE_REJECT:
        return None
    _, proto, reason, sport, dport = _REJECT_HDR.unpack_from(body)
    maybe_broken = len(body) > TSMP_REJECT_MIN_LEN and bool(body[7] & TSMP_FLAG_MAYBE_BROKEN)
    # The flow's src is us (the TSMP destination); its dst is the refusing peer (TSMP source).
    return TSMPReject(p.ip_version, proto, reason, p.dst_ip, p.src_ip, sport, dport, maybe_broken)


# --- ping / pong -------------------------------------------------------------------------------


def build_tsmp_ping(version: int, src: int, dst: int, data: bytes, ident: int = 0) -> bytes:
    """A TSMP ping: ``'p'`` and 8 opaque bytes the pong must echo."""
    if len(data) != TSMP_PING_DATA_LEN:
        raise ValueError("TSMP ping data must be exactly 8 bytes")
    return build_ip(version, src, dst, PROTO_TSMP, bytes((TSMP_TYPE_PING,)) + data, ident=ident)


def parse_tsmp_ping(buf: Buffer, p: Parsed) -> bytes | None:
    """The 8 data bytes of a TSMP ping, or None if the packet is not one."""
    body = _body(buf, p)
    if body is None or len(body) < 1 + TSMP_PING_DATA_LEN or body[0] != TSMP_TYPE_PING:
        return None
    return bytes(body[1 : 1 + TSMP_PING_DATA_LEN])


def build_tsmp_pong(
    version: int,
    src: int,
    dst: int,
    data: bytes,
    peerapi_port: int | None = 0,
    ident: int = 0,
) -> bytes:
    """A TSMP pong echoing ``data``; ``peerapi_port=None`` omits the port (older 9-byte form)."""
    if len(data) != TSMP_PING_DATA_LEN:
        raise ValueError("TSMP pong data must be exactly 8 bytes")
    body = bytes((TSMP_TYPE_PONG,)) + data
    if peerapi_port is not None:
        body += _PORT.pack(peerapi_port & 0xFFFF)
    return build_ip(version, src, dst, PROTO_TSMP, body, ident=ident)


@dataclass(frozen=True, slots=True)
class TSMPPong:
    """A pong's echoed data and the responder's PeerAPI port (0 when absent)."""

    data: bytes
    peerapi_port: int = 0


def parse_tsmp_pong(buf: Buffer, p: Parsed) -> TSMPPong | None:
    """Read a pong from a parsed TSMP packet; None if it is not one."""
    body = _body(buf, p)
    if body is None or len(body) < 1 + TSMP_PING_DATA_LEN or body[0] != TSMP_TYPE_PONG:
        return None
    port = _PORT.unpack_from(body, 9)[0] if len(body) >= 11 else 0
    return TSMPPong(bytes(body[1:9]), port)


def build_tsmp_pong_for(buf: Buffer, p: Parsed, peerapi_port: int = 0) -> bytes | None:
    """The pong answering a parsed ping, built the way Tailscale's responder does it.

    Addresses swapped, TTL 64, and the ping's IPv4 ID (IPv6 flow label) bit-inverted; None if the
    packet is not a ping.
    """
    data = parse_tsmp_ping(buf, p)
    if data is None:
        return None
    if p.kind == IPV4:
        ident = ~ipv4_ident(buf) & 0xFFFF
    else:
        ident = ~ipv6_flow_label(buf) & 0xFFFFF
    return build_tsmp_pong(p.ip_version, p.dst_ip, p.src_ip, data, peerapi_port, ident)


# --- disco key advertisement -------------------------------------------------------------------


def build_tsmp_disco_advert(version: int, src: int, dst: int, disco_key: bytes) -> bytes:
    """A disco key advertisement: ``'a'`` and the sender's 32-byte disco public key."""
    if len(disco_key) != DISCO_KEY_LEN:
        raise ValueError("a disco key is 32 bytes")
    return build_ip(version, src, dst, PROTO_TSMP, bytes((TSMP_TYPE_DISCO_ADVERT,)) + disco_key)


def parse_tsmp_disco_advert(buf: Buffer, p: Parsed) -> bytes | None:
    """The 32-byte disco key of an advertisement, or None if the packet is not one."""
    body = _body(buf, p)
    if body is None or len(body) < 1 + DISCO_KEY_LEN or body[0] != TSMP_TYPE_DISCO_ADVERT:
        return None
    return bytes(body[1 : 1 + DISCO_KEY_LEN])
