"""Unit tests for checksums and packet builders, against kernel-made and hand-computed bytes."""

from __future__ import annotations

import pytest

from nodeagent.packet import (
    IPV4,
    IPV6,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_PSH,
    TCP_SYN,
    build_icmp_echo,
    build_ip,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_udp,
    checksum,
    icmp_echo_id,
    icmp_echo_seq,
    icmp_message,
    ipv4_header_ok,
    parse,
    payload,
    pseudo_header_sum,
    tcp_ack,
    tcp_segment,
    tcp_seq,
    transport_checksum_ok,
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
    ref_checksum,
    ref_pseudo,
)

# --- checksum -------------------------------------------------------------------------------


def test_checksum_rfc1071_example_and_edges() -> None:
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert checksum(b"") == 0xFFFF
    assert checksum(bytes(10)) == 0xFFFF
    assert checksum(b"\xff\xff") == 0  # sum is "negative zero"
    assert checksum(b"\x01") == ref_checksum(b"\x01") == 0xFEFF  # odd length pads on the right
    assert checksum(b"\x12\x34\x56", 0x10000) == ref_checksum(b"\x12\x34\x56\x00\x00\x01")


def test_ipv4_header_checksum_textbook_vector() -> None:
    # The worked example of the IPv4 header checksum (192.168.0.1 → 192.168.0.199, UDP, DF).
    hdr = build_ipv4(0xC0A80001, 0xC0A800C7, 17, bytes(0x73 - 20), ttl=64, flags_frag=0x4000)[:20]
    assert hdr == bytes.fromhex("45000073 00004000 4011b861 c0a80001 c0a800c7")


@pytest.mark.parametrize("version", [4, 6])
def test_pseudo_header_sum_matches_rfc_layout(version: int) -> None:
    src, dst = (V4_A, V4_B) if version == 4 else (V6_A, V6_B)
    data = b"segment bytes!"
    ours = checksum(data, pseudo_header_sum(src, dst, PROTO_UDP, len(data)))
    assert ours == ref_checksum(ref_pseudo(version, src, dst, PROTO_UDP, len(data)) + data)


def test_checksum_verifiers_detect_corruption() -> None:
    for pkt in (KERNEL_V4_SYN, KERNEL_V4_UDP, KERNEL_V4_ECHO_REPLY, KERNEL_V6_SYN, KERNEL_V6_UDP,
                KERNEL_V6_ECHO_REPLY):
        p = parse(pkt)
        assert transport_checksum_ok(pkt, p)
        bad = bytearray(pkt)
        bad[-1] ^= 0x01
        assert not transport_checksum_ok(bad, parse(bad))
    p = parse(KERNEL_V4_SYN)
    assert ipv4_header_ok(KERNEL_V4_SYN, p)
    bad = bytearray(KERNEL_V4_SYN)
    bad[8] = 63  # TTL changed without fixing the header checksum
    assert not ipv4_header_ok(bad, parse(bad))


def test_udp_over_ipv4_zero_checksum_means_none() -> None:
    pkt = bytearray(build_udp(4, V4_A, V4_B, 1, 2, b"abc"))
    pkt[26:28] = b"\x00\x00"
    assert transport_checksum_ok(pkt, parse(pkt))
    pkt6 = bytearray(build_udp(6, V6_A, V6_B, 1, 2, b"abc"))
    pkt6[46:48] = b"\x00\x00"
    assert not transport_checksum_ok(pkt6, parse(pkt6))  # mandatory in IPv6


# --- builders reproduce kernel bytes --------------------------------------------------------


def test_tcp_segment_matches_kernel_syns() -> None:
    opts4 = KERNEL_V4_SYN[40:60]
    assert tcp_segment(V4_A, V4_B, 0xB010, 22, 0xBCA6BE05, 0, TCP_SYN, 0xFAF0,
                       options=opts4) == KERNEL_V4_SYN[20:]
    opts6 = KERNEL_V6_SYN[60:80]
    assert tcp_segment(V6_A, V6_B, 0xC68E, 22, 0xC9FF7E10, 0, TCP_SYN, 0xFD20,
                       options=opts6) == KERNEL_V6_SYN[40:]


def test_udp_and_icmp_match_kernel() -> None:
    assert udp_datagram(V4_A, V4_B, 0xA5DA, 5353, b"hello") == KERNEL_V4_UDP[20:]
    assert udp_datagram(V6_A, V6_B, 0xE661, 5353, b"hello") == KERNEL_V6_UDP[40:]
    assert icmp_message(4, V4_A, V4_C, 0, 0, 0x12340007, b"abcdefgh") == KERNEL_V4_ECHO_REPLY[20:]
    assert icmp_message(6, V6_A, V6_C, 129, 0, 0x12340007, b"abcdefgh") == KERNEL_V6_ECHO_REPLY[40:]


