"""Unit tests for TSMP: the reference spec's byte vectors, reject addressing, ping/pong, names."""

from __future__ import annotations

import pytest

from nodeagent.packet import (
    INVALID,
    IPV4,
    IPV6,
    PROTO_TCP,
    PROTO_TSMP,
    PROTO_UDP,
    TCP_SYN,
    TSMP_REASON_ACL,
    TSMP_REASON_APP_CONNECTOR_TRANSIT_IP_UNKNOWN,
    TSMP_REASON_HOST_FIREWALL,
    TSMP_REASON_HOST_IP_FORWARDING,
    TSMP_REASON_SHIELDS,
    TSMP_TYPE_PING,
    TSMP_TYPE_REJECT,
    TSMPPong,
    TSMPReject,
    build_ip,
    build_tcp,
    build_tsmp_disco_advert,
    build_tsmp_ping,
    build_tsmp_pong,
    build_tsmp_pong_for,
    build_tsmp_reject,
    build_udp,
    connreject_reason,
    encode_tsmp_reject,
    ip_to_int,
    ipv4_header_ok,
    parse,
    parse_tsmp_disco_advert,
    parse_tsmp_ping,
    parse_tsmp_pong,
    parse_tsmp_reject,
    proto_name,
    reason_name,
    tsmp_type,
)
from tests.unit.test_packet_vectors import V4_A, V4_B, V6_A, V6_B

# Reference spec vectors (specs/reference/tsmp.md §4.5, §5, §6), copied in the spec's spacing.
REJECT_ACL = bytes.fromhex(
    "45 00 00 1b 00 00 00 00 40 63 b1 fd 64 40 00 02 64 40 00 01 21 06 41 9c 40 00 16"
)
REJECT_F_MAYBE_BROKEN = bytes.fromhex(
    "45 00 00 1c 00 00 00 00 40 63 b1 fc 64 40 00 02 64 40 00 01 21 06 46 9c 40 00 16 01"
)
PING = bytes.fromhex(
    "45 00 00 1d 00 00 00 00 40 63 b1 fb 64 40 00 01 64 40 00 02 70 01 02 03 04 05 06 07 08"
)
PONG = bytes.fromhex(
    "45 00 00 1f ff ff 00 00 40 63 b1 f9 64 40 00 02 64 40 00 01 6f 01 02 03 04 05 06 07 08"
    " 12 34"
)
DISCO_V4 = bytes.fromhex("45 00 00 35 00 00 00 00 40 63 70 5d 01 02 03 04 04 03 02 01 61") + (
    b"\x61" * 32
)
DISCO_V6_HEAD = bytes.fromhex("60 00 00 00 00 21 63 40")


def test_reject_vectors_build_exactly() -> None:
    dropped = parse(build_tcp(4, V4_A, V4_B, 40000, 22, 1, 0, TCP_SYN))
    assert build_tsmp_reject(dropped, TSMP_REASON_ACL) == REJECT_ACL
    assert build_tsmp_reject(dropped, TSMP_REASON_HOST_IP_FORWARDING, maybe_broken=True) == (
        REJECT_F_MAYBE_BROKEN)


def test_reading_a_reject_gives_the_original_flow() -> None:
    p = parse(REJECT_ACL)
    assert (p.kind, p.proto, p.src_ip, p.dst_ip) == (IPV4, PROTO_TSMP, V4_B, V4_A)
    assert tsmp_type(REJECT_ACL, p) == TSMP_TYPE_REJECT
    r = parse_tsmp_reject(REJECT_ACL, p)
    assert r == TSMPReject(4, PROTO_TCP, TSMP_REASON_ACL, V4_A, V4_B, 40000, 22, False)
    assert str(r) == "TSMP-reject-flow{TCP 100.64.0.1:40000 > 100.64.0.2:22}: acl"
    assert (r.src_str, r.dst_str, r.reason_name, r.connreject_reason) == (
        "100.64.0.1:40000", "100.64.0.2:22", "acl", "acl")
    r = parse_tsmp_reject(REJECT_F_MAYBE_BROKEN, parse(REJECT_F_MAYBE_BROKEN))
    assert r is not None and r.maybe_broken and r.reason_byte == TSMP_REASON_HOST_IP_FORWARDING
    assert r.reason_name == "host-ip-forwarding-unavailable"
    assert r.connreject_reason == "host-ip-forwarding"


