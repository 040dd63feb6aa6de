"""The compiled accelerator (``nodeagent._accel``) against the pure-Python code it replaces.

Each compiled loop must give byte-for-byte what its Python twin gives: ``checksum``,
``split_read`` and ``coalesce`` on random and on well-formed input (hypothesis; nothing raises),
WireGuard transport sealing and opening against ``cryptography``'s ChaCha20-Poly1305, and the
WireGuard core's test vectors through both paths (one core built with the accelerator, one
without, fed the same deterministic handshake: identical datagrams out, identical plaintexts
in). ``NODEAGENT_NO_ACCEL=1`` is shown to select the pure path in a fresh interpreter. Skipped
as a whole where the extension was not built (the pure path is then the only one).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.engine.wireguard import crypto
from nodeagent.engine.wireguard.messages import NONCE, TRANSPORT_HEADER, padded_length
from nodeagent.packet.checksum import checksum
from nodeagent.tundev.vnet import VNET_HDR, coalesce, split_read
from tests.property.test_vnet_props import HDRS, STEP
from tests.unit.test_vnet import ACK, PSH, flow, seg, tso_read

try:
    from nodeagent import _accel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a machine without a compiler
    pytest.skip("nodeagent._accel is not built (pure-Python path only)",
                allow_module_level=True)


@given(st.binary(max_size=3000), st.integers(0, 2**130))
def test_checksum_matches(data: bytes, initial: int) -> None:
    assert _accel.checksum(data, initial) == checksum(data, initial)


@given(st.one_of(st.binary(max_size=3000),
                 st.tuples(HDRS, st.binary(max_size=3000)).map(lambda t: t[0] + t[1]),
                 st.tuples(HDRS, st.sampled_from([seg(4, 1, b"x" * 300), seg(6, 1, b"y" * 300)]),
                           st.integers(0, 400)).map(lambda t: t[0] + t[1][:t[2]])))
def test_split_read_matches(buf: bytes) -> None:
    assert _accel.split_read(buf) == split_read(buf)


@pytest.mark.parametrize("version", [4, 6])
@pytest.mark.parametrize("last", [None, 17])
def test_split_read_of_a_tso_read_matches(version: int, last: int | None) -> None:
    segs = flow(version, 40, last=last)
    buf = tso_read(version, segs)
    assert _accel.split_read(buf) == split_read(buf) == segs


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_coalesce_matches_on_garbage(pkts: list[bytes]) -> None:
    assert _accel.coalesce(pkts) == coalesce(pkts)


@given(st.lists(STEP, max_size=80))
def test_coalesce_matches_on_streams(steps: list[tuple[int, int, int, int, int]]) -> None:
    seqs: dict[tuple[int, int], int] = {}
    pkts = []
    for sport, version, size, flags, jump in steps:
        s = seqs.get((sport, version), 1000) + jump
        pkts.append(seg(version, s, bytes([len(pkts) % 256]) * size, flags, sport=sport))
        seqs[(sport, version)] = s + size
    assert _accel.coalesce(pkts) == coalesce(pkts)


def test_coalesce_joins_a_long_run_like_python() -> None:
    pkts = flow(4, 100) + flow(6, 70, last_flags=ACK | PSH)
    fast = _accel.coalesce(pkts)
    assert fast == coalesce(pkts)
    assert VNET_HDR.unpack_from(fast[0])[1] == 1  # a GSO TCPv4 write
    assert _accel.coalesce([b"\x45", bytearray(b"x")]) is None  # not all bytes: declined


def _py_seal(key: bytes, ridx: int, ctr: int, pkt: bytes, mtu: int) -> bytes:
    size = padded_length(len(pkt), mtu)
    body = pkt + bytes(size - len(pkt))
    return (TRANSPORT_HEADER.pack(4, ridx, ctr)
            + crypto.AEAD(key).encrypt(NONCE.pack(ctr), body, None))


@settings(max_examples=60)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1),
       st.integers(0, 2**64 - 200), st.lists(st.binary(max_size=1280), max_size=8))
def test_seal_many_and_open_match_cryptography(key: bytes, ridx: int, ctr: int,
                                                pkts: list[bytes]) -> None:
    s = _accel.Session(key, key)
    out = s.seal_many(ridx, ctr, pkts, 1280)
    assert out == [_py_seal(key, ridx, ctr + i, p, 1280) for i, p in enumerate(pkts)]
    for i, (p, d) in enumerate(zip(pkts, out, strict=True)):
        plain = s.open(d)
        assert plain is not None and plain[:len(p)] == p
        assert struct.unpack_from("<Q", d, 8)[0] == ctr + i
        bad = bytearray(d)
        bad[-1] ^= 1
        assert s.open(bytes(bad)) is None


@given(st.binary(max_size=100))
def test_open_never_raises(data: bytes) -> None:
    assert _accel.Session(bytes(32), bytes(32)).open(data) is None


def test_seal_many_declines_a_packet_past_the_mtu() -> None:
    assert _accel.Session(bytes(32), bytes(32)).seal_many(1, 0, [bytes(1300)], 1280) is None


def _core_exchange(accel: object) -> tuple[list[bytes], list[bytes]]:
    """A deterministic handshake and data exchange between two cores; the datagrams sent and
    the plaintexts received."""
    import random

    import nodeagent.engine.wireguard.peer as peer_mod
    from nodeagent.engine.wireguard import PeerSpec, WireGuardCore

    saved = peer_mod.ACCEL
    peer_mod.ACCEL = accel  # type: ignore[assignment]
    try:
        rng = random.Random(7)

        def det(n: int) -> bytes:
            return bytes(rng.getrandbits(8) for _ in range(n))

        t = [1000.0]
        ka, kb = crypto.generate_private_key(det), crypto.generate_private_key(det)
        a = WireGuardCore(ka, clock=lambda: t[0], wallclock=lambda: 1.7e9 + t[0], rng=det)
        b = WireGuardCore(kb, clock=lambda: t[0], wallclock=lambda: 1.7e9 + t[0], rng=det)
        a.set_peers([PeerSpec(b.public_key, endpoint=("b", 1))])
        b.set_peers([PeerSpec(a.public_key, endpoint=("a", 1))])
        wire: list[bytes] = []
        got: list[bytes] = []
        pkts = [seg(4, 1000 + i, bytes([i]) * (i * 37 % 1200)) for i in range(20)]
        out = a.encrypt(b.public_key, pkts[:5])
        for _ in range(4):
            nxt = []
            for ep, d in out:
                wire.append(d)
                res = (b if ep == ("b", 1) else a).receive(d, ("a", 1) if ep == ("b", 1)
                                                            else ("b", 1))
                nxt += res.to_send
                got += [p for _, p in res.plaintexts]
            out = nxt
        for ep, d in a.encrypt(b.public_key, pkts[5:]) + b.encrypt(a.public_key, pkts[:3]):
            wire.append(d)
            res = (b if ep == ("b", 1) else a).receive(d, ("x", 1))
            got += [p for _, p in res.plaintexts]
        assert a.drops["decrypt_failed"] == b.drops["decrypt_failed"] == 0
        return wire, got
    finally:
        peer_mod.ACCEL = saved


def test_core_vectors_are_the_same_through_both_paths() -> None:
    fast_wire, fast_got = _core_exchange(_accel)
    slow_wire, slow_got = _core_exchange(None)
    assert fast_wire == slow_wire
    assert fast_got == slow_got
    assert len(fast_got) == 23  # all 20 + 3 packets arrived, in order per direction


def test_no_accel_env_selects_the_pure_path() -> None:
    code = "from nodeagent.accel import ACCEL, describe; print(ACCEL is None, describe())"
    for env, want in (({"NODEAGENT_NO_ACCEL": "1"}, "True pure Python"),
                      ({"NODEAGENT_NO_ACCEL": "0"}, "False compiled")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, **env), timeout=60, check=True)
        assert r.stdout.startswith(want), r.stdout