def test_ipv4_header_matches_kernel() -> None:
    # The kernel's UDP packet: ID 0x63c0, DF, TTL 64.
    pkt = build_ipv4(V4_A, V4_B, PROTO_UDP, KERNEL_V4_UDP[20:], ident=0x63C0, flags_frag=0x4000)
    assert pkt == KERNEL_V4_UDP


def test_ipv6_header_layout() -> None:
    pkt = build_ipv6(V6_A, V6_B, PROTO_UDP, KERNEL_V6_UDP[40:], flow_label=0x59D4F)
    assert pkt == KERNEL_V6_UDP
    pkt = build_ipv6(V6_A, V6_B, 99, b"!", hop_limit=7, flow_label=0xFFFFF, traffic_class=0xAB)
    assert pkt[:8] == bytes.fromhex("6abfffff00016307")


# --- builder behaviour ----------------------------------------------------------------------


@pytest.mark.parametrize(("version", "src", "dst"), [(4, V4_A, V4_B), (6, V6_A, V6_B)])
def test_build_tcp_round_trip(version: int, src: int, dst: int) -> None:
    pkt = build_tcp(version, src, dst, 51234, 443, 0xFFFFFFFF + 5, 77, TCP_ACK | TCP_PSH,
                    window=1000, payload=b"GET /")
    p = parse(pkt)
    assert p.kind == (IPV4 if version == 4 else IPV6)
    assert (p.proto, p.src_ip, p.dst_ip) == (PROTO_TCP, src, dst)
    assert (p.src_port, p.dst_port) == (51234, 443)
    assert (p.tcp_flags, tcp_seq(pkt, p), tcp_ack(pkt, p)) == (TCP_ACK | TCP_PSH, 4, 77)
    assert bytes(payload(pkt, p)) == b"GET /"
    assert transport_checksum_ok(pkt, p)
    hl = 20 if version == 4 else 40
    seg = pkt[hl:]
    assert ref_checksum(ref_pseudo(version, src, dst, PROTO_TCP, len(seg)) + seg) == 0
    if version == 4:
        assert ref_checksum(pkt[:20]) == 0
        assert (pkt[8], pkt[4:8]) == (64, bytes(4))  # TTL 64, ID 0, no flags


def test_udp_checksum_zero_is_sent_as_all_ones() -> None:
    # Pick the payload word that makes the sum 0xffff: the checksum over a zero word is exactly it.
    probe = udp_datagram(V4_A, V4_B, 1, 2, b"\x00\x00")
    word = probe[6:8]
    dgram = udp_datagram(V4_A, V4_B, 1, 2, word)
    assert dgram[6:8] == b"\xff\xff"
    pkt = build_ip(4, V4_A, V4_B, PROTO_UDP, dgram)
    assert transport_checksum_ok(pkt, parse(pkt))


@pytest.mark.parametrize(("version", "src", "dst"), [(4, V4_A, V4_B), (6, V6_A, V6_B)])
@pytest.mark.parametrize("reply", [False, True])
def test_icmp_echo(version: int, src: int, dst: int, reply: bool) -> None:
    pkt = build_icmp_echo(version, src, dst, 0xBEEF, 0x0102, b"ping!", reply=reply)
    p = parse(pkt)
    expect = {(4, False): 8, (4, True): 0, (6, False): 128, (6, True): 129}[(version, reply)]
    assert (p.icmp_type, p.icmp_code) == (expect, 0)
    assert (icmp_echo_id(pkt, p), icmp_echo_seq(pkt, p)) == (0xBEEF, 0x0102)
    assert bytes(payload(pkt, p)) == b"ping!"
    assert transport_checksum_ok(pkt, p)
    if version == 6:
        msg = pkt[40:]
        assert ref_checksum(ref_pseudo(6, src, dst, PROTO_ICMPV6, len(msg)) + msg) == 0
    else:
        assert ref_checksum(pkt[20:]) == 0


def test_size_limits_and_bad_version() -> None:
    with pytest.raises(ValueError):
        build_ipv4(V4_A, V4_B, PROTO_UDP, bytes(65516))
    with pytest.raises(ValueError):
        build_ipv6(V6_A, V6_B, PROTO_UDP, bytes(65536))
    with pytest.raises(ValueError):
        build_ip(5, 1, 2, PROTO_UDP, b"")
    with pytest.raises(ValueError):
        build_tcp(4, V4_A, V4_B, 1, 2, 0, 0, TCP_SYN, options=bytes(44))
    assert len(build_ipv4(V4_A, V4_B, PROTO_UDP, bytes(65515))) == 65535
