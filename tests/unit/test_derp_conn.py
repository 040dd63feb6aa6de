"""The sans-IO DERP client connection: login, ping answering, frames → events, split input.

No sockets: the server side is played with the frame builders of ``nodeagent.derp.frames``.
"""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey

from nodeagent.derp import frames as F
from nodeagent.derp.conn import (
    ClientConnection,
    ConnState,
    DerpError,
    Event,
    Health,
    KeepAlive,
    PeerGone,
    PeerPresent,
    Ping,
    Pong,
    ReceivedPacket,
    Restarting,
    ServerInfo,
    check_upgrade_response,
    upgrade_request,
)

SERVER = PrivateKey.generate()
SERVER_PUB = bytes(SERVER.public_key)
CLIENT = bytes(PrivateKey.generate())
CLIENT_PUB = bytes(PrivateKey(CLIENT).public_key)
PEER = bytes(range(32))
INFO = {"TokenBucketBytesPerSecond": 0, "TokenBucketBytesBurst": 0}


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    r = F.FrameReader()
    r.feed(data)
    out = []
    while (fr := r.next()) is not None:
        out.append(fr)
    assert r.pending() == 0
    return out


def server_info(info: dict[str, object] | None = None) -> bytes:
    return F.encode_server_info(bytes(SERVER), CLIENT_PUB, INFO if info is None else info)


def logged_in(**kw: object) -> ClientConnection:
    """A connection that went through a fast-start login; its output so far is consumed."""
    c = ClientConnection(CLIENT, SERVER_PUB, **kw)  # type: ignore[arg-type]
    assert c.receive_data(server_info()) == [ServerInfo(INFO)]
    c.data_to_send()
    return c


# --- login --------------------------------------------------------------------------------------

def test_login_server_key_then_client_info_then_server_info() -> None:
    c = ClientConnection(CLIENT, mesh_key="ab" * 32, is_prober=True, app_name="tests")
    assert c.state is ConnState.AWAIT_SERVER_KEY and not c.logged_in
    assert c.data_to_send() == b""  # nothing is sent before the server's key is known
    assert c.receive_data(F.encode_server_key(SERVER_PUB)) == []
    assert c.state is ConnState.AWAIT_SERVER_INFO and c.server_public_key == SERVER_PUB
    [(ftype, payload)] = frames_of(c.data_to_send())
    assert ftype == F.FrameType.CLIENT_INFO
    ci = F.decode_client_info(bytes(SERVER), payload)
    assert ci.key == CLIENT_PUB == c.public_key
    assert (ci.version, ci.can_ack_pings, ci.is_prober, ci.app_name) == (2, True, True, "tests")
    assert ci.mesh_key == b"\xab" * 32
    assert c.data_to_send() == b""  # handed out once
    assert c.receive_data(server_info()) == [ServerInfo(INFO)]
    assert c.logged_in and c.state is ConnState.LOGGED_IN and c.server_info == INFO


def test_client_info_omits_optional_fields() -> None:
    c = ClientConnection(CLIENT, SERVER_PUB, can_ack_pings=False)
    [(_t, payload)] = frames_of(c.data_to_send())
    assert F.decode_client_info(bytes(SERVER), payload).raw == {"version": 2,
                                                                "CanAckPings": False}


def test_fast_start_queues_client_info_at_once_and_checks_the_server_key() -> None:
    c = ClientConnection(CLIENT, SERVER_PUB)
    assert c.state is ConnState.AWAIT_SERVER_INFO
    [(ftype, _p)] = frames_of(c.data_to_send())
    assert ftype == F.FrameType.CLIENT_INFO
    assert c.receive_data(F.encode_server_key(SERVER_PUB)) == []  # the same key: skipped
    early = c.receive_data(F.encode_health("dup") + F.encode_keepalive())
    assert early == [Health("dup"), KeepAlive()] and not c.logged_in
    assert c.receive_data(server_info() + F.encode_keepalive()) == [ServerInfo(INFO), KeepAlive()]
    assert c.logged_in


def test_fast_start_with_another_server_key_is_refused() -> None:
    c = ClientConnection(CLIENT, SERVER_PUB)
    other = bytes(PrivateKey.generate().public_key)
    with pytest.raises(DerpError, match="differs"):
        c.receive_data(F.encode_server_key(other))
    assert c.state is ConnState.ERROR


@pytest.mark.parametrize("first", [
    F.encode_keepalive(), F.encode_recv_packet(PEER, b"x"),
    F.frame(F.FrameType.SERVER_INFO, bytes(40)),
])
def test_first_frame_must_be_server_key(first: bytes) -> None:
    c = ClientConnection(CLIENT)
    with pytest.raises(DerpError, match="expected ServerKey frame"):
        c.receive_data(first)


