"""The Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-header sum.

The ones'-complement sum of 16-bit big-endian words is congruent, modulo 0xFFFF, to the whole
buffer read as one big-endian integer (because 2**16 == 1 mod 0xFFFF). ``int.from_bytes`` plus one
``%`` therefore does the summing in C, which is far faster than a Python loop over words. The same
identity lets the pseudo-header be summed from the integer addresses directly, for IPv4 and IPv6.
"""

from __future__ import annotations

from nodeagent.packet.parsed import (
    IPV4,
    IPV6,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    Parsed,
)

Buffer = bytes | bytearray | memoryview


def checksum(data: Buffer, initial: int = 0) -> int:
    """The Internet checksum of ``data`` (odd lengths padded with a zero byte).

    ``initial`` is a non-negative partial sum (e.g. :func:`pseudo_header_sum`) folded in first.
    Over a buffer whose checksum field is already filled in, a correct checksum yields 0.
    """
    total = int.from_bytes(data, "big")
    if len(data) & 1:
        total <<= 8
    total += initial
    if total == 0:
        return 0xFFFF  # sum of all-zero words is +0, whose complement is 0xFFFF
    s = total % 0xFFFF
    # A non-zero input can never sum to +0 in ones' complement: s == 0 means the sum is 0xFFFF.
    return 0 if s == 0 else 0xFFFF - s


def pseudo_header_sum(src: int, dst: int, proto: int, length: int) -> int:
    """Partial sum of the IPv4 or IPv6 pseudo-header (addresses as ints, upper-layer length).

    Both layouts reduce to the same sum because every field is a whole number of 16-bit words and
    an integer's value is congruent to the sum of its 16-bit words modulo 0xFFFF.
    """
    return src + dst + proto + length


def ipv4_header_ok(buf: Buffer, p: Parsed) -> bool:
    """True when the IPv4 header checksum of a parsed IPv4 packet verifies."""
    return p.kind == IPV4 and checksum(buf[: p.ip_header_len]) == 0


def transport_checksum_ok(buf: Buffer, p: Parsed) -> bool:
    """True when the TCP/UDP/ICMP/ICMPv6 checksum of a parsed, unfragmented packet verifies.

    Other protocols (and fragments, whose transport data is incomplete) return False. A UDP-over-
    IPv4 checksum of 0 means "not computed" and is accepted.
    """
    if p.kind not in (IPV4, IPV6) or p.is_fragment:
        return False
    proto = p.proto
    off = p.ip_header_len
    seg = buf[off : p.length]
    if proto == PROTO_UDP:
        if p.kind == IPV4 and len(seg) >= 8 and seg[6] == 0 and seg[7] == 0:
            return True
    elif proto == PROTO_ICMP:
        return checksum(seg) == 0
    elif proto not in (PROTO_TCP, PROTO_ICMPV6):
        return False
    return checksum(seg, pseudo_header_sum(p.src_ip, p.dst_ip, proto, len(seg))) == 0
