"""The compiled receive run (``WireGuardCore.receive_run`` over ``_accel.open_run``) against the
per-datagram Python path (``receive_into``).

The replay window kept in the compiled session must answer and evolve exactly like
``ReplayWindow`` (state compared word for word after every counter). Two receivers built from
the same deterministic handshake are fed the same random datagram stream — authentic packets in
random order with replays, tampered and foreign datagrams, keepalives, bad inner packets, clock
jumps past the session's lifetime — one datagram at a time through ``receive_into`` and in GRO
buffers through ``receive_buffer``: plaintexts, drop counters, peer state, replay windows and
datagrams to send must come out identical (with ``NODEAGENT_NO_ACCEL=1`` the same comparison
covers the pure buffer loop). Skipped where the extension was not built.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.accel import ACCEL
from nodeagent.engine.wireguard import PeerSpec, WireGuardCore, crypto
from nodeagent.engine.wireguard.replay import ReplayWindow
from tests.unit.test_vnet import seg

try:
    from nodeagent import _accel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a machine without a compiler
    pytest.skip("nodeagent._accel is not built (pure-Python path only)",
                allow_module_level=True)

COUNTERS = st.lists(st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1),
                              st.integers(4000, 9000)), max_size=80)


@given(COUNTERS, st.one_of(st.just(2**64 - 2**13 - 1), st.integers(1, 10000)),
       st.lists(st.integers(0, 2**64 - 1), max_size=5))
def test_compiled_replay_window_is_state_identical(counters: list[int], limit: int,
                                                   probes: list[int]) -> None:
    py = ReplayWindow(limit)
    c = _accel.Session(bytes(32), bytes(32), 0.0, limit)
    base = 0
    for ctr in counters:
        ctr = (ctr + base) % 2**64
        assert c.check(ctr) == py.check(ctr)
        assert c.update(ctr) == py.update(ctr)
        assert c.replay_state() == (py._last, py._ring)
        base = py._last
        for p in probes:
            assert c.check(p) == py.check(p)


def test_compiled_window_refuses_what_is_no_counter() -> None:
    c = _accel.Session(bytes(32), bytes(32))
    assert c.update(-1) is False and c.update(2**64) is False and c.check(-5) is False
    assert c.update(0) is True and c.update(0) is False


def _world(t: list[float]) -> tuple[WireGuardCore, WireGuardCore]:
    """Sender ``a`` and responder ``b`` after one deterministic handshake (b's session is still
    ``next``: the first data packet confirms it)."""
    rng = random.Random(11)

    def det(n: int) -> bytes:
        return bytes(rng.getrandbits(8) for _ in range(n))

    ka, kb = crypto.generate_private_key(det), crypto.generate_private_key(det)
    a = WireGuardCore(ka, clock=lambda: t[0], wallclock=lambda: 1.7e9 + t[0], rng=det)
    b = WireGuardCore(kb, clock=lambda: t[0], wallclock=lambda: 1.7e9 + t[0], rng=det)
    a.set_peers([PeerSpec(b.public_key, endpoint=("b", 1), persistent_keepalive=25)])
    b.set_peers([PeerSpec(a.public_key, endpoint=("a", 1))])
    (_, init), = a.encrypt(b.public_key, [])
    (_, resp), = b.receive(init, ("a", 1)).to_send
    a.receive(resp, ("b", 1))
    return a, b


def _state(core: WireGuardCore) -> dict[str, Any]:
    peer = core._peers[next(iter(core._peers))]
    kps = [(name, kp.local_index, _window(kp.replay)) if kp is not None else None
           for name, kp in (("p", peer.previous), ("c", peer.current), ("n", peer.next))]
    return {"drops": dict(core.drops), "rx": peer.rx_bytes, "ep": peer.endpoint,
            "keepalive_at": peer.keepalive_at, "new_hs": peer.new_handshake_at,
            "persistent_at": peer.persistent_at, "kps": kps, "index": sorted(core._keypairs),
            "last_minute": peer.sent_last_minute_handshake}


def _window(w: Any) -> tuple[int, list[int]]:
    return w.replay_state() if hasattr(w, "replay_state") else (w._last, list(w._ring))


OPS = st.lists(st.one_of(
    st.tuples(st.just("pkt"), st.integers(0, 39)),
    st.tuples(st.just("tamper"), st.integers(0, 39)),
    st.tuples(st.just("junk"), st.binary(max_size=60)),
    st.tuples(st.just("clock"), st.sampled_from([0.5, 100.0, 200.0])),
    st.tuples(st.just("flush"), st.integers(1, 6)),
), max_size=60)


@settings(max_examples=60, deadline=None)
@given(OPS, st.sampled_from([("a", 1), ("roamed", 2)]))
def test_receive_run_matches_receive_into(ops: list[tuple[str, Any]], src: tuple[str, int]) -> None:
    t = [1000.0]
    a, b1 = _world(t)
    _, b2 = _world(t)
    assert b1.public_key == b2.public_key
    # 40 packets of one sealed size (a GRO run), a few of them bad inside or keepalives.
    inner = [seg(4, 1000 + i, bytes([i]) * 100) for i in range(40)]
    inner[7] = b"\x45" + bytes(110)  # total length 0: bad inner
    inner[9] = b"\x60" + bytes(110)  # IPv6 too short for its payload length: fine or bad
    inner[13] = inner[13][:60] + bytes(50)  # padded past its total length: stripped
    sealed = [d for _, d in a.encrypt(b1.public_key, inner)]
    keep = [d for _, d in a.encrypt(b1.public_key, [b""])]
    pool = sealed + keep
    one: list[tuple[bytes, bytes]] = []
    two_plain: list[tuple[bytes, bytes]] = []
    two: dict[bytes, list[bytes]] = {}
    send1: list[Any] = []
    send2: list[Any] = []
    run: list[bytes] = []

    def flush() -> None:
        if not run:
            return
        size = len(run[0])
        while run:  # GRO: equal sizes, the last may be shorter
            k = 1
            while size and k < len(run) and len(run[k]) == size and len(run[k - 1]) == size:
                k += 1
            if size and k < len(run) and 0 < len(run[k]) < size:
                k += 1
            buf = b"".join(run[:k])
            del run[:k]
            assert b2.receive_buffer(buf, size if k > 1 else 0, src, send2, two_plain,
                                     two) == k
            if run:
                size = len(run[0])

    for op, arg in ops:
        if op == "clock":
            flush()
            t[0] += arg
            continue
        if op == "flush":
            flush()
            continue
        if op == "pkt":
            d = pool[arg % len(pool)]
        elif op == "tamper":
            d = bytearray(pool[arg % len(pool)])
            d[20] ^= 1
            d = bytes(d)
        else:
            d = arg
        b1.receive_into(d, src, send1, one)
        run.append(d)
    flush()
    if ACCEL is not None:  # every plaintext came through the compiled run
        assert two_plain == []
    else:  # NODEAGENT_NO_ACCEL=1: receive_buffer is the Python loop alone
        assert two == {}
    got2 = [(k, p) for k, ps in two.items() for p in ps] + two_plain
    assert got2 == one
    assert send2 == send1
    assert _state(b2) == _state(b1)
