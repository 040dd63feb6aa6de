"""Hypothesis: the relay's fast path (``server_relay.relay``) behaves exactly like the
frame-by-frame path (``Conn.process`` + ``Conn.handle``).

Random streams from one logged-in client — packets to local, backed-up, self and unknown
destinations (some disco), pings of any length, NotePreferred, unknown types, too-short packets,
an oversize header, garbage — cut into random reads, are fed through a real ``DerpServer`` twice:
once as the server runs, once with the fast path replaced by the reference loop. The bytes every
client is sent, the queued frames, who got closed and the server's stats must be identical, and
nothing may raise.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.derp import frames as F

pytestmark = pytest.mark.feature("derper")

KEYS = [bytes([i]) * 32 for i in range(1, 5)]  # A (sender), B, C (backed up), X (absent)
A, B, C, X = KEYS


class _Transport:
    """Keeps what it is given (not a copy), as a real transport does with bytes it could not
    send yet: a buffer changed after being written would show."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.closed = False

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    def write(self, data: bytes) -> None:
        self.pieces.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None


def _packet(draw: Any) -> bytes:
    body = draw(st.binary(max_size=120))
    if draw(st.booleans()):
        body = F.DISCO_MAGIC + bytes(F.DISCO_MIN_LEN) + body  # disco-looking
    return body


@st.composite
def frames(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["send", "send", "send", "send", "ping", "pref", "unknown",
                                 "short", "oversize", "garbage"]))
    if kind == "send":
        return F.encode_send_packet(draw(st.sampled_from(KEYS)), _packet(draw))
    if kind == "ping":
        return F.frame(F.FrameType.PING, draw(st.binary(min_size=0, max_size=12)))
    if kind == "pref":
        return F.frame(F.FrameType.NOTE_PREFERRED, draw(st.binary(max_size=2)))
    if kind == "unknown":
        return F.frame(draw(st.sampled_from([0x30, 0x42, 0xFE])), draw(st.binary(max_size=8)))
    if kind == "short":
        return F.frame(F.FrameType.SEND_PACKET, draw(st.binary(max_size=31)))
    if kind == "oversize":
        return F.frame_header(F.FrameType.SEND_PACKET, F.MAX_FRAME_AFTER_LOGIN + 1)
    return draw(st.binary(min_size=1, max_size=40))


def _login(srv: Any, key: bytes) -> tuple[Any, _Transport]:
    from nodeagent_derper.server_raw import RawConn

    t = _Transport()
    c = RawConn(srv, t, None, False)  # type: ignore[arg-type]
    c.key = key
    c.logged_in = True
    c.reader.max_len = F.MAX_FRAME_AFTER_LOGIN
    srv.live.add(c)
    srv.register(c)
    return c, t


async def _run(stream: bytes, cuts: list[int]) -> tuple[Any, ...]:
    from nodeagent_derper.server import DerpServer

    srv = DerpServer(bytes(range(32)), write_timeout=0, send_queue_depth=4)
    conns = {k: _login(srv, k) for k in (A, B, C)}
    conns[C][0].pause_writing()  # C's socket is full: its packets queue (and drop the oldest)
    a = conns[A][0]
    prev = 0
    for cut in [*sorted(cuts), len(stream)]:
        a.on_data(stream[prev:cut])
        prev = cut
    pending = None if a.closed else a.reader.pending()  # a closed connection's buffer is moot
    out = tuple((t.data, t.closed, c.closed, list(c.q_other or ()), list(c.q_disco or ()),
                 list(c.q_ctrl or ())) for c, t in conns.values())
    for c, _ in conns.values():
        c.close("test")
    return out, srv.stats(), pending


def _reference(conn: Any, data: bytes) -> None:
    conn.reader.feed(data)
    conn.process()


@settings(max_examples=150, deadline=None)
@given(st.lists(frames(), max_size=30), st.lists(st.integers(0, 4000), max_size=8))
def test_fast_path_equals_frame_by_frame(parts: list[bytes], cuts: list[int]) -> None:
    from nodeagent_derper import server_conn

    stream = b"".join(parts)
    cuts = [c for c in cuts if c <= len(stream)]
    fast = asyncio.run(_run(stream, cuts))
    orig = server_conn.relay
    server_conn.relay = _reference
    try:
        slow = asyncio.run(_run(stream, cuts))
    finally:
        server_conn.relay = orig
    assert fast == slow


def test_runs_to_one_destination_become_one_piece() -> None:
    """Many packets in one read to one destination: one write of all RecvPacket frames."""
    async def main() -> None:
        from nodeagent_derper.server import DerpServer

        srv = DerpServer(bytes(range(32)))
        (a, _), (b, tb) = _login(srv, A), _login(srv, B)
        pkts = [os.urandom(100 + i) for i in range(50)]
        a.on_data(b"".join(F.encode_send_packet(B, p) for p in pkts))
        assert tb.data == b"".join(F.encode_recv_packet(A, p) for p in pkts)
        assert len(tb.pieces) == 1
        st_ = srv.stats()
        assert st_["packets_received"] == st_["packets_sent"] == 50
        assert st_["bytes_sent"] == sum(map(len, pkts))
        for c in (a, b):
            c.close("test")

    asyncio.run(main())
