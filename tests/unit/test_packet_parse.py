"""Unit tests for nodeagent.packet.parse: field extraction, malformed input, address helpers."""

from __future__ import annotations

import struct

import pytest

from nodeagent.packet import (
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
    TCP_ACK,
    TCP_SYN,
    UNKNOWN,
    Parsed,
    addr_str,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_udp,
    endpoint_str,
    icmp_echo_id,
    icmp_echo_seq,
    ip_to_int,
    parse,
    parse_endpoint,
    parse_into,
    payload,
    tcp_ack,
    tcp_seq,
    tcp_window,
    udp_datagram,
)
from tests.unit.test_packet_vectors import (
    KERNEL_V4_ECHO_REPLY,
    KERNEL_V4_SYN,
    KERNEL_V4_UDP,
    KERNEL_V6_ECHO_REPLY,
    KERNEL_V6_SYN,
    KERNEL_V6_UDP,
    V4_A,
    V4_B,
    V4_C,
    V6_A,
    V6_B,
    V6_C,
)

# --- kernel-made packets --------------------------------------------------------------------


def test_kernel_ipv4_syn() -> None:
    p = Parsed()
    assert parse_into(KERNEL_V4_SYN, p) == IPV4
    assert (p.kind, p.ip_version, p.proto) == (IPV4, 4, PROTO_TCP)
    assert (p.src_ip, p.dst_ip) == (V4_A, V4_B)
    assert (p.src_port, p.dst_port) == (0xB010, 22)
    assert p.tcp_flags == TCP_SYN
    assert (p.ip_header_len, p.payload_offset, p.length) == (20, 60, 60)
    assert not p.is_fragment
    assert tcp_seq(KERNEL_V4_SYN, p) == 0xBCA6BE05
    assert tcp_ack(KERNEL_V4_SYN, p) == 0
    assert tcp_window(KERNEL_V4_SYN, p) == 0xFAF0


def test_kernel_ipv6_syn() -> None:
    p = Parsed()
    assert parse_into(KERNEL_V6_SYN, p) == IPV6
    assert (p.ip_version, p.proto, p.src_ip, p.dst_ip) == (6, PROTO_TCP, V6_A, V6_B)
    assert (p.src_port, p.dst_port, p.tcp_flags) == (0xC68E, 22, TCP_SYN)
    assert (p.ip_header_len, p.payload_offset, p.length) == (40, 80, 80)
    assert tcp_seq(KERNEL_V6_SYN, p) == 0xC9FF7E10


@pytest.mark.parametrize(
    ("pkt", "kind", "hl"), [(KERNEL_V4_UDP, IPV4, 20), (KERNEL_V6_UDP, IPV6, 40)]
)
def test_kernel_udp(pkt: bytes, kind: int, hl: int) -> None:
    p = Parsed()
    assert parse_into(pkt, p) == kind
    assert (p.proto, p.src_port, p.dst_port, p.tcp_flags) == (PROTO_UDP, pkt[hl] << 8 | pkt[hl + 1],
                                                               5353, 0)
    assert p.payload_offset == hl + 8
    assert bytes(payload(pkt, p)) == b"hello"


def test_kernel_echo_replies() -> None:
    p = Parsed()
    assert parse_into(KERNEL_V4_ECHO_REPLY, p) == IPV4
    assert (p.proto, p.icmp_type, p.icmp_code, p.src_port, p.dst_port) == (PROTO_ICMP, 0, 0, 0, 0)
    assert (p.src_ip, p.dst_ip) == (V4_A, V4_C)
    assert (icmp_echo_id(KERNEL_V4_ECHO_REPLY, p), icmp_echo_seq(KERNEL_V4_ECHO_REPLY, p)) == (
        0x1234, 7)
    assert bytes(payload(KERNEL_V4_ECHO_REPLY, p)) == b"abcdefgh"
    assert parse_into(KERNEL_V6_ECHO_REPLY, p) == IPV6
    assert (p.proto, p.icmp_type, p.icmp_code) == (PROTO_ICMPV6, 129, 0)
    assert (p.src_ip, p.dst_ip) == (V6_A, V6_C)
    assert icmp_echo_id(KERNEL_V6_ECHO_REPLY, p) == 0x1234


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_buffer_types_parse_alike(wrap: type) -> None:
    p = Parsed()
    assert parse_into(wrap(KERNEL_V6_SYN), p) == IPV6
    assert (p.src_port, p.dst_port, p.tcp_flags, p.src_ip) == (0xC68E, 22, TCP_SYN, V6_A)


# --- IPv4 header handling -------------------------------------------------------------------


def _v4_with_options(options: bytes, proto: int, body: bytes) -> bytes:
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(body)
    hdr = struct.pack("!BBHHHBBHII", 0x40 | ihl, 0, total, 0, 0, 64, proto, 0, V4_A, V4_B)
    return hdr + options + body


def test_ipv4_options_are_skipped_by_ihl() -> None:
    pkt = _v4_with_options(b"\x01\x01\x01\x00" * 2, PROTO_UDP, udp_datagram(V4_A, V4_B, 1, 2, b"x"))
    p = parse(pkt)
    assert (p.kind, p.ip_header_len, p.src_port, p.dst_port) == (IPV4, 28, 1, 2)
    assert p.payload_offset == 36


