"""Hypothesis properties of the WireGuard core: no input raises out of ``receive``, mangled
valid messages never authenticate, encrypt→receive round-trips, the replay window matches a
set-based model."""

from __future__ import annotations

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.engine.wireguard import WGConfig
from nodeagent.engine.wireguard.replay import WINDOW, ReplayWindow
from tests.unit.wg_helpers import EP_A, EP_B, Net, udp

SRC = st.sampled_from([EP_A, EP_B, ("100.64.5.5", 1), ("fd7a::1", 2, 0, 0), ("", 0)])


@functools.cache
def _captured() -> tuple[Net, dict[str, bytes]]:
    """An established pair plus one captured message of each type (cookie via a loaded peer)."""
    net = Net(WGConfig(rekey_timeout_jitter=0.0))
    net.send_a(udp(b"payload"))
    msgs = {"initiation": net.wire[0][2], "response": net.wire[1][2], "data": net.wire[2][2]}
    loaded = Net(under_load_b=lambda: True)
    loaded.send_a(udp())
    msgs["cookie"] = loaded.wire[1][2]
    return net, msgs


def _check(net: Net, datagram: bytes, src: object) -> list[bytes]:
    before = sum(net.b.drops.values())
    res = net.b.receive(datagram, src)  # type: ignore[arg-type]
    assert net.b.drops["internal_error"] == 0
    plain = [p for _k, p in res.plaintexts]
    if not plain and not res.to_send:
        assert sum(net.b.drops.values()) > before, "silently ignored without a drop count"
    return plain


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), SRC)
def test_random_bytes_never_raise(data: bytes, src: object) -> None:
    net, _ = _captured()
    assert _check(net, data, src) == []


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 4), st.binary(max_size=300), SRC)
def test_typed_garbage_never_raises(t: int, rest: bytes, src: object) -> None:
    net, _ = _captured()
    assert _check(net, t.to_bytes(4, "little") + rest, src) == []


KINDS = st.sampled_from(["initiation", "response", "data", "cookie"])


@settings(max_examples=300, deadline=None)
@given(KINDS, st.data())
def test_truncated_or_extended_messages_rejected(kind: str, data: st.DataObject) -> None:
    net, msgs = _captured()
    m = msgs[kind]
    if data.draw(st.booleans()):
        mangled = m[: data.draw(st.integers(0, len(m) - 1))]
    else:
        mangled = m + data.draw(st.binary(min_size=1, max_size=64))
    assert _check(net, mangled, EP_A) == []


@settings(max_examples=300, deadline=None)
@given(KINDS, st.data())
def test_bit_flips_never_authenticate(kind: str, data: st.DataObject) -> None:
    net, msgs = _captured()
    m = bytearray(msgs[kind])
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, len(m) * 8 - 1))
        m[bit // 8] ^= 1 << (bit % 8)
    if bytes(m) == msgs[kind]:
        return  # an even number of flips on one bit
    assert _check(net, bytes(m), EP_A) == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1400), st.sampled_from([4, 6]))
def test_encrypt_receive_round_trip(payload: bytes, version: int) -> None:
    from nodeagent.packet import build_udp
    net, _ = _captured()
    pkt = build_udp(version, 1, 2, 3, 4, payload)
    out = net.a.encrypt(net.b.public_key, [pkt])
    assert len(out) == 1 and len(out[0][1]) >= len(pkt) + 32
    res = net.b.receive(out[0][1], EP_A)
    assert [p for _k, p in res.plaintexts] == [pkt]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3 * WINDOW), max_size=200), st.integers(1, 4 * WINDOW))
def test_replay_window_matches_model(counters: list[int], limit: int) -> None:
    w = ReplayWindow(limit)
    seen: set[int] = set()
    top = 0
    for c in counters:
        expect = c < limit and c not in seen and top - c <= WINDOW
        assert w.check(c) == expect
        assert w.update(c) == expect
        if expect:
            seen.add(c)
            top = max(top, c)
