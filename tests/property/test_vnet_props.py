"""Hypothesis properties of the TUN offload framing: ``split_read`` never raises on any bytes;
``coalesce`` never raises, writes every packet exactly once, and its joined writes split back
into the very segments that went in, per flow in order."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.tundev.vnet import PLAIN_HDR, VNET_HDR, VNET_HDR_LEN, coalesce, split_read
from tests.unit.test_vnet import ACK, FIN, PSH, SYN, seg

HDRS = st.builds(VNET_HDR.pack, st.integers(0, 255), st.sampled_from([0, 1, 3, 4, 5, 0x81, 255]),
                 st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
                 st.integers(0, 0xFFFF))


@given(st.one_of(st.binary(max_size=3000),
                 st.tuples(HDRS, st.binary(max_size=3000)).map(lambda t: t[0] + t[1]),
                 st.tuples(HDRS, st.sampled_from([seg(4, 1, b"x" * 300), seg(6, 1, b"y" * 300)]),
                           st.integers(0, 400)).map(lambda t: t[0] + t[1][:t[2]])))
def test_split_read_never_raises(buf: bytes) -> None:
    out = split_read(buf)
    assert isinstance(out, list)


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_coalesce_never_raises_on_garbage(pkts: list[bytes]) -> None:
    writes = coalesce(pkts)
    assert len(writes) <= len(pkts)
    assert all(len(w) >= VNET_HDR_LEN for w in writes)


# A segment stream: per flow (sport), a sequence of (payload length, flags, seq jump).
STEP = st.tuples(st.sampled_from([40000, 40001]), st.sampled_from([4, 6]),
                 st.sampled_from([0, 1, 300, 600, 600, 600]),
                 st.sampled_from([ACK, ACK, ACK, ACK | PSH, ACK | FIN, SYN]),
                 st.sampled_from([0, 0, 0, 0, 1]))


@given(st.lists(STEP, max_size=60))
def test_coalesced_writes_split_back_into_the_input(steps: list[tuple[int, int, int, int,
                                                                      int]]) -> None:
    seqs: dict[tuple[int, int], int] = {}
    idents: dict[tuple[int, int], int] = {}
    pkts = []
    for sport, version, size, flags, jump in steps:
        key = (sport, version)
        s = seqs.get(key, 1000) + jump
        ident = idents.get(key, 0)
        pkts.append(seg(version, s, bytes([len(pkts) % 256]) * size, flags, ident=ident,
                        sport=sport))
        seqs[key] = s + size
        idents[key] = ident + 1
    writes = coalesce(pkts)
    back = []
    for w in writes:
        if w.startswith(PLAIN_HDR):
            back.append(w[VNET_HDR_LEN:])
        else:
            back.extend(split_read(w))
    assert sorted(back) == sorted(pkts)
    for key in seqs:
        mine = [p for p in pkts if (p[0] >> 4, _sport(p)) == (key[1], key[0])]
        assert [p for p in back if (p[0] >> 4, _sport(p)) == (key[1], key[0])] == mine


def _sport(p: bytes) -> int:
    off = 20 if p[0] >> 4 == 4 else 40
    return int.from_bytes(p[off:off + 2], "big")
