"""Unit tests for the forged fast-failure replies: TCP RST and ICMP destination unreachable.

(The bytes these produce were also checked against a real Linux stack through a TUN device:
connect() failed with ECONNREFUSED, a connected UDP socket with EHOSTUNREACH / EACCES.)
"""

from __future__ import annotations

import pytest

from nodeagent.packet import (
    IPV4,
    IPV6,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    build_icmp_echo,
    build_icmp_unreachable,
    build_ipv4,
    build_tcp,
    build_tcp_rst_for,
    build_udp,
    ipv4_header_ok,
    parse,
    payload,
    tcp_ack,
    tcp_seq,
    tcp_window,
    transport_checksum_ok,
)
from tests.unit.test_packet_vectors import (
    KERNEL_V4_SYN,
    KERNEL_V4_UDP,
    KERNEL_V6_SYN,
    KERNEL_V6_UDP,
    V4_A,
    V4_B,
    V6_A,
    V6_B,
    ref_checksum,
)

# --- TCP RST --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("syn", "kind", "seq"), [(KERNEL_V4_SYN, IPV4, 0xBCA6BE05), (KERNEL_V6_SYN, IPV6, 0xC9FF7E10)]
)
def test_rst_answers_kernel_syn(syn: bytes, kind: int, seq: int) -> None:
    orig = parse(syn)
    rst = build_tcp_rst_for(syn)
    assert rst is not None
    p = parse(rst)
    assert p.kind == kind and p.proto == PROTO_TCP
    assert (p.src_ip, p.dst_ip) == (orig.dst_ip, orig.src_ip)
    assert (p.src_port, p.dst_port) == (orig.dst_port, orig.src_port)
    assert p.tcp_flags == TCP_RST | TCP_ACK
    assert (tcp_seq(rst, p), tcp_ack(rst, p), tcp_window(rst, p)) == (0, seq + 1, 0)
    assert p.length == p.payload_offset  # no data
    assert transport_checksum_ok(rst, p)
    if kind == IPV4:
        assert ipv4_header_ok(rst, p) and rst[8] == 64


def test_rst_ack_counts_syn_data_and_wraps() -> None:
    syn = build_tcp(4, V4_A, V4_B, 1000, 80, 0xFFFFFFFF, 0, TCP_SYN, payload=b"fastopen")
    rst = build_tcp_rst_for(syn)
    assert rst is not None
    assert tcp_ack(rst, parse(rst)) == 8  # 0xffffffff + 1 (SYN) + 8 bytes, mod 2**32
    fin = build_tcp(4, V4_A, V4_B, 1000, 80, 10, 0, TCP_SYN | TCP_FIN)
    rst = build_tcp_rst_for(fin)
    assert rst is not None and tcp_ack(rst, parse(rst)) == 12


def test_rst_for_segment_with_ack_uses_its_ack_as_seq() -> None:
    seg = build_tcp(6, V6_A, V6_B, 1000, 80, 5, 0xDEADBEEF, TCP_ACK | TCP_PSH, payload=b"x")
    rst = build_tcp_rst_for(seg)
    assert rst is not None
    p = parse(rst)
    assert (p.tcp_flags, tcp_seq(rst, p), tcp_ack(rst, p)) == (TCP_RST, 0xDEADBEEF, 0)
    assert transport_checksum_ok(rst, p)


def test_no_rst_for_rst_non_tcp_or_garbage() -> None:
    assert build_tcp_rst_for(build_tcp(4, V4_A, V4_B, 1, 2, 0, 0, TCP_RST)) is None
    assert build_tcp_rst_for(build_tcp(4, V4_A, V4_B, 1, 2, 0, 0, TCP_RST | TCP_ACK)) is None
    assert build_tcp_rst_for(KERNEL_V4_UDP) is None
    assert build_tcp_rst_for(b"\x45garbage") is None
    multicast = build_tcp(4, V4_A, 0xE0000001, 1, 2, 0, 0, TCP_SYN)
    assert build_tcp_rst_for(multicast) is None


