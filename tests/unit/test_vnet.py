"""TUN offload framing: a kernel-style TSO read is cut into MTU-sized packets with correct
checksums, a partial checksum is finished, and consecutive TCP segments of a flow are joined into
one GSO write exactly when the kernel's GRO would join them (round trip: coalesce → split_read
gives the segments back)."""

from __future__ import annotations

import os
import struct

from nodeagent.packet.build import build_tcp, build_udp
from nodeagent.packet.checksum import ipv4_header_ok, transport_checksum_ok
from nodeagent.packet.parse import parse, payload, tcp_seq
from nodeagent.tundev.vnet import (
    F_NEEDS_CSUM,
    GSO_TCPV4,
    GSO_TCPV6,
    MAX_SEGMENTS,
    PLAIN_HDR,
    VNET_HDR,
    VNET_HDR_LEN,
    coalesce,
    split_read,
)

A4, B4 = 0x64400001, 0x64400002
A6, B6 = 0xFD7A115CA1E000000000000000000001, 0xFD7A115CA1E000000000000000000002
ACK, PSH, FIN, SYN = 0x10, 0x08, 0x01, 0x02
MSS = 1200


def seg(version: int, seq: int, data: bytes, flags: int = ACK, ident: int = 0, sport: int = 40000,
        window: int = 500, ack: int = 77) -> bytes:
    src, dst = (A4, B4) if version == 4 else (A6, B6)
    # For IPv6 build_tcp's ident is the flow label, which is constant within a flow.
    return build_tcp(version, src, dst, sport, 8080, seq, ack, flags, window=window,
                     payload=data, ident=ident if version == 4 else 0x12345,
                     options=b"\x01\x01\x08\x0a" + bytes(8))


def flow(version: int, n: int, size: int = MSS, last: int | None = None, seq0: int = 1000,
         ident0: int = 7, last_flags: int = ACK | PSH) -> list[bytes]:
    out = []
    seq = seq0
    for i in range(n):
        ln = last if (last is not None and i == n - 1) else size
        flags = last_flags if i == n - 1 else ACK
        out.append(seg(version, seq, os.urandom(ln), flags, ident=ident0 + i))
        seq += ln
    return out


def tso_read(version: int, segments: list[bytes]) -> bytes:
    """What the kernel hands a vnet-header TUN for a TSO send: one big segment."""
    first = parse(segments[0])
    ihl = first.ip_header_len
    hdr_end = first.payload_offset
    data = b"".join(bytes(payload(s, parse(s))) for s in segments)
    flags = segments[-1][ihl + 13] | segments[0][ihl + 13]
    big = bytearray(segments[0][:hdr_end]) + data
    big[ihl + 13] = flags
    if version == 4:
        struct.pack_into("!H", big, 2, len(big))
    else:
        struct.pack_into("!H", big, 4, len(big) - 40)
    struct.pack_into("!H", big, ihl + 16, 0x1234)  # partial checksum: ignored when segmenting
    gso = GSO_TCPV4 if version == 4 else GSO_TCPV6
    return VNET_HDR.pack(F_NEEDS_CSUM, gso, hdr_end, len(payload(segments[0],
                                                                 first)), ihl, 16) + bytes(big)


def test_tso_read_is_cut_back_into_the_original_segments() -> None:
    for version in (4, 6):
        segments = flow(version, 5, last=333)
        got = split_read(tso_read(version, segments))
        assert got == segments, version
        for p in got:
            parsed = parse(p)
            assert transport_checksum_ok(p, parsed)
            assert version == 6 or ipv4_header_ok(p, parsed)


def test_fin_and_psh_stay_on_the_last_segment_only() -> None:
    segments = flow(4, 3, last_flags=ACK | PSH | FIN)
    got = split_read(tso_read(4, segments))
    assert [p[20 + 13] for p in got] == [ACK, ACK, ACK | PSH | FIN]
    assert [tcp_seq(p, parse(p)) for p in got] == [1000, 1000 + MSS, 1000 + 2 * MSS]


