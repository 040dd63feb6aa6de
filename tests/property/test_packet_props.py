"""Property tests for nodeagent.packet: hostile bytes never raise; every builder round-trips."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.packet import (
    INVALID,
    IPV4,
    IPV6,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_TSMP,
    PROTO_UDP,
    TCP_ACK,
    TCP_RST,
    TCP_SYN,
    UNKNOWN,
    Parsed,
    TSMPPong,
    TSMPReject,
    addr_str,
    build_icmp_echo,
    build_icmp_unreachable,
    build_tcp,
    build_tcp_rst_for,
    build_tsmp_ping,
    build_tsmp_pong,
    build_tsmp_pong_for,
    build_tsmp_reject,
    build_udp,
    checksum,
    encode_tsmp_reject,
    endpoint_str,
    icmp_echo_id,
    icmp_echo_seq,
    ip_to_int,
    ipv4_header_ok,
    parse,
    parse_endpoint,
    parse_into,
    parse_tsmp_disco_advert,
    parse_tsmp_ping,
    parse_tsmp_pong,
    parse_tsmp_reject,
    payload,
    tcp_ack,
    tcp_seq,
    transport_checksum_ok,
    tsmp_type,
)
from tests.unit.test_packet_vectors import KERNEL_V4_SYN, KERNEL_V6_SYN, ref_checksum

versions = st.sampled_from([4, 6])
ports = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
data = st.binary(max_size=300)
# Unicast tailnet ranges, so the RFC "never answer multicast" rules stay out of the way.
v4_addrs = st.integers(0x64400000, 0x647FFFFF)
v6_addrs = st.integers(0xFD7A115CA1E000000000000000000000, 0xFD7A115CA1E0FFFFFFFFFFFFFFFFFFFF)


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[int, int, int]:
    v = draw(versions)
    addrs = v4_addrs if v == 4 else v6_addrs
    return v, draw(addrs), draw(addrs)


def _all_parsers(buf: bytes | bytearray | memoryview) -> int:
    p = Parsed()
    kind = parse_into(buf, p)
    parse_tsmp_reject(buf, p)
    parse_tsmp_ping(buf, p)
    parse_tsmp_pong(buf, p)
    parse_tsmp_disco_advert(buf, p)
    build_tsmp_pong_for(buf, p)
    tsmp_type(buf, p)
    build_icmp_unreachable(buf)
    build_tcp_rst_for(buf)
    if kind in (IPV4, IPV6):
        assert 0 < p.ip_header_len <= p.payload_offset <= p.length <= len(buf)
        assert p.ip_version == kind
    else:
        assert kind in (INVALID, UNKNOWN)
    return kind


# --- hostile input --------------------------------------------------------------------------


@given(st.binary(max_size=200))
def test_random_bytes_never_raise(buf: bytes) -> None:
    _all_parsers(buf)
    _all_parsers(memoryview(buf))


@given(
    st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x61]),
    st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6, PROTO_TSMP, 0, 43, 44, 60]),
    st.binary(max_size=120),
)
def test_header_shaped_garbage_never_raises(first: int, proto: int, rest: bytes) -> None:
    # Plausible first byte and protocol so the fuzz reaches the transport and TSMP parsers.
    if first >> 4 == 4:
        hdr = bytearray(rest[:19].ljust(19, b"\x00"))
        n = 20 + len(rest[19:])
        hdr[1:3] = n.to_bytes(2, "big")
        hdr[8] = proto
        buf = bytes([first]) + bytes(hdr) + rest[19:]
    else:
        hdr = bytearray(rest[:39].ljust(39, b"\x00"))
        hdr[3:5] = len(rest[39:]).to_bytes(2, "big")
        hdr[5] = proto
        buf = bytes([first]) + bytes(hdr) + rest[39:]
    _all_parsers(buf)


@given(st.sampled_from([KERNEL_V4_SYN, KERNEL_V6_SYN]), st.data())
def test_mutations_and_truncations_of_valid_packets(pkt: bytes, d: st.DataObject) -> None:
    cut = d.draw(st.integers(0, len(pkt) - 1))
    assert parse(pkt[:cut]).kind == INVALID  # the IP length field then claims more than is there
    mutated = bytearray(pkt)
    for _ in range(d.draw(st.integers(1, 6))):
        mutated[d.draw(st.integers(0, len(pkt) - 1))] = d.draw(st.integers(0, 255))
    _all_parsers(bytes(mutated))


# --- checksums ------------------------------------------------------------------------------


@given(st.binary(max_size=200), st.integers(0, 0xFFFF))
def test_checksum_matches_reference(buf: bytes, word: int) -> None:
    assert checksum(buf) == ref_checksum(buf)
    padded = buf + b"\x00" if len(buf) % 2 else buf
    assert checksum(buf, word) == ref_checksum(padded + word.to_bytes(2, "big"))


# --- round trips ----------------------------------------------------------------------------


@given(endpoints(), ports, ports, u32, u32, st.integers(0, 0xFF), data)
def test_tcp_round_trip(
    ep: tuple[int, int, int], sp: int, dp: int, seq: int, ack: int, flags: int, body: bytes
) -> None:
    v, src, dst = ep
    pkt = build_tcp(v, src, dst, sp, dp, seq, ack, flags, payload=body)
    p = parse(pkt)
    assert (p.kind, p.proto, p.src_ip, p.dst_ip, p.src_port, p.dst_port, p.tcp_flags) == (
        v, PROTO_TCP, src, dst, sp, dp, flags)
    assert (tcp_seq(pkt, p), tcp_ack(pkt, p), bytes(payload(pkt, p))) == (seq, ack, body)
    assert transport_checksum_ok(pkt, p)
    assert v == 6 or ipv4_header_ok(pkt, p)


@given(endpoints(), ports, ports, data)
def test_udp_round_trip(ep: tuple[int, int, int], sp: int, dp: int, body: bytes) -> None:
    v, src, dst = ep
    pkt = build_udp(v, src, dst, sp, dp, body)
    p = parse(pkt)
    assert (p.kind, p.proto, p.src_ip, p.dst_ip, p.src_port, p.dst_port) == (
        v, PROTO_UDP, src, dst, sp, dp)
    assert bytes(payload(pkt, p)) == body
    assert pkt[p.ip_header_len + 6 : p.ip_header_len + 8] != b"\x00\x00"
    assert transport_checksum_ok(pkt, p)


@given(endpoints(), ports, ports, st.booleans(), data)
def test_icmp_echo_round_trip(
    ep: tuple[int, int, int], ident: int, seq: int, reply: bool, body: bytes
) -> None:
    v, src, dst = ep
    pkt = build_icmp_echo(v, src, dst, ident, seq, body, reply=reply)
    p = parse(pkt)
    assert p.proto == (PROTO_ICMP if v == 4 else PROTO_ICMPV6)
    assert p.icmp_type == {(4, False): 8, (4, True): 0, (6, False): 128, (6, True): 129}[v, reply]
    assert (icmp_echo_id(pkt, p), icmp_echo_seq(pkt, p), bytes(payload(pkt, p))) == (
        ident, seq, body)
    assert (p.src_port, p.dst_port) == (0, 0)
    assert transport_checksum_ok(pkt, p)


@given(endpoints(), st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP, 132]), st.integers(0, 255),
       ports, ports, st.booleans())
def test_tsmp_reject_round_trip(
    ep: tuple[int, int, int], proto: int, reason: int, sp: int, dp: int, broken: bool
) -> None:
    v, src, dst = ep
    r = TSMPReject(v, proto, reason, src, dst, sp, dp, broken)
    pkt = encode_tsmp_reject(r)
    p = parse(pkt)
    assert (p.kind, p.proto, p.src_ip, p.dst_ip) == (v, PROTO_TSMP, dst, src)  # back to sender
    assert len(payload(pkt, p)) == (8 if broken else 7)
    assert parse_tsmp_reject(pkt, p) == r
    assert v == 6 or ipv4_header_ok(pkt, p)


@given(endpoints(), ports, ports, st.integers(0, 255), st.booleans())
def test_tsmp_reject_from_dropped_packet(
    ep: tuple[int, int, int], sp: int, dp: int, reason: int, broken: bool
) -> None:
    v, src, dst = ep
    dropped = parse(build_tcp(v, src, dst, sp, dp, 1, 0, TCP_SYN))
    pkt = build_tsmp_reject(dropped, reason, broken)
    assert parse_tsmp_reject(pkt, parse(pkt)) == TSMPReject(v, PROTO_TCP, reason, src, dst, sp,
                                                           dp, broken)


@given(endpoints(), st.binary(min_size=8, max_size=8), st.one_of(st.none(), ports))
def test_tsmp_ping_pong_round_trip(
    ep: tuple[int, int, int], blob: bytes, port: int | None
) -> None:
    v, src, dst = ep
    ping = build_tsmp_ping(v, src, dst, blob)
    p = parse(ping)
    assert parse_tsmp_ping(ping, p) == blob and parse_tsmp_pong(ping, p) is None
    pong = build_tsmp_pong(v, dst, src, blob, port)
    q = parse(pong)
    assert (q.src_ip, q.dst_ip) == (dst, src)
    assert parse_tsmp_pong(pong, q) == TSMPPong(blob, port or 0)
    auto = build_tsmp_pong_for(ping, p, port or 0)
    assert auto is not None
    assert parse_tsmp_pong(auto, parse(auto)) == TSMPPong(blob, port or 0)


@given(endpoints(), ports, ports, st.booleans(), st.binary(max_size=1600))
def test_unreachable_round_trip(
    ep: tuple[int, int, int], sp: int, dp: int, tcp: bool, body: bytes
) -> None:
    v, src, dst = ep
    if tcp:
        orig = build_tcp(v, src, dst, sp, dp, 9, 0, TCP_SYN, payload=body)
    else:
        orig = build_udp(v, src, dst, sp, dp, body)
    icmp = build_icmp_unreachable(orig, v)
    assert icmp is not None
    p = parse(icmp)
    assert (p.kind, p.src_ip, p.dst_ip) == (v, dst, src)
    assert (p.icmp_type, p.icmp_code) == ((3, 13) if v == 4 else (1, 1))
    quoted = bytes(payload(icmp, p))
    assert orig.startswith(quoted) and len(quoted) >= min(len(orig), 28 if v == 4 else 48)
    assert len(icmp) <= (576 if v == 4 else 1280)
    assert transport_checksum_ok(icmp, p)


@given(endpoints(), ports, ports, u32, st.binary(max_size=64))
def test_rst_round_trip(
    ep: tuple[int, int, int], sp: int, dp: int, seq: int, body: bytes
) -> None:
    v, src, dst = ep
    syn = build_tcp(v, src, dst, sp, dp, seq, 0, TCP_SYN, payload=body)
    rst = build_tcp_rst_for(syn)
    assert rst is not None
    p = parse(rst)
    assert (p.src_ip, p.dst_ip, p.src_port, p.dst_port) == (dst, src, dp, sp)
    assert p.tcp_flags == TCP_RST | TCP_ACK
    assert (tcp_seq(rst, p), tcp_ack(rst, p)) == (0, (seq + 1 + len(body)) & 0xFFFFFFFF)
    assert transport_checksum_ok(rst, p)
    assert build_tcp_rst_for(rst) is None  # a RST is never answered


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, (1 << 128) - 1), ports)
def test_address_rendering_round_trips(a4: int, a6: int, port: int) -> None:
    assert ip_to_int(addr_str(4, a4)) == (4, a4)
    assert ip_to_int(addr_str(6, a6)) == (6, a6)
    assert parse_endpoint(endpoint_str(4, a4, port)) == (4, a4, port)
    assert parse_endpoint(endpoint_str(6, a6, port)) == (6, a6, port)
