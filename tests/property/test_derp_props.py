"""Hypothesis: DERP parsers never raise anything but FrameError; builders round-trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from nodeagent.derp import frames as F

keys = st.binary(min_size=32, max_size=32)
SERVER = PrivateKey.generate()
CLIENT = PrivateKey.generate()
DECODERS = [
    F.decode_server_key, F.decode_send_packet, F.decode_recv_packet, F.decode_forward_packet,
    F.decode_note_preferred, F.decode_peer_gone, F.decode_peer_present, F.decode_close_peer,
    F.decode_ping, F.decode_pong, F.decode_health, F.decode_restarting,
    lambda p: F.decode_empty(p, "x"),
    lambda p: F.decode_client_info(bytes(SERVER), p),
    lambda p: F.decode_server_info(bytes(CLIENT), bytes(SERVER.public_key), p),
]


@given(st.lists(st.binary(max_size=300), max_size=10), st.integers(0, 2000))
def test_reader_random_bytes(chunks: list[bytes], limit: int) -> None:
    r = F.FrameReader(limit)
    total = 0
    try:
        for c in chunks:
            r.feed(c)
            while (fr := r.next()) is not None:
                assert len(fr[1]) <= limit
                total += 5 + len(fr[1])
    except F.FrameError:
        return
    assert total + r.pending() == sum(map(len, chunks))


@settings(max_examples=300)
@given(st.binary(max_size=400), st.sampled_from(range(len(DECODERS))))
def test_decoders_raise_only_frame_error(payload: bytes, i: int) -> None:
    try:
        DECODERS[i](payload)
    except F.FrameError:
        pass


@given(keys, st.binary(max_size=64), st.binary(max_size=2000))
def test_boxed_info_junk(key: bytes, nonce: bytes, junk: bytes) -> None:
    try:
        F.decode_client_info(bytes(SERVER), key + nonce + junk)
    except F.FrameError:
        pass


def _one(frame: bytes) -> tuple[int, bytes]:
    r = F.FrameReader()
    r.feed(frame)
    fr = r.next()
    assert fr is not None and r.pending() == 0
    return fr


@given(keys, keys, st.binary(max_size=F.MAX_PACKET_SIZE // 16), st.integers(0, 255),
       st.binary(min_size=8, max_size=8), st.text(max_size=50), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.booleans(), st.integers(0, 65535))
def test_round_trips(a: bytes, b: bytes, pkt: bytes, reason: int, ping: bytes, text: str,
                     ms1: int, ms2: int, flag: bool, port: int) -> None:
    T = F.FrameType
    assert _one(F.encode_server_key(a)) == (T.SERVER_KEY, F.MAGIC + a)
    assert F.decode_server_key(_one(F.encode_server_key(a))[1]) == a
    assert F.decode_send_packet(_one(F.encode_send_packet(a, pkt))[1]) == (a, pkt)
    assert F.decode_recv_packet(_one(F.encode_recv_packet(b, pkt))[1]) == (b, pkt)
    assert F.decode_forward_packet(_one(F.encode_forward_packet(a, b, pkt))[1]) == (a, b, pkt)
    assert F.decode_note_preferred(_one(F.encode_note_preferred(flag))[1]) is flag
    assert F.decode_peer_gone(_one(F.encode_peer_gone(a, reason))[1]) == (a, reason)
    ip = bytes(15) + b"\x01"
    assert F.decode_peer_present(_one(F.encode_peer_present(a, ip, port, reason))[1]) == \
        F.PeerPresent(a, ip, port, reason)
    assert F.decode_close_peer(_one(F.encode_close_peer(b))[1]) == b
    assert F.decode_ping(_one(F.encode_ping(ping))[1]) == ping
    assert F.decode_pong(_one(F.encode_pong(ping))[1]) == ping
    assert F.decode_health(_one(F.encode_health(text))[1]) == text
    assert F.decode_restarting(_one(F.encode_restarting(ms1, ms2))[1]) == (ms1, ms2)
    assert _one(F.encode_keepalive()) == (T.KEEP_ALIVE, b"")
    assert _one(F.encode_watch_conns()) == (T.WATCH_CONNS, b"")


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "CanAckPings", "AppName", "extra"]),
                       st.integers(0, 5) | st.booleans() | st.text(max_size=10)))
def test_boxed_info_round_trip(info: dict[str, object]) -> None:
    f = F.encode_server_info(bytes(SERVER), bytes(CLIENT.public_key), info)
    assert F.decode_server_info(bytes(CLIENT), bytes(SERVER.public_key), _one(f)[1]) == info
    c = F.encode_client_info(bytes(CLIENT), bytes(SERVER.public_key), info)
    try:
        got = F.decode_client_info(bytes(SERVER), _one(c)[1])
    except F.FrameError:
        return  # field of the wrong type: rejected, never another exception
    assert got.raw == info and got.key == bytes(CLIENT.public_key)