def test_reject_string_matches_tailscale_example() -> None:
    r = TSMPReject(4, PROTO_TCP, TSMP_REASON_ACL, ip_to_int("1.2.3.4")[1],
                   ip_to_int("5.5.5.5")[1], 567, 443)
    assert str(r) == "TSMP-reject-flow{TCP 1.2.3.4:567 > 5.5.5.5:443}: acl"


def test_ipv6_reject_header_and_round_trip() -> None:
    dropped = parse(build_udp(6, V6_A, V6_B, 5000, 53, b"q"))
    pkt = build_tsmp_reject(dropped, TSMP_REASON_SHIELDS)
    # version 6, class/flow 0, payload 7, next header 99, hop limit 64, src = refuser (B).
    assert pkt[:8] == bytes.fromhex("6000000000076340")
    assert pkt[8:24] == V6_B.to_bytes(16, "big") and pkt[24:40] == V6_A.to_bytes(16, "big")
    assert pkt[40:] == b"!\x11S\x13\x88\x00\x35"
    r = parse_tsmp_reject(pkt, parse(pkt))
    assert r == TSMPReject(6, PROTO_UDP, TSMP_REASON_SHIELDS, V6_A, V6_B, 5000, 53, False)
    assert str(r) == (
        "TSMP-reject-flow{UDP [fd7a:115c:a1e0::1]:5000 > [fd7a:115c:a1e0::2]:53}: shields"
    )


def test_reject_flags_and_extra_bytes() -> None:
    base = b"!\x06W\x9c\x40\x00\x16"
    for tail, broken in ((b"", False), (b"\x00", False), (b"\x01", True), (b"\x03", True),
                         (b"\x01" + b"future" * 3, True), (b"\x02zzz", False)):
        pkt = build_ip(4, V4_B, V4_A, PROTO_TSMP, base + tail)
        r = parse_tsmp_reject(pkt, parse(pkt))
        assert r is not None and r.maybe_broken is broken
        assert (r.reason_byte, r.src_port, r.dst_port) == (TSMP_REASON_HOST_FIREWALL, 40000, 22)


def test_not_a_reject() -> None:
    # Too short: the parser already refuses TSMP bodies under 7 bytes.
    short = build_ip(4, V4_B, V4_A, PROTO_TSMP, b"!\x06A\x9c\x40\x00")
    p = parse(short)
    assert p.kind == INVALID and parse_tsmp_reject(short, p) is None
    assert parse_tsmp_reject(PING, parse(PING)) is None
    other = build_ip(4, V4_B, V4_A, PROTO_TSMP, b"?\x06A\x9c\x40\x00\x16")
    assert parse_tsmp_reject(other, parse(other)) is None
    udp = build_udp(4, V4_A, V4_B, 1, 2, b"!\x06A\x9c\x40\x00\x16")
    assert parse_tsmp_reject(udp, parse(udp)) is None
    assert tsmp_type(udp, parse(udp)) == -1


def test_build_reject_refuses_fragments_and_invalid() -> None:
    frag = parse(build_ip(4, V4_A, V4_B, PROTO_UDP, bytes(16)))
    frag.proto = -1
    with pytest.raises(ValueError):
        build_tsmp_reject(frag, TSMP_REASON_ACL)
    with pytest.raises(ValueError):
        build_tsmp_reject(parse(b""), TSMP_REASON_ACL)


def test_ping_pong_vectors() -> None:
    data = bytes(range(1, 9))
    assert build_tsmp_ping(4, V4_A, V4_B, data) == PING
    p = parse(PING)
    assert tsmp_type(PING, p) == TSMP_TYPE_PING
    assert parse_tsmp_ping(PING, p) == data
    assert build_tsmp_pong_for(PING, p, 0x1234) == PONG
    assert ipv4_header_ok(PONG, parse(PONG))
    assert parse_tsmp_pong(PONG, parse(PONG)) == TSMPPong(data, 0x1234)
    assert parse_tsmp_ping(PONG, parse(PONG)) is None
    assert parse_tsmp_pong(PING, p) is None


