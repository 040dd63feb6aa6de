"""Parsing raw IP packets into a reused :class:`Parsed`, plus address rendering helpers.

``parse_into`` is the data-plane hot path: it reads only the fixed header fields it needs with
precompiled ``struct`` formats, writes them into the caller's ``Parsed`` and returns the kind. It
never raises on hostile input: anything truncated or inconsistent is ``INVALID``.

Semantics worth knowing:

* ``length`` is the length the IP header claims; trailing bytes past it are ignored.
* A non-first fragment has ``is_fragment`` True and ``proto`` ``PROTO_FRAGMENT`` (its transport
  header is in another fragment). A first fragment is parsed normally, but its transport header
  must be complete, else the packet is ``INVALID`` (the tiny-fragment attack of RFC 1858).
* IPv6 hop-by-hop, routing, destination-options and fragment headers are skipped (at most
  ``MAX_IPV6_EXT_HEADERS``); ``ip_header_len`` then includes them.
* TSMP bodies shorter than 7 bytes, and TSMP in a first fragment, are ``INVALID``: Tailscale treats
  both as an unknown protocol, which every filter drops anyway.
* ICMP needs its 8-byte header; ports stay 0 for ICMP (use :func:`icmp_echo_id`).
"""

from __future__ import annotations

import ipaddress
import struct

from nodeagent.packet.parsed import (
    INVALID,
    IPV4,
    IPV6,
    PROTO_FRAGMENT,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_TSMP,
    PROTO_UDP,
    UNKNOWN,
    Parsed,
)

Buffer = bytes | bytearray | memoryview

MAX_IPV6_EXT_HEADERS = 8
TSMP_MIN_BODY = 7

# IPv6 extension headers skipped on the way to the transport header.
_EXT_HOP_BY_HOP = 0
_EXT_ROUTING = 43
_EXT_FRAGMENT = 44
_EXT_DEST_OPTS = 60
_SKIPPED_EXT = frozenset((_EXT_HOP_BY_HOP, _EXT_ROUTING, _EXT_FRAGMENT, _EXT_DEST_OPTS))

_V4 = struct.Struct("!BxHxxHxBxxII")  # ver/ihl, total length, flags+frag offset, proto, src, dst
_V6 = struct.Struct("!4xHBxQQQQ")  # payload length, next header, src hi/lo, dst hi/lo
_TCP = struct.Struct("!HH8xBB")  # ports, data offset byte, flags byte
_PORTS = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def _set_invalid(p: Parsed, kind: int = INVALID, version: int = 0) -> int:
    p.kind = kind
    p.ip_version = version
    p.proto = 0
    p.src_ip = 0
    p.dst_ip = 0
    p.src_port = 0
    p.dst_port = 0
    p.tcp_flags = 0
    p.icmp_type = 0
    p.icmp_code = 0
    p.ip_header_len = 0
    p.length = 0
    p.payload_offset = 0
    p.is_fragment = False
    return kind


def parse_into(buf: Buffer, p: Parsed) -> int:
    """Fill ``p`` from the IP packet in ``buf`` and return ``p.kind``; never raises on bad bytes."""
    try:
        n = len(buf)
        if n == 0:
            return _set_invalid(p)
        version = buf[0] >> 4
        if version == 4:
            if n < 20:
                return _set_invalid(p)
            vihl, end, frag, proto, src, dst = _V4.unpack_from(buf)
            off = (vihl & 0x0F) << 2
            if off < 20 or end < off or end > n:
                return _set_invalid(p)
            kind = IPV4
            more_frags = frag & 0x2000
            later_frag = frag & 0x1FFF
        elif version == 6:
            if n < 40:
                return _set_invalid(p)
            plen, proto, s_hi, s_lo, d_hi, d_lo = _V6.unpack_from(buf)
            src = (s_hi << 64) | s_lo
            dst = (d_hi << 64) | d_lo
            end = 40 + plen
            if end > n:
                return _set_invalid(p)
            kind = IPV6
            off = 40
            more_frags = later_frag = 0
            if proto in _SKIPPED_EXT:
                hops = 0
                while proto in _SKIPPED_EXT:
                    if hops == MAX_IPV6_EXT_HEADERS or off + 8 > end:
                        return _set_invalid(p)
                    hops += 1
                    nxt = buf[off]
                    if proto == _EXT_FRAGMENT:
                        fo = _U16.unpack_from(buf, off + 2)[0]
                        later_frag = fo & 0xFFF8
                        more_frags = fo & 1
                        off += 8
                    else:
                        off += (buf[off + 1] + 1) << 3
                    proto = nxt
                    if later_frag:
                        break
                if off > end:
                    return _set_invalid(p)
        else:
            return _set_invalid(p, UNKNOWN, version)

        p.ip_version = version
        p.src_ip = src
        p.dst_ip = dst
        p.ip_header_len = off
        p.length = end
        p.tcp_flags = 0
        p.icmp_type = 0
        p.icmp_code = 0
        if later_frag:
            p.kind = kind
            p.proto = PROTO_FRAGMENT
            p.src_port = 0
            p.dst_port = 0
            p.payload_offset = off
            p.is_fragment = True
            return kind
        p.is_fragment = False
        avail = end - off
        if proto == PROTO_TCP:
            if avail < 20:
                return _set_invalid(p)
            sport, dport, doff, flags = _TCP.unpack_from(buf, off)
            doff = (doff >> 4) << 2
            if doff < 20 or doff > avail:
                return _set_invalid(p)
            p.src_port = sport
            p.dst_port = dport
            p.tcp_flags = flags
            p.payload_offset = off + doff
        elif proto == PROTO_UDP:
            if avail < 8:
                return _set_invalid(p)
            p.src_port, p.dst_port = _PORTS.unpack_from(buf, off)
            p.payload_offset = off + 8
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            if avail < 8:
                return _set_invalid(p)
            p.icmp_type = buf[off]
            p.icmp_code = buf[off + 1]
            p.src_port = 0
            p.dst_port = 0
            p.payload_offset = off + 8
        elif proto == PROTO_TSMP:
            if avail < TSMP_MIN_BODY or more_frags:
                return _set_invalid(p)
            p.src_port = 0
            p.dst_port = 0
            p.payload_offset = off
        elif proto == PROTO_SCTP:
            if avail < 12:
                return _set_invalid(p)
            p.src_port, p.dst_port = _PORTS.unpack_from(buf, off)
            p.payload_offset = off + 12
        else:
            p.src_port = 0
            p.dst_port = 0
            p.payload_offset = off
        p.proto = proto
        p.kind = kind
        return kind
    except (struct.error, IndexError, TypeError, ValueError):
        # Only reachable with a buffer of an unusual type or format; bytes input is checked above.
        return _set_invalid(p)


