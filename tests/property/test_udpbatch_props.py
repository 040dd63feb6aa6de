"""Hypothesis properties of UDP GSO grouping and GRO splitting: grouping keeps every datagram in
order and only forms groups the kernel accepts; splitting a group's buffer gives the group back;
the GRO control-message reader never raises on arbitrary ancillary data."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.engine.udpbatch import (
    MAX_GSO_BYTES,
    MAX_SEGMENTS,
    gro_segment_size,
    gso_groups,
    split_gro,
)

EPS = st.sampled_from([None, ("10.0.0.1", 1), ("10.0.0.2", 1), ("fd7a::1", 2, 0, 0)])
SIZES = st.sampled_from([0, 1, 32, 148, 1312, 1400, 2000])
DATAGRAMS = st.lists(st.tuples(EPS, SIZES.map(lambda n: b"\xab" * n)), max_size=200)


@given(DATAGRAMS)
def test_groups_keep_order_and_obey_the_kernel_rules(out: list[tuple[object, bytes]]) -> None:
    groups = gso_groups(out)
    assert [(ep, d) for ep, segs in groups for d in segs] == out
    for ep, segs in groups:
        if len(segs) > 1:
            assert ep is not None
            assert len(segs) <= MAX_SEGMENTS and sum(map(len, segs)) <= MAX_GSO_BYTES
            seg = len(segs[0])
            assert seg > 0
            assert all(len(d) == seg for d in segs[:-1]) and len(segs[-1]) <= seg


@given(DATAGRAMS)
def test_splitting_a_group_buffer_gives_the_group_back(out: list[tuple[object, bytes]]) -> None:
    for _ep, segs in gso_groups(out):
        if len(segs) > 1:
            assert len(segs[-1]) > 0
            assert split_gro(b"".join(segs), len(segs[0])) == segs


@given(st.binary(max_size=5000), st.integers(min_value=-10, max_value=70000))
def test_split_never_loses_bytes(data: bytes, seg: int) -> None:
    assert b"".join(split_gro(data, seg)) == data


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300), st.binary(max_size=16)),
                max_size=4))
def test_gro_segment_size_never_raises(anc: list[tuple[int, int, bytes]]) -> None:
    assert isinstance(gro_segment_size(anc), int)