def test_a_partial_checksum_is_finished() -> None:
    pkt = bytearray(build_udp(4, A4, B4, 5000, 53, b"query"))
    want = bytes(pkt)
    # The kernel leaves the folded pseudo-header sum in the field.
    pseudo = (A4 + B4 + 17 + len(pkt) - 20) % 0xFFFF
    struct.pack_into("!H", pkt, 26, pseudo)
    got = split_read(VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(pkt))
    assert got == [want]


def test_plain_reads_pass_through_and_nonsense_yields_nothing() -> None:
    pkt = seg(4, 1, b"x")
    assert split_read(PLAIN_HDR + pkt) == [pkt]
    assert split_read(b"") == [] and split_read(PLAIN_HDR) == []
    assert split_read(VNET_HDR.pack(0, GSO_TCPV4, 0, 100, 0, 0) + b"\x45" + bytes(10)) == []
    assert split_read(VNET_HDR.pack(0, 3, 0, 100, 0, 0) + pkt) == []  # UFO: never enabled
    assert split_read(VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 200, 6) + pkt) == []


def _rt(writes: list[bytes]) -> list[bytes]:
    return [p for w in writes for p in split_read(w)]


def test_consecutive_segments_become_one_gso_write_and_split_back() -> None:
    for version in (4, 6):
        segments = flow(version, 10, last=500)
        writes = coalesce(segments)
        assert len(writes) == 1
        flags, gso, hdr_len, gso_size, cs_start, cs_off = VNET_HDR.unpack_from(writes[0])
        ihl = 20 if version == 4 else 40
        assert (flags, gso, gso_size, cs_start, cs_off) == (
            F_NEEDS_CSUM, GSO_TCPV4 if version == 4 else GSO_TCPV6, MSS, ihl, 16)
        assert hdr_len == ihl + 32
        body = writes[0][VNET_HDR_LEN:]
        assert len(body) == ihl + 32 + 9 * MSS + 500
        if version == 4:
            assert ipv4_header_ok(body, parse(body))
        assert _rt(writes) == segments


def test_segments_that_the_kernel_would_not_join_are_written_alone() -> None:
    base = flow(4, 2)
    gap = [base[0], seg(4, 1000 + MSS + 1, os.urandom(MSS))]  # sequence gap
    syn = [seg(4, 1, b"", SYN), seg(4, 2, os.urandom(MSS))]
    other_ack = [base[0], seg(4, 1000 + MSS, os.urandom(MSS), ack=78)]
    other_win = [base[0], seg(4, 1000 + MSS, os.urandom(MSS), window=501)]
    bigger = [seg(4, 1000, os.urandom(100)), seg(4, 1100, os.urandom(200))]
    v6_after_v4 = [base[0], seg(6, 1000 + MSS, os.urandom(MSS))]
    for pair in (gap, syn, other_ack, other_win, bigger, v6_after_v4):
        writes = coalesce(pair)
        assert writes == [PLAIN_HDR + p for p in pair]


def test_psh_or_a_short_segment_ends_the_run() -> None:
    run1 = flow(4, 3, last=100, last_flags=ACK)  # short third segment closes the run
    nxt = seg(4, 1000 + 2 * MSS + 100, os.urandom(MSS), ident=10)
    writes = coalesce([*run1, nxt])
    assert len(writes) == 2 and writes[1] == PLAIN_HDR + nxt
    assert _rt(writes) == [*run1, nxt]


def test_flows_interleaved_keep_their_own_order_and_others_pass_through() -> None:
    a = flow(4, 4, last_flags=ACK)
    b = [seg(4, 5000 + i * MSS, os.urandom(MSS), sport=40001, ident=100 + i) for i in range(3)]
    udp = build_udp(4, A4, B4, 1, 2, b"u")
    mixed = [a[0], b[0], udp, a[1], b[1], a[2], b[2], a[3]]
    writes = coalesce(mixed)
    # One write per flow at the place of its first packet; the UDP datagram between them.
    assert len(writes) == 3 and writes[2] == PLAIN_HDR + udp
    assert _rt(writes) == [*a, *b, udp]


def test_runs_stop_at_the_segment_limit() -> None:
    segments = flow(4, MAX_SEGMENTS + 3, size=100, last_flags=ACK)
    writes = coalesce(segments)
    assert len(writes) == 2
    assert _rt(writes) == segments
