"""Replay protection of stand-alone control requests: the nonce cache (bounded, expiring, with an
injectable clock), the channel's freshness window (small in the future, wider in the past),
replay keys, and revoked node keys in the SQLite store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nodeagent.control import proto
from nodeagent.control.replay import NonceCache
from nodeagent.control.store import SQLiteStore
from nodeagent.keys import KeyPair


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def test_a_key_is_admitted_once() -> None:
    clock = Clock()
    c = NonceCache(300.0, clock=clock)
    assert c.admit(_key(1), clock.t) is None
    assert c.admit(_key(2), clock.t - 299) is None
    problem = c.admit(_key(1), clock.t)
    assert problem is not None and "replayed" in problem
    assert len(c) == 2 and _key(1) in c


def test_keys_expire_with_their_timestamps() -> None:
    clock = Clock()
    c = NonceCache(300.0, clock=clock)
    assert c.admit(_key(1), clock.t - 100) is None  # expires at t + 200
    assert c.admit(_key(2), clock.t + 50) is None  # expires at t + 350
    clock.t += 250
    c.expire()
    assert len(c) == 1 and _key(1) not in c and _key(2) in c
    # Once out of the window, the request is refused as stale rather than remembered again.
    problem = c.admit(_key(1), clock.t - 350)
    assert problem is not None and "too far" in problem
    clock.t += 1000
    assert c.admit(_key(3), clock.t) is None
    assert len(c) == 1  # admitting purged everything expired


def test_memory_is_bounded_and_forgotten_keys_stay_refused() -> None:
    clock = Clock()
    c = NonceCache(300.0, max_entries=100, clock=clock)
    stamps = [clock.t - 200 + i * 0.15 for i in range(1000)]
    for i, s in enumerate(stamps):
        assert c.admit(_key(i), s) is None
        assert len(c) <= 100
    assert len(c) == 100 and c.evicted == 900
    assert c.floor == stamps[899]
    # Every forgotten key is refused as too old to check; the remembered ones as replays.
    for i in (0, 500, 899):
        problem = c.admit(_key(i), stamps[i])
        assert problem is not None and "older than the server can check" in problem
    problem = c.admit(_key(950), stamps[950])
    assert problem is not None and "replayed" in problem
    # A new request dated before the oldest remembered one cannot be told apart: refused,
    # without pushing a remembered key out.
    problem = c.admit(_key(5000), stamps[900] - 0.5)
    assert problem is not None and len(c) == 100 and _key(900) in c
    # Fresh requests still get in.
    assert c.admit(_key(5001), clock.t) is None


def test_non_finite_stamps_are_refused() -> None:
    c = NonceCache(300.0, clock=Clock())
    for bad in (math.nan, math.inf, -math.inf):
        assert c.admit(_key(1), bad) is not None
    assert len(c) == 0
    with pytest.raises(ValueError):
        NonceCache(300.0, max_entries=0)


# --- the channel's window and replay keys ----------------------------------------------------

def _pair() -> tuple[proto.Channel, proto.Channel, KeyPair]:
    m, s = KeyPair.generate(), KeyPair.generate()
    return (proto.Channel(m.private, s.public, server=False),
            proto.Channel(s.private, m.public, server=True), m)


def _sealed_at(client: proto.Channel, stamp: float, monkeypatch: pytest.MonkeyPatch) -> bytes:
    with monkeypatch.context() as mp:
        mp.setattr(proto.time, "time", lambda: stamp)
        return client.seal(proto.msg("keepalive"))


def test_request_window_is_narrow_in_the_future(monkeypatch: pytest.MonkeyPatch) -> None:
    now = 1_700_000_000.0
    c, s, _ = _pair()
    with pytest.raises(proto.ProtoError, match=r"dated 290s in the future, more than 60s ahead"):
        s.open_request(_sealed_at(c, now + 290, monkeypatch), now=now)
    r = s.open_request(_sealed_at(c, now + 30, monkeypatch), now=now)
    assert r.message == {"Type": "keepalive"} and r.stamp == now + 30
    r = s.open_request(_sealed_at(c, now - 290, monkeypatch), now=now)
    assert r.stamp == now - 290
    with pytest.raises(proto.ProtoError, match="too far from the server's clock"):
        s.open_request(_sealed_at(c, now - 301, monkeypatch), now=now)
    for weird in (math.nan, math.inf):
        with pytest.raises(proto.ProtoError, match="too far from the server's clock"):
            s.open_request(_sealed_at(c, weird, monkeypatch), now=now)


def test_replay_key_names_one_box() -> None:
    c, s, m = _pair()
    a, b = c.seal(proto.msg("keepalive")), c.seal(proto.msg("keepalive"))
    ra = s.open_request(a)
    assert ra.nonce == a[:proto.NONCE_LEN]
    ka = proto.replay_key(m.public, ra.nonce)
    assert ka == proto.replay_key(m.public, a[:proto.NONCE_LEN])  # the same bytes again
    assert ka != proto.replay_key(m.public, b[:proto.NONCE_LEN])
    assert ka != proto.replay_key(KeyPair.generate().public, ra.nonce)
    assert len(ka) == 16


# --- revoked node keys -----------------------------------------------------------------------

def test_revoked_node_keys_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    st = SQLiteStore(path)
    assert not st.node_key_revoked("11" * 32)
    st.revoke_node_key("11" * 32, 123.0)
    st.revoke_node_key("11" * 32, 456.0)  # twice is fine
    st.close()
    st = SQLiteStore(path)
    assert st.node_key_revoked("11" * 32) and not st.node_key_revoked("22" * 32)
    st.close()
