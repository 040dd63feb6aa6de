"""Replies the agent forges for the local host so a doomed connection fails at once.

When a peer rejects a flow (TSMP), writing one of these into the local TUN makes the host's stack
fail the socket immediately instead of retransmitting until its own timeout:

* :func:`build_tcp_rst_for` — the RST a closed port would send (RFC 9293 §3.10.7.1), as if from
  the original destination: ``connect()`` fails with ECONNREFUSED.
* :func:`build_icmp_unreachable` — ICMPv4 destination unreachable / ICMPv6 destination
  unreachable, "administratively prohibited" by default, quoting the offending packet.

Both return ``None`` when RFC rules forbid a reply (answering an ICMP error or a RST, a non-first
fragment, a multicast/broadcast destination or an unspecified/multicast source) or when the
original packet does not parse.
"""

from __future__ import annotations

from nodeagent.packet.build import build_icmp, build_tcp
from nodeagent.packet.parse import parse_into, tcp_ack, tcp_seq
from nodeagent.packet.parsed import (
    ICMP4_CODE_ADMIN_PROHIBITED,
    ICMP4_UNREACH,
    ICMP6_CODE_ADMIN_PROHIBITED,
    ICMP6_UNREACH,
    IPV4,
    IPV6,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Parsed,
)

Buffer = bytes | bytearray | memoryview

# Quote limits: RFC 1812 §4.3.2.3 (ICMPv4 error ≤ 576 bytes) and RFC 4443 §2.4(c) (ICMPv6 error
# ≤ the IPv6 minimum MTU, 1280). Each covers the whole error packet, so subtract IP + ICMP headers.
_V4_QUOTE_MAX = 576 - 20 - 8
_V6_QUOTE_MAX = 1280 - 40 - 8

_ICMP4_ERROR_TYPES = frozenset((3, 4, 5, 11, 12))  # unreach, quench, redirect, time-ex, param


def _may_answer(p: Parsed) -> bool:
    """RFC 1122 §3.2.2 / RFC 4443 §2.4(e): when an error message must not be generated."""
    if p.is_fragment:
        return False
    if p.kind == IPV4:
        if p.dst_ip >> 28 == 0xE or p.dst_ip == 0xFFFFFFFF:  # multicast, limited broadcast
            return False
        if p.src_ip == 0 or p.src_ip >> 28 == 0xE:
            return False
    else:
        if p.dst_ip >> 120 == 0xFF:
            return False
        if p.src_ip == 0 or p.src_ip >> 120 == 0xFF:
            return False
    return True


def _is_icmp_error(p: Parsed) -> bool:
    if p.proto == PROTO_ICMP:
        return p.icmp_type in _ICMP4_ERROR_TYPES
    if p.proto == PROTO_ICMPV6:
        return p.icmp_type < 128
    return False


def build_icmp_unreachable(
    original_packet: Buffer, version: int | None = None, code: int | None = None
) -> bytes | None:
    """A destination-unreachable error addressed back to the original packet's sender.

    ``code`` defaults to "communication administratively prohibited" (ICMPv4 type 3 code 13,
    ICMPv6 type 1 code 1). The error comes from the original destination address and quotes the
    original packet from its IP header on, as much as the RFC size limit allows. ``version``, if
    given, must match the packet's.
    """
    p = Parsed()
    kind = parse_into(original_packet, p)
    if kind not in (IPV4, IPV6):
        return None
    if version is not None and version != kind:
        raise ValueError(f"packet is IPv{kind}, not IPv{version}")
    if not _may_answer(p) or _is_icmp_error(p):
        return None
    if kind == IPV4:
        quote = original_packet[: min(p.length, _V4_QUOTE_MAX)]
        t = ICMP4_UNREACH
        c = ICMP4_CODE_ADMIN_PROHIBITED if code is None else code
    else:
        quote = original_packet[: min(p.length, _V6_QUOTE_MAX)]
        t = ICMP6_UNREACH
        c = ICMP6_CODE_ADMIN_PROHIBITED if code is None else code
    return build_icmp(kind, p.dst_ip, p.src_ip, t, c, 0, quote)


def build_tcp_rst_for(original_packet: Buffer) -> bytes | None:
    """The RST that answers ``original_packet`` as if its destination had no listener.

    For a SYN (no ACK): RST|ACK with seq 0 and ack = SYN's seq + segment length (1 for a plain
    SYN; SYN data and FIN count too). For a segment carrying ACK: a bare RST with seq = its ack.
    A RST is never answered. The reply goes from the original destination back to the source.
    """
    p = Parsed()
    kind = parse_into(original_packet, p)
    if kind not in (IPV4, IPV6) or p.proto != PROTO_TCP or p.tcp_flags & TCP_RST:
        return None
    if not _may_answer(p):
        return None
    flags = p.tcp_flags
    if flags & TCP_ACK:
        seq = tcp_ack(original_packet, p)
        ack = 0
        out_flags = TCP_RST
    else:
        seg_len = p.length - p.payload_offset
        if flags & TCP_SYN:
            seg_len += 1
        if flags & TCP_FIN:
            seg_len += 1
        seq = 0
        ack = (tcp_seq(original_packet, p) + seg_len) & 0xFFFFFFFF
        out_flags = TCP_RST | TCP_ACK
    return build_tcp(
        kind, p.dst_ip, p.src_ip, p.dst_port, p.src_port, seq, ack, out_flags, window=0
    )
