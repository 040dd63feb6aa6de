"""Building IPv4/IPv6 packets with TCP, UDP and ICMP echo payloads, checksums filled in.

Everything returns a complete IP packet as ``bytes``, ready for a TUN write or WireGuard. The
kernel verifies every checksum on packets written into a TUN, so each builder computes them: the
IPv4 header checksum, and the TCP/UDP/ICMPv6 checksums over the pseudo-header (ICMPv4 has none).
Addresses are ints (IPv4 32-bit, IPv6 128-bit) as in :class:`~nodeagent.packet.parsed.Parsed`.
"""

from __future__ import annotations

import struct

from nodeagent.packet.checksum import checksum, pseudo_header_sum
from nodeagent.packet.parsed import (
    ICMP4_ECHO_REPLY,
    ICMP4_ECHO_REQUEST,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
)

Buffer = bytes | bytearray | memoryview

_V4_HDR = struct.Struct("!BBHHHBBHII")
_V6_HDR = struct.Struct("!IHBB16s16s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_UDP_HDR = struct.Struct("!HHHH")
_ICMP_HDR = struct.Struct("!BBHHH")

IPV4_DF = 0x4000  # "don't fragment" in the flags/fragment-offset field


def build_ipv4(
    src: int,
    dst: int,
    proto: int,
    payload: Buffer,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    flags_frag: int = 0,
) -> bytes:
    """An IPv4 packet: 20-byte header (IHL 5, no options) with its checksum, then ``payload``."""
    total = 20 + len(payload)
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
    hdr = _V4_HDR.pack(0x45, tos, total, ident & 0xFFFF, flags_frag, ttl, proto, 0, src, dst)
    csum = checksum(hdr)
    return hdr[:10] + csum.to_bytes(2, "big") + hdr[12:] + bytes(payload)


def build_ipv6(
    src: int,
    dst: int,
    next_header: int,
    payload: Buffer,
    hop_limit: int = 64,
    flow_label: int = 0,
    traffic_class: int = 0,
) -> bytes:
    """An IPv6 packet: 40-byte header (no extension headers), then ``payload``."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"IPv6 payload of {len(payload)} bytes exceeds 65535 (no jumbograms)")
    first = (6 << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    s16 = src.to_bytes(16, "big")
    d16 = dst.to_bytes(16, "big")
    hdr = _V6_HDR.pack(first, len(payload), next_header, hop_limit, s16, d16)
    return hdr + bytes(payload)


def build_ip(
    version: int, src: int, dst: int, proto: int, payload: Buffer, ttl: int = 64, ident: int = 0
) -> bytes:
    """IPv4 or IPv6 by ``version``; for IPv6 ``ident`` is the flow label (as Tailscale does)."""
    if version == 4:
        return build_ipv4(src, dst, proto, payload, ttl=ttl, ident=ident)
    if version == 6:
        return build_ipv6(src, dst, proto, payload, hop_limit=ttl, flow_label=ident)
    raise ValueError(f"IP version {version} is neither 4 nor 6")


def _with_checksum(segment: bytes, at: int, csum: int) -> bytes:
    return segment[:at] + csum.to_bytes(2, "big") + segment[at + 2 :]


def tcp_segment(
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    payload: Buffer = b"",
    options: bytes = b"",
) -> bytes:
    """A TCP header (+options, padded to 32 bits) and payload with the checksum filled in.

    ``src``/``dst`` only feed the pseudo-header; the family does not matter for the sum.
    """
    if len(options) % 4:
        options += b"\x00" * (4 - len(options) % 4)
    doff = 20 + len(options)
    if doff > 60:
        raise ValueError("TCP options longer than 40 bytes")
    hdr = _TCP_HDR.pack(
        sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (doff >> 2) << 4, flags & 0xFF,
        window & 0xFFFF, 0, 0,
    )
    seg = hdr + options + bytes(payload)
    csum = checksum(seg, pseudo_header_sum(src, dst, PROTO_TCP, len(seg)))
    return _with_checksum(seg, 16, csum)


def build_tcp(
    version: int,
    src: int,
    dst: int,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    payload: Buffer = b"",
    ttl: int = 64,
    ident: int = 0,
    options: bytes = b"",
) -> bytes:
    """A complete IPv4/IPv6 TCP packet with IP and TCP checksums."""
    seg = tcp_segment(src, dst, sport, dport, seq, ack, flags, window, payload, options)
    return build_ip(version, src, dst, PROTO_TCP, seg, ttl=ttl, ident=ident)


def udp_datagram(src: int, dst: int, sport: int, dport: int, payload: Buffer = b"") -> bytes:
    """A UDP header and payload with the checksum filled in (never 0, which means "none")."""
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes exceeds 65535")
    dgram = _UDP_HDR.pack(sport, dport, length, 0) + bytes(payload)
    csum = checksum(dgram, pseudo_header_sum(src, dst, PROTO_UDP, length))
    # RFC 768: a computed 0 is sent as all ones; 0 would mean "no checksum" (forbidden in IPv6).
    return _with_checksum(dgram, 6, csum or 0xFFFF)


def build_udp(
    version: int,
    src: int,
    dst: int,
    sport: int,
    dport: int,
    payload: Buffer = b"",
    ttl: int = 64,
    ident: int = 0,
) -> bytes:
    """A complete IPv4/IPv6 UDP packet with checksums."""
    dgram = udp_datagram(src, dst, sport, dport, payload)
    return build_ip(version, src, dst, PROTO_UDP, dgram, ttl=ttl, ident=ident)


def icmp_message(
    version: int, src: int, dst: int, icmp_type: int, code: int, rest: int, body: Buffer
) -> bytes:
    """An ICMPv4/ICMPv6 message: type, code, checksum, 32-bit ``rest`` of header, ``body``.

    ICMPv6 checksums cover the IPv6 pseudo-header (RFC 4443); ICMPv4 checksums do not.
    """
    msg = _ICMP_HDR.pack(icmp_type, code, 0, (rest >> 16) & 0xFFFF, rest & 0xFFFF) + bytes(body)
    if version == 6:
        csum = checksum(msg, pseudo_header_sum(src, dst, PROTO_ICMPV6, len(msg)))
    else:
        csum = checksum(msg)
    return _with_checksum(msg, 2, csum)


def build_icmp(
    version: int,
    src: int,
    dst: int,
    icmp_type: int,
    code: int,
    rest: int = 0,
    body: Buffer = b"",
    ttl: int = 64,
    ident: int = 0,
) -> bytes:
    """A complete ICMPv4 (IPv4) or ICMPv6 (IPv6) packet."""
    msg = icmp_message(version, src, dst, icmp_type, code, rest, body)
    proto = PROTO_ICMPV6 if version == 6 else PROTO_ICMP
    return build_ip(version, src, dst, proto, msg, ttl=ttl, ident=ident)


def build_icmp_echo(
    version: int,
    src: int,
    dst: int,
    echo_id: int,
    echo_seq: int,
    payload: Buffer = b"",
    reply: bool = False,
    ttl: int = 64,
) -> bytes:
    """An ICMP/ICMPv6 echo request (or reply with ``reply=True``)."""
    if version == 6:
        t = ICMP6_ECHO_REPLY if reply else ICMP6_ECHO_REQUEST
    else:
        t = ICMP4_ECHO_REPLY if reply else ICMP4_ECHO_REQUEST
    rest = ((echo_id & 0xFFFF) << 16) | (echo_seq & 0xFFFF)
    return build_icmp(version, src, dst, t, 0, rest, payload, ttl=ttl)