def test_bad_magic_and_short_server_key() -> None:
    for payload in (b"DERP\x00\x00\x00\x00" + SERVER_PUB, F.MAGIC + SERVER_PUB[:31]):
        c = ClientConnection(CLIENT)
        with pytest.raises(F.FrameError):
            c.receive_data(F.frame(F.FrameType.SERVER_KEY, payload))
        assert c.state is ConnState.ERROR and c.data_to_send() == b""


def test_low_order_server_key_is_a_protocol_error() -> None:
    c = ClientConnection(CLIENT)
    with pytest.raises(DerpError, match="low-order"):
        c.receive_data(F.encode_server_key(bytes(32)))


def test_server_info_that_does_not_open() -> None:
    c = ClientConnection(CLIENT, SERVER_PUB)
    impostor = PrivateKey.generate()
    with pytest.raises(F.FrameError):
        c.receive_data(F.encode_server_info(bytes(impostor), CLIENT_PUB, INFO))
    assert not c.logged_in


def test_errors_are_sticky() -> None:
    c = logged_in()
    with pytest.raises(F.FrameError):
        c.receive_data(F.frame(F.FrameType.PONG, b"short"))
    assert c.state is ConnState.ERROR
    c.feed(F.encode_keepalive())  # ignored
    for _ in range(3):
        with pytest.raises(F.FrameError, match="Pong too short"):
            c.next_event()
    with pytest.raises(F.ProtocolError):
        c.receive_data(F.encode_keepalive())


def test_oversize_frame_header_is_refused_before_its_payload() -> None:
    c = logged_in()
    with pytest.raises(F.FrameError, match="exceeds limit"):
        c.receive_data(F.frame_header(F.FrameType.RECV_PACKET, F.MAX_INFO_LEN + 1))


def test_adopted_connection_starts_logged_in() -> None:
    c = ClientConnection(CLIENT, SERVER_PUB, logged_in=True)
    assert c.logged_in and c.data_to_send() == b""
    assert c.receive_data(F.encode_keepalive()) == [KeepAlive()]


# --- pings --------------------------------------------------------------------------------------

def test_ping_is_answered_with_pong_when_can_ack_pings() -> None:
    c = logged_in()
    assert c.receive_data(F.encode_ping(b"abcdefgh")) == [Ping(b"abcdefgh")]
    assert c.data_to_send() == F.encode_pong(b"abcdefgh")
    # Longer pings are echoed by their first 8 bytes; two pings, two pongs, in order.
    evs = c.receive_data(F.frame(F.FrameType.PING, b"12345678" + bytes(50))
                         + F.encode_ping(b"87654321"))
    assert evs == [Ping(b"12345678"), Ping(b"87654321")]
    assert c.data_to_send() == F.encode_pong(b"12345678") + F.encode_pong(b"87654321")


def test_ping_before_login_is_answered_too() -> None:
    c = ClientConnection(CLIENT, SERVER_PUB)
    c.data_to_send()
    assert c.receive_data(F.encode_ping(b"earlyone")) == [Ping(b"earlyone")]
    assert c.data_to_send() == F.encode_pong(b"earlyone")


def test_ping_not_answered_without_can_ack_pings_or_after_close() -> None:
    c = logged_in(can_ack_pings=False)
    assert c.receive_data(F.encode_ping(b"abcdefgh")) == [Ping(b"abcdefgh")]
    assert c.data_to_send() == b""
    c = logged_in()
    c.close()
    assert c.closed
    assert c.receive_data(F.encode_ping(b"abcdefgh")) == [Ping(b"abcdefgh")]
    assert c.data_to_send() == b""


def test_short_ping_is_a_frame_error() -> None:
    c = logged_in()
    with pytest.raises(F.FrameError):
        c.receive_data(F.frame(F.FrameType.PING, b"1234567"))
    assert c.data_to_send() == b""


# --- events -------------------------------------------------------------------------------------