# --- ICMP unreachable -----------------------------------------------------------------------


def test_icmpv4_unreachable_quotes_and_addresses_back() -> None:
    icmp = build_icmp_unreachable(KERNEL_V4_UDP, 4)
    assert icmp is not None
    p = parse(icmp)
    assert (p.kind, p.proto, p.icmp_type, p.icmp_code) == (IPV4, PROTO_ICMP, 3, 13)
    assert (p.src_ip, p.dst_ip) == (V4_B, V4_A)
    assert icmp[24:28] == bytes(4)  # the unused word is zero
    assert bytes(payload(icmp, p)) == KERNEL_V4_UDP  # small packet: quoted whole
    assert ref_checksum(icmp[20:]) == 0 and ipv4_header_ok(icmp, p)
    assert transport_checksum_ok(icmp, p)


def test_icmpv6_unreachable_quotes_and_addresses_back() -> None:
    icmp = build_icmp_unreachable(KERNEL_V6_UDP)
    assert icmp is not None
    p = parse(icmp)
    assert (p.kind, p.proto, p.icmp_type, p.icmp_code) == (IPV6, PROTO_ICMPV6, 1, 1)
    assert (p.src_ip, p.dst_ip) == (V6_B, V6_A)
    assert bytes(payload(icmp, p)) == KERNEL_V6_UDP
    assert transport_checksum_ok(icmp, p)
    assert icmp[7] == 64  # hop limit


@pytest.mark.parametrize(("version", "src", "dst", "limit"), [(4, V4_A, V4_B, 576),
                                                               (6, V6_A, V6_B, 1280)])
def test_unreachable_quote_is_capped(version: int, src: int, dst: int, limit: int) -> None:
    big = build_udp(version, src, dst, 1, 2, bytes(range(256)) * 8)
    icmp = build_icmp_unreachable(big, version)
    assert icmp is not None and len(icmp) == limit
    p = parse(icmp)
    assert bytes(payload(icmp, p)) == big[: limit - p.payload_offset]
    assert transport_checksum_ok(icmp, p)


def test_unreachable_code_override_and_trailing_bytes() -> None:
    icmp = build_icmp_unreachable(KERNEL_V4_UDP + b"junk", code=3)
    assert icmp is not None
    p = parse(icmp)
    assert (p.icmp_type, p.icmp_code) == (3, 3)
    assert bytes(payload(icmp, p)) == KERNEL_V4_UDP  # bytes past the IP total length not quoted
    with pytest.raises(ValueError):
        build_icmp_unreachable(KERNEL_V4_UDP, 6)


def test_no_unreachable_where_rfcs_forbid() -> None:
    err = build_icmp_unreachable(KERNEL_V4_UDP)
    assert err is not None
    assert build_icmp_unreachable(err) is None  # never answer an ICMP error
    err6 = build_icmp_unreachable(KERNEL_V6_UDP)
    assert err6 is not None and build_icmp_unreachable(err6) is None
    assert build_icmp_unreachable(build_udp(4, V4_A, 0xEFFFFFFA, 1, 1900)) is None  # multicast
    assert build_icmp_unreachable(build_udp(4, V4_A, 0xFFFFFFFF, 68, 67)) is None  # broadcast
    assert build_icmp_unreachable(build_udp(4, 0, V4_B, 68, 67)) is None  # unspecified source
    ff02 = 0xFF02 << 112 | 0xFB
    assert build_icmp_unreachable(build_udp(6, V6_A, ff02, 5353, 5353)) is None
    frag = build_ipv4(V4_A, V4_B, PROTO_UDP, bytes(16), flags_frag=10)
    assert build_icmp_unreachable(frag) is None  # non-first fragment
    assert build_icmp_unreachable(b"") is None
    echo = build_icmp_echo(4, V4_A, V4_B, 1, 1)  # echo requests are not errors: answer them
    assert build_icmp_unreachable(echo) is not None
