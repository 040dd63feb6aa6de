"""Hypothesis: whatever a server sends, the sans-IO DERP client connection raises nothing but
ProtocolError, errors are sticky, its own output is well-formed, and chunking does not matter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from nodeagent.derp import frames as F
from nodeagent.derp.conn import ClientConnection, ConnState, Event

SERVER = PrivateKey.generate()
SERVER_PUB = bytes(SERVER.public_key)
CLIENT = bytes(PrivateKey.generate())
CLIENT_PUB = bytes(PrivateKey(CLIENT).public_key)
LOGIN = F.encode_server_key(SERVER_PUB) + F.encode_server_info(bytes(SERVER), CLIENT_PUB, {})
STARTS = ["await_server_key", "fast_start", "logged_in"]


def _conn(start: str, can_ack_pings: bool = True) -> ClientConnection:
    if start == "await_server_key":
        return ClientConnection(CLIENT, can_ack_pings=can_ack_pings)
    return ClientConnection(CLIENT, SERVER_PUB, can_ack_pings=can_ack_pings,
                            logged_in=start == "logged_in")


def _frames() -> st.SearchStrategy[bytes]:
    """Well-framed garbage: any type (known ones favoured), payloads of any content."""
    ftype = st.one_of(st.sampled_from([int(t) for t in F.FrameType]), st.integers(0, 255))
    payload = st.one_of(st.binary(max_size=80),
                        st.binary(min_size=32, max_size=32).map(lambda k: F.MAGIC + k),
                        st.binary(min_size=32, max_size=120))
    return st.builds(F.frame, ftype, payload)


def _input() -> st.SearchStrategy[bytes]:
    body = st.lists(st.one_of(_frames(), st.binary(max_size=40)), max_size=12).map(b"".join)
    return st.one_of(st.binary(max_size=300), body, body.map(lambda b: LOGIN + b))


def _check_output(c: ClientConnection) -> None:
    out = c.data_to_send()
    r = F.FrameReader()
    r.feed(out)
    while (fr := r.next()) is not None:
        assert fr[0] in (F.FrameType.CLIENT_INFO, F.FrameType.PONG)
        if fr[0] == F.FrameType.PONG:
            assert len(fr[1]) == F.PING_LEN
    assert r.pending() == 0


@settings(max_examples=400)
@given(st.lists(_input(), min_size=1, max_size=4), st.sampled_from(STARTS), st.booleans())
def test_random_input_raises_only_protocol_error(chunks: list[bytes], start: str,
                                                 can_ack: bool) -> None:
    c = _conn(start, can_ack)
    _check_output(c)
    failed: F.ProtocolError | None = None
    for chunk in chunks:
        try:
            c.receive_data(chunk)
        except F.ProtocolError as e:
            failed = e
            break
        _check_output(c)
        assert c.state is not ConnState.ERROR
    if failed is None:
        return
    assert c.state is ConnState.ERROR and c.data_to_send() == b""
    c.feed(LOGIN)
    try:
        c.next_event()
    except F.ProtocolError as again:
        assert type(again) is type(failed) and again.args == failed.args
    else:
        raise AssertionError("a connection in ERROR produced an event")


def _drain(c: ClientConnection, into: list[Event]) -> str | None:
    """Append the buffered events to ``into``; the protocol error that stopped it, if any."""
    try:
        while (ev := c.next_event()) is not None:
            into.append(ev)
    except F.ProtocolError as e:
        return f"{type(e).__name__}: {e}"
    return None


@settings(max_examples=200)
@given(_input(), st.sampled_from(STARTS), st.data())
def test_chunking_does_not_change_the_outcome(data: bytes, start: str, draw: st.DataObject) -> None:
    whole = _conn(start)
    whole.data_to_send()
    whole.feed(data)
    want: list[Event] = []
    want_err = _drain(whole, want)
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=6)))
    split = _conn(start)
    split.data_to_send()
    got: list[Event] = []
    err = None
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        split.feed(data[a:b])
        if (err := _drain(split, got)) is not None:
            break
    assert (got, err, split.state) == (want, want_err, whole.state)
    assert _pongs(split) == _pongs(whole)


def _pongs(c: ClientConnection) -> list[bytes]:
    """The Pong frames among the connection's output (the ClientInfo has a random nonce)."""
    r = F.FrameReader()
    r.feed(c.data_to_send())
    return [fr[1] for fr in iter(r.next, None) if fr[0] == F.FrameType.PONG]