def test_trailing_bytes_beyond_total_length_are_ignored() -> None:
    pkt = build_udp(4, V4_A, V4_B, 1000, 2000, b"abc") + b"\xee" * 10
    p = parse(pkt)
    assert p.kind == IPV4 and p.length == 31
    assert bytes(payload(pkt, p)) == b"abc"


@pytest.mark.parametrize(
    "pkt",
    [
        b"",
        b"\x45",
        KERNEL_V4_SYN[:19],
        b"\x44" + KERNEL_V4_SYN[1:],  # IHL 4 < 5
        KERNEL_V4_SYN[:2] + b"\x00\x13" + KERNEL_V4_SYN[4:],  # total length 19 < IHL
        KERNEL_V4_SYN[:2] + b"\x00\x3d" + KERNEL_V4_SYN[4:],  # total length > buffer
        KERNEL_V4_SYN[:59],  # truncated
        KERNEL_V4_SYN[:2] + b"\x00\x27" + KERNEL_V4_SYN[4:39],  # TCP header cut to 19 bytes
        KERNEL_V4_SYN[:32] + b"\x40" + KERNEL_V4_SYN[33:],  # TCP data offset 4 < 5
        KERNEL_V4_SYN[:32] + b"\xb0" + KERNEL_V4_SYN[33:],  # TCP data offset 44 > segment
        KERNEL_V4_UDP[:2] + b"\x00\x1b" + KERNEL_V4_UDP[4:27],  # UDP header 7 bytes
        KERNEL_V4_ECHO_REPLY[:2] + b"\x00\x1b" + KERNEL_V4_ECHO_REPLY[4:27],  # ICMP 7 bytes
        build_ipv4(V4_A, V4_B, PROTO_TSMP, b"!\x06A\x00\x01\x00"),  # TSMP body 6 < 7
        build_ipv4(V4_A, V4_B, PROTO_SCTP, bytes(11)),
    ],
)
def test_malformed_ipv4_is_invalid(pkt: bytes) -> None:
    p = parse(KERNEL_V4_SYN)  # a stale, valid state must be fully replaced
    assert parse_into(pkt, p) == INVALID
    assert (p.kind, p.proto, p.src_ip, p.src_port) == (INVALID, 0, 0, 0)
    assert (p.tcp_flags, p.length, p.payload_offset) == (0, 0, 0)


def test_unknown_version() -> None:
    p = Parsed()
    assert parse_into(b"\x50" + bytes(39), p) == UNKNOWN
    assert p.ip_version == 5
    assert parse_into(b"\x00", p) == UNKNOWN


def test_ipv4_non_first_fragment() -> None:
    seg = udp_datagram(V4_A, V4_B, 53, 53, b"y" * 16)
    pkt = build_ipv4(V4_A, V4_B, PROTO_UDP, seg, flags_frag=185)  # offset 185*8, last fragment
    p = parse(pkt)
    assert (p.kind, p.proto, p.is_fragment) == (IPV4, PROTO_FRAGMENT, True)
    assert (p.src_port, p.dst_port, p.src_ip, p.dst_ip) == (0, 0, V4_A, V4_B)
    assert p.payload_offset == 20


def test_ipv4_first_fragment_parses_transport() -> None:
    seg = build_tcp(4, V4_A, V4_B, 1234, 80, 5, 6, TCP_SYN | TCP_ACK, payload=b"z" * 8)[20:]
    p = parse(build_ipv4(V4_A, V4_B, PROTO_TCP, seg, flags_frag=0x2000))  # MF, offset 0
    assert (p.kind, p.proto, p.is_fragment) == (IPV4, PROTO_TCP, False)
    assert (p.src_port, p.dst_port, p.tcp_flags) == (1234, 80, TCP_SYN | TCP_ACK)
    # A first fragment too short to hold the TCP header is refused (RFC 1858).
    assert parse(build_ipv4(V4_A, V4_B, PROTO_TCP, seg[:12], flags_frag=0x2000)).kind == INVALID


def test_ipv4_tsmp_first_fragment_is_invalid() -> None:
    body = b"!\x06A\x9c\x40\x00\x16"
    assert parse(build_ipv4(V4_A, V4_B, PROTO_TSMP, body)).kind == IPV4
    assert parse(build_ipv4(V4_A, V4_B, PROTO_TSMP, body, flags_frag=0x2000)).kind == INVALID


def test_other_protocols_have_no_ports() -> None:
    p = parse(build_ipv4(V4_A, V4_B, 47, b"\x00" * 4))  # GRE
    assert (p.kind, p.proto, p.src_port, p.dst_port, p.payload_offset) == (IPV4, 47, 0, 0, 20)
    p = parse(build_ipv4(V4_A, V4_B, PROTO_SCTP, bytes.fromhex("0b5a1f90") + bytes(8)))
    assert (p.proto, p.src_port, p.dst_port, p.payload_offset) == (PROTO_SCTP, 2906, 8080, 32)


