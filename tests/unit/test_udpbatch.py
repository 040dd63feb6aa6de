"""UDP GSO/GRO batching: the pure grouping and splitting rules, the send fallbacks (with a fake
socket that refuses like the kernel does), and two WireGuard transports on loopback that move a
burst through real sockets with and without the offloads."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from typing import Any

import pytest
from nacl.public import PrivateKey

from nodeagent.engine.core import PeerConfig
from nodeagent.engine.udpbatch import (
    MAX_GSO_BYTES,
    MAX_SEGMENTS,
    UDP_GRO,
    UdpOffload,
    gro_segment_size,
    gso_groups,
    split_gro,
)
from nodeagent.engine.wgtransport import WireGuardTransport
from nodeagent.keys import NODE_PREFIX
from tests.unit.wg_helpers import udp

EP1 = ("198.18.0.1", 41641)
EP2 = ("198.18.0.2", 41641)


def test_groups_join_equal_sizes_to_one_destination_and_end_at_a_short_one() -> None:
    out = [(EP1, b"a" * 100)] * 3 + [(EP1, b"b" * 40), (EP1, b"c" * 100), (EP2, b"d" * 100)]
    groups = gso_groups(out)
    assert [(ep, [len(d) for d in segs]) for ep, segs in groups] == [
        (EP1, [100, 100, 100, 40]), (EP1, [100]), (EP2, [100])]


def test_a_longer_datagram_starts_a_new_group() -> None:
    groups = gso_groups([(EP1, b"x" * 50), (EP1, b"y" * 60)])
    assert [len(segs) for _ep, segs in groups] == [1, 1]


def test_groups_respect_the_segment_and_byte_limits() -> None:
    many = [(EP1, b"s" * 10)] * (MAX_SEGMENTS + 5)
    assert [len(s) for _e, s in gso_groups(many)] == [MAX_SEGMENTS, 5]
    big = [(EP1, b"B" * 1400)] * 60
    groups = gso_groups(big)
    assert all(sum(map(len, s)) <= MAX_GSO_BYTES for _e, s in groups)
    assert sum(len(s) for _e, s in groups) == 60 and len(groups) == 2


def test_datagrams_without_endpoint_stay_alone() -> None:
    groups = gso_groups([(None, b"a"), (None, b"a"), (EP1, b"a")])
    assert [(ep, len(s)) for ep, s in groups] == [(None, 1), (None, 1), (EP1, 1)]


def test_split_gro_cuts_at_the_segment_size() -> None:
    assert split_gro(b"aaabbbcc", 3) == [b"aaa", b"bbb", b"cc"]
    assert split_gro(b"abc", 0) == [b"abc"]
    assert split_gro(b"abc", 5) == [b"abc"]


def test_gro_segment_size_reads_the_control_message() -> None:
    assert gro_segment_size([(socket.SOL_UDP, UDP_GRO, struct.pack("=i", 1312))]) == 1312
    assert gro_segment_size([(socket.SOL_UDP, UDP_GRO, struct.pack("=H", 99))]) == 99
    assert gro_segment_size([(socket.SOL_IP, 8, b"\x01\x00\x00\x00")]) == 0
    assert gro_segment_size([(socket.SOL_UDP, UDP_GRO, b"\x01")]) == 0


class RefusingSocket:
    """Records sends; ``sendmsg`` fails with ``gso_errno`` and ``sendto`` with ``to_errno``."""

    def __init__(self, gso_errno: int | None = None, to_errno: int | None = None) -> None:
        self.gso_errno, self.to_errno = gso_errno, to_errno
        self.gso: list[tuple[bytes, int]] = []
        self.single: list[bytes] = []

    def setsockopt(self, *_a: Any) -> None:
        return None

    def sendmsg(self, bufs: list[bytes], anc: list[tuple[int, int, bytes]], _f: int,
                _ep: Any) -> int:
        if self.gso_errno is not None:
            raise OSError(self.gso_errno, "refused")
        self.gso.append((bufs[0], struct.unpack("=H", anc[0][2])[0]))
        return len(bufs[0])

    def sendto(self, data: bytes, _ep: Any) -> int:
        if self.to_errno is not None:
            raise OSError(self.to_errno, "refused")
        self.single.append(data)
        return len(data)


def test_gso_send_is_one_call_with_the_segment_size() -> None:
    sock = RefusingSocket()
    off = UdpOffload(sock, enabled=True)  # type: ignore[arg-type]
    assert off.send(sock, EP1, [b"a" * 8, b"b" * 8, b"c" * 3]) == (0, None)  # type: ignore[arg-type]
    assert sock.gso == [(b"a" * 8 + b"b" * 8 + b"c" * 3, 8)] and sock.single == []
    assert off.counters["gso_sends"] == 1


def test_eio_turns_gso_off_and_resends_each_datagram() -> None:
    sock = RefusingSocket(gso_errno=errno.EIO)
    off = UdpOffload(sock, enabled=True)  # type: ignore[arg-type]
    segs = [b"a" * 8, b"b" * 8]
    assert off.send(sock, EP1, segs) == (0, None)  # type: ignore[arg-type]
    assert sock.single == segs and not off.gso and off.counters["gso_fallbacks"] == 1
    sock.gso_errno = None
    off.send(sock, EP1, segs)  # type: ignore[arg-type]
    assert sock.gso == [] and sock.single == segs * 2


def test_einval_falls_back_for_that_group_only() -> None:
    sock = RefusingSocket(gso_errno=errno.EINVAL)
    off = UdpOffload(sock, enabled=True)  # type: ignore[arg-type]
    off.send(sock, EP1, [b"a", b"b"])  # type: ignore[arg-type]
    assert sock.single == [b"a", b"b"] and off.gso


def test_failed_sends_are_counted_and_only_unusual_errors_surface() -> None:
    sock = RefusingSocket(gso_errno=errno.EAGAIN)
    off = UdpOffload(sock, enabled=True)  # type: ignore[arg-type]
    assert off.send(sock, EP1, [b"a", b"b", b"c"]) == (3, None)  # type: ignore[arg-type]
    sock = RefusingSocket(to_errno=errno.EBADF)
    failed, loud = off.send(sock, EP1, [b"a"])  # type: ignore[arg-type]
    assert failed == 1 and loud is not None and loud.errno == errno.EBADF


def test_environment_switch_turns_offloads_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEAGENT_UDP_OFFLOAD", "0")
    off = UdpOffload(RefusingSocket())  # type: ignore[arg-type]
    assert not off.gso and not off.gro


# --- real sockets on loopback --------------------------------------------------------------------

async def _burst(offload_a: bool, offload_b: bool, count: int
                 ) -> tuple[list[bytes], list[bytes], WireGuardTransport, WireGuardTransport]:
    """Handshake A→B with one packet, then send ``count`` packets as one TUN batch."""
    loop = asyncio.get_running_loop()
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    a = WireGuardTransport(bytes(ka), port=0, bind="127.0.0.1", udp_offload=offload_a)
    b = WireGuardTransport(bytes(kb), port=0, bind="127.0.0.1", udp_offload=offload_b)
    got: list[bytes] = []
    session_up, done = asyncio.Event(), asyncio.Event()

    def deliver(_peer: str, pkts: list[bytes]) -> None:
        got.extend(pkts)
        session_up.set()
        if len(got) >= count + 1:
            done.set()

    a.start(loop, lambda _p, _k: None)
    b.start(loop, deliver)
    try:
        name_a = NODE_PREFIX + bytes(ka.public_key).hex()
        name_b = NODE_PREFIX + bytes(kb.public_key).hex()
        a.configure([PeerConfig(key=name_b, endpoints=[f"127.0.0.1:{b.port}"])])
        b.configure([PeerConfig(key=name_a, endpoints=[f"127.0.0.1:{a.port}"])])
        first = udp(b"hello")
        a.send(name_b, [first])  # queued behind the handshake
        await asyncio.wait_for(session_up.wait(), 10)
        burst = [udp(bytes([i % 256]) * 1200) for i in range(count)]
        a.send(name_b, burst)
        await asyncio.wait_for(done.wait(), 10)
        return [first, *burst], got, a, b
    finally:
        a.close()
        b.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("offload_a,offload_b", [(True, True), (True, False), (False, True),
                                                 (False, False)])
async def test_a_burst_crosses_loopback_whole_and_in_order(offload_a: bool,
                                                           offload_b: bool) -> None:
    sent, got, a, b = await _burst(offload_a, offload_b, 40)
    assert got == sent
    assert b.core.drops["replay"] == 0 and b.core.drops["decrypt_failed"] == 0
    assert a.offload is not None and b.offload is not None
    if offload_a:
        assert a.offload.gso, "this kernel refused UDP_SEGMENT"
        assert a.offload.counters["gso_sends"] >= 1
    else:
        assert a.offload.counters["gso_sends"] == 0
    if offload_a and offload_b:
        # The GSO super-datagram reaches a GRO socket on loopback in one piece.
        assert b.offload.counters["gro_buffers"] >= 1
    else:
        assert b.offload.counters["gro_buffers"] == 0