def parse(buf: Buffer) -> Parsed:
    """Convenience for non-hot paths and tests: parse into a fresh ``Parsed``."""
    p = Parsed()
    parse_into(buf, p)
    return p


# --- transport field helpers (valid only for the protocol named; offsets were checked by parse) --


def tcp_seq(buf: Buffer, p: Parsed) -> int:
    """The sequence number of a parsed TCP packet."""
    return _U32.unpack_from(buf, p.ip_header_len + 4)[0]


def tcp_ack(buf: Buffer, p: Parsed) -> int:
    """The acknowledgment number of a parsed TCP packet."""
    return _U32.unpack_from(buf, p.ip_header_len + 8)[0]


def tcp_window(buf: Buffer, p: Parsed) -> int:
    """The (unscaled) window field of a parsed TCP packet."""
    return _U16.unpack_from(buf, p.ip_header_len + 14)[0]


def icmp_echo_id(buf: Buffer, p: Parsed) -> int:
    """The identifier of a parsed ICMP/ICMPv6 echo request or reply."""
    return _U16.unpack_from(buf, p.ip_header_len + 4)[0]


def icmp_echo_seq(buf: Buffer, p: Parsed) -> int:
    """The sequence number of a parsed ICMP/ICMPv6 echo request or reply."""
    return _U16.unpack_from(buf, p.ip_header_len + 6)[0]


def payload(buf: Buffer, p: Parsed) -> Buffer:
    """The transport payload (TCP/UDP data, ICMP body, TSMP body) as a slice of ``buf``."""
    return buf[p.payload_offset : p.length]


def ipv4_ident(buf: Buffer) -> int:
    """The IPv4 identification field (caller has checked the packet is IPv4)."""
    return _U16.unpack_from(buf, 4)[0]


def ipv6_flow_label(buf: Buffer) -> int:
    """The 20-bit IPv6 flow label (caller has checked the packet is IPv6)."""
    return _U32.unpack_from(buf, 0)[0] & 0xFFFFF


# --- addresses ---------------------------------------------------------------------------------


def addr_str(version: int, ip: int) -> str:
    """Render an integer address: ``100.64.0.1`` or ``fd7a:115c:a1e0::1`` (RFC 5952 form)."""
    if version == 4:
        return f"{ip >> 24}.{(ip >> 16) & 0xFF}.{(ip >> 8) & 0xFF}.{ip & 0xFF}"
    if version == 6:
        return ipaddress.IPv6Address(ip).compressed
    raise ValueError(f"IP version {version} is neither 4 nor 6")


def endpoint_str(version: int, ip: int, port: int) -> str:
    """Render ``100.64.0.1:51234`` or ``[fd7a:115c:a1e0::1]:51234``."""
    if version == 6:
        return f"[{addr_str(6, ip)}]:{port}"
    return f"{addr_str(version, ip)}:{port}"


def ip_to_int(s: str) -> tuple[int, int]:
    """Parse an IPv4 or IPv6 address string into ``(version, int)``; raises ValueError if bad.

    A bracketed IPv6 literal (``[fd7a::1]``) is accepted; zone suffixes are not.
    """
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    a = ipaddress.ip_address(s)
    return a.version, int(a)


def parse_endpoint(s: str) -> tuple[int, int, int]:
    """Parse ``a.b.c.d:port`` or ``[v6]:port`` into ``(version, ip, port)``; ValueError if bad."""
    host, sep, port_s = s.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"not an endpoint: {s!r}")
    port = int(port_s)
    if port > 0xFFFF:
        raise ValueError(f"port out of range in {s!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"not an endpoint: {s!r}")
        version, ip = ip_to_int(host)
        if version != 6:
            raise ValueError(f"bracketed address must be IPv6: {s!r}")
    else:
        version, ip = ip_to_int(host)
        if version != 4:
            raise ValueError(f"IPv6 endpoint needs brackets: {s!r}")
    return version, ip, port