def test_reused_parsed_resets_per_protocol_fields() -> None:
    p = Parsed()
    parse_into(KERNEL_V4_SYN, p)
    parse_into(KERNEL_V4_ECHO_REPLY, p)
    assert (p.tcp_flags, p.src_port, p.dst_port) == (0, 0, 0)
    parse_into(KERNEL_V4_UDP, p)
    assert (p.icmp_type, p.tcp_flags) == (0, 0)


# --- IPv6 extension headers and fragments ---------------------------------------------------


def _ext(next_header: int, units: int) -> bytes:
    """A generic extension header of (units+1)*8 bytes (options are PadN-filled zeros)."""
    return bytes((next_header, units)) + bytes(6 + 8 * units)


def test_ipv6_extension_chain_is_skipped() -> None:
    tcp = build_tcp(6, V6_A, V6_B, 4000, 443, 1, 0, TCP_SYN)[40:]
    chain = _ext(60, 0) + _ext(43, 1) + _ext(6, 0)  # hop-by-hop → dest opts(16) → routing → TCP
    p = parse(build_ipv6(V6_A, V6_B, 0, chain + tcp))
    assert (p.kind, p.proto, p.src_port, p.dst_port) == (IPV6, PROTO_TCP, 4000, 443)
    assert p.ip_header_len == 40 + 32
    assert p.payload_offset == 40 + 32 + 20


def test_ipv6_fragment_header() -> None:
    udp = udp_datagram(V6_A, V6_B, 7, 9, b"data")
    first = bytes((17, 0)) + struct.pack("!HI", 0x0001, 0xABCD)  # offset 0, M=1
    p = parse(build_ipv6(V6_A, V6_B, 44, first + udp))
    assert (p.kind, p.proto, p.is_fragment) == (IPV6, PROTO_UDP, False)
    assert (p.src_port, p.dst_port) == (7, 9)
    assert p.ip_header_len == 48
    later = bytes((17, 0)) + struct.pack("!HI", (100 << 3), 0xABCD)
    p = parse(build_ipv6(V6_A, V6_B, 44, later + b"more data"))
    assert (p.kind, p.proto, p.is_fragment, p.src_port) == (IPV6, PROTO_FRAGMENT, True, 0)
    assert p.ip_header_len == 48
    # A first fragment whose UDP header lies in the next fragment is refused.
    assert parse(build_ipv6(V6_A, V6_B, 44, first + udp[:4])).kind == INVALID


def test_ipv6_extension_limits() -> None:
    tcp = build_tcp(6, V6_A, V6_B, 1, 2, 0, 0, TCP_SYN)[40:]
    eight = b"".join(_ext(60, 0) for _ in range(7)) + _ext(6, 0)
    assert parse(build_ipv6(V6_A, V6_B, 60, eight + tcp)).kind == IPV6
    nine = _ext(60, 0) + eight
    assert parse(build_ipv6(V6_A, V6_B, 60, nine + tcp)).kind == INVALID
    assert parse(build_ipv6(V6_A, V6_B, 60, _ext(6, 3)[:16])).kind == INVALID  # overruns packet
    assert parse(build_ipv6(V6_A, V6_B, 0, b"\x06\x00\x00")).kind == INVALID  # < 8 bytes


def test_ipv6_malformed_and_no_next_header() -> None:
    assert parse(KERNEL_V6_SYN[:39]).kind == INVALID
    assert parse(KERNEL_V6_SYN[:79]).kind == INVALID  # payload length says 40, only 39 there
    p = parse(build_ipv6(V6_A, V6_B, 59, b""))
    assert (p.kind, p.proto, p.length, p.payload_offset) == (IPV6, 59, 40, 40)


# --- address helpers ------------------------------------------------------------------------


def test_addr_and_endpoint_rendering() -> None:
    assert addr_str(4, V4_A) == "100.64.0.1"
    assert addr_str(4, 0xFFFFFFFF) == "255.255.255.255"
    assert addr_str(6, V6_A) == "fd7a:115c:a1e0::1"
    assert addr_str(6, 0) == "::"
    assert endpoint_str(4, V4_A, 51234) == "100.64.0.1:51234"
    assert endpoint_str(6, V6_A, 51234) == "[fd7a:115c:a1e0::1]:51234"
    with pytest.raises(ValueError):
        addr_str(5, 1)


def test_ip_to_int_and_parse_endpoint() -> None:
    assert ip_to_int("100.64.0.1") == (4, V4_A)
    assert ip_to_int("fd7a:115c:a1e0::1") == (6, V6_A)
    assert ip_to_int("[fd7a:115c:a1e0::1]") == (6, V6_A)
    for bad in ("100.64.0.256", "", "fd7a::1::2", "host.example"):
        with pytest.raises(ValueError):
            ip_to_int(bad)
    assert parse_endpoint("100.64.0.1:51234") == (4, V4_A, 51234)
    assert parse_endpoint("[fd7a:115c:a1e0::1]:443") == (6, V6_A, 443)
    for bad in ("100.64.0.1", "fd7a::1:443", "[100.64.0.1]:1", "1.2.3.4:70000", "[::1:80"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