def test_pong_forms_and_ipv6_flow_label_inversion() -> None:
    data = b"ABCDEFGH"
    old = build_tsmp_pong(4, V4_B, V4_A, data, None)  # 9-byte body without the port
    assert len(old) == 29
    assert parse_tsmp_pong(old, parse(old)) == TSMPPong(data, 0)
    ping6 = build_tsmp_ping(6, V6_A, V6_B, data, ident=0x12345)
    p6 = parse(ping6)
    assert p6.kind == IPV6
    pong6 = build_tsmp_pong_for(ping6, p6)
    assert pong6 is not None
    assert int.from_bytes(pong6[:4], "big") & 0xFFFFF == 0xEDCBA
    q = parse(pong6)
    assert (q.src_ip, q.dst_ip, pong6[7]) == (V6_B, V6_A, 64)
    assert parse_tsmp_pong(pong6, q) == TSMPPong(data, 0)
    assert build_tsmp_pong_for(REJECT_ACL, parse(REJECT_ACL)) is None
    with pytest.raises(ValueError):
        build_tsmp_ping(4, V4_A, V4_B, b"short")


def test_disco_advert_go_vectors() -> None:
    key = b"\x61" * 32
    one_two, four_three = ip_to_int("1.2.3.4")[1], ip_to_int("4.3.2.1")[1]
    assert build_tsmp_disco_advert(4, one_two, four_three, key) == DISCO_V4
    assert parse_tsmp_disco_advert(DISCO_V4, parse(DISCO_V4)) == key
    s6, d6 = ip_to_int("2001:db8::1")[1], ip_to_int("2001:db8::2")[1]
    pkt6 = build_tsmp_disco_advert(6, s6, d6, key)
    assert pkt6 == DISCO_V6_HEAD + s6.to_bytes(16, "big") + d6.to_bytes(16, "big") + b"a" + key
    assert parse_tsmp_disco_advert(pkt6, parse(pkt6)) == key
    assert parse_tsmp_disco_advert(PING, parse(PING)) is None


def test_reason_names_and_connreject_mapping() -> None:
    assert [reason_name(b) for b in b"ASFWT"] == [
        "acl", "shields", "host-ip-forwarding-unavailable", "host-firewall",
        "app-connector-transit-ip-unknown"]
    assert (TSMP_REASON_ACL, TSMP_REASON_SHIELDS, TSMP_REASON_HOST_IP_FORWARDING,
            TSMP_REASON_HOST_FIREWALL, TSMP_REASON_APP_CONNECTOR_TRANSIT_IP_UNKNOWN) == (
        0x41, 0x53, 0x46, 0x57, 0x54)
    assert reason_name(0x7A) == "0x7a"
    assert reason_name(0) == "0x00"
    assert [connreject_reason(b) for b in b"ASFWTz\x00"] == [
        "acl", "shields", "host-ip-forwarding", "host-firewall", "unknown", "unknown", "unknown"]
    assert (proto_name(6), proto_name(17), proto_name(1), proto_name(58), proto_name(47)) == (
        "TCP", "UDP", "ICMPv4", "ICMPv6", "IPProto-47")


def test_tsmp_reject_is_frozen_value() -> None:
    r = TSMPReject(4, PROTO_TCP, TSMP_REASON_ACL, V4_A, V4_B, 1, 2)
    with pytest.raises(AttributeError):
        r.proto = 17  # type: ignore[misc]
    assert r == TSMPReject(4, PROTO_TCP, TSMP_REASON_ACL, V4_A, V4_B, 1, 2, False)
    assert encode_tsmp_reject(r) == build_tsmp_reject(
        parse(build_tcp(4, V4_A, V4_B, 1, 2, 0, 0, TCP_SYN)), TSMP_REASON_ACL)