EVENT_FRAMES: list[tuple[bytes, Event | None]] = [
    (F.encode_recv_packet(PEER, b"payload"), ReceivedPacket(PEER, b"payload")),
    (F.encode_recv_packet(PEER, b""), ReceivedPacket(PEER, b"")),
    (F.encode_keepalive(), KeepAlive()),
    (F.encode_peer_gone(PEER, F.PeerGoneReason.NOT_HERE), PeerGone(PEER, 1)),
    (F.frame(F.FrameType.PEER_GONE, PEER), PeerGone(PEER, 0)),
    (F.encode_peer_present(PEER), PeerPresent(PEER, None, 0, 0)),
    (F.encode_peer_present(PEER, bytes([10, 0, 0, 1]), 41641, F.PEER_PRESENT_MESH_PEER),
     PeerPresent(PEER, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]), 41641, 2)),
    (F.encode_pong(b"pongpong"), Pong(b"pongpong")),
    (F.encode_ping(b"pingping"), Ping(b"pingping")),
    (F.encode_health("duplicate"), Health("duplicate")),
    (F.encode_health(""), Health("")),
    (F.encode_restarting(1000, 60000), Restarting(1000, 60000)),
    (server_info({"version": 2}), ServerInfo({"version": 2})),
    (F.encode_server_key(bytes(32)), None),  # after the login: skipped, not checked
    (F.frame(0x0C, b"unknown"), None),
    (F.encode_send_packet(PEER, b"x"), None),  # client-to-server types are unknown here
]


@pytest.mark.parametrize(("frame", "event"), EVENT_FRAMES)
def test_every_frame_type_after_login(frame: bytes, event: Event | None) -> None:
    c = logged_in()
    assert c.receive_data(frame) == ([] if event is None else [event])
    if isinstance(event, ServerInfo):
        assert c.server_info == event.info  # a later ServerInfo replaces the first
    if not isinstance(event, Ping):
        assert c.data_to_send() == b""


def test_next_event_one_at_a_time() -> None:
    c = logged_in()
    c.feed(F.encode_keepalive() + F.frame(0x0C, b"") + F.encode_pong(b"abcdefgh"))
    assert c.next_event() == KeepAlive()
    assert c.next_event() == Pong(b"abcdefgh")  # the unknown frame in between is skipped
    assert c.next_event() is None


def _stream() -> tuple[bytes, list[Event]]:
    """Login frames then every event frame: the bytes a server sends, and the events."""
    data = F.encode_server_key(SERVER_PUB) + server_info()
    events: list[Event] = [ServerInfo(INFO)]
    for frame, ev in EVENT_FRAMES:
        data += frame
        if ev is not None:
            events.append(ev)
    return data, events


def _run(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    c = ClientConnection(CLIENT, SERVER_PUB)
    c.data_to_send()  # the ClientInfo (random nonce)
    events: list[Event] = []
    for chunk in chunks:
        events += c.receive_data(chunk)
    assert c.logged_in
    return events, c.data_to_send()


def test_partial_frames_split_at_every_byte_boundary() -> None:
    data, want = _stream()
    whole = _run([data])
    assert whole == (want, F.encode_pong(b"pingping"))
    for i in range(len(data) + 1):
        assert _run([data[:i], data[i:]]) == whole, i


def test_one_byte_at_a_time() -> None:
    data, _want = _stream()
    assert _run([data[i:i + 1] for i in range(len(data))]) == _run([data])


# --- frames the client sends, and the upgrade ----------------------------------------------------

def test_client_frames_are_the_codec_frames() -> None:
    c = logged_in()
    assert c.send_packet(PEER, b"x") == F.encode_send_packet(PEER, b"x")
    assert c.note_preferred(True) == F.encode_note_preferred(True)
    assert c.ping(b"abcdefgh") == F.encode_ping(b"abcdefgh")
    assert c.watch_conns() == F.encode_watch_conns()
    assert c.close_peer(PEER) == F.encode_close_peer(PEER)
    assert c.forward_packet(PEER, CLIENT_PUB, b"y") == F.encode_forward_packet(PEER, CLIENT_PUB,
                                                                               b"y")
    assert c.data_to_send() == b""  # sending does not touch the connection's own output


def test_upgrade_request_and_response() -> None:
    assert upgrade_request("h:1", "/derp") == (
        b"GET /derp HTTP/1.1\r\nHost: h:1\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
        b"User-Agent: nodeagent-derp\r\n\r\n")
    req = upgrade_request("h", "/derp?x=1", fast_start=True, ideal_node="n1")
    assert req.startswith(b"GET /derp?x=1 HTTP/1.1\r\n")
    assert req.endswith(b"Ideal-Node: n1\r\nDerp-Fast-Start: 1\r\n\r\n")
    check_upgrade_response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n")
    for head in (b"HTTP/1.1 426 Upgrade Required\r\n\r\n", b"garbage\r\n\r\n", b""):
        with pytest.raises(DerpError, match="refused"):
            check_upgrade_response(head)
