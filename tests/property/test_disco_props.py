"""Hypothesis: disco parsers never raise anything but DiscoError; messages and packets
round-trip."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from nodeagent.disco import codec as D

A = PrivateKey.generate()
B = PrivateKey.generate()
A_PRIV, A_PUB = bytes(A), bytes(A.public_key)
B_PRIV, B_PUB = bytes(B), bytes(B.public_key)
BOX_AB = D.DiscoBox(A_PRIV, B_PUB)
BOX_BA = D.DiscoBox(B_PRIV, A_PUB)

tx_ids = st.binary(min_size=12, max_size=12)
keys32 = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=24, max_size=24)
ports = st.integers(0, 65535)
v4_ints = st.integers(0, 2**32 - 1)
v4 = v4_ints.map(lambda n: str(ipaddress.IPv4Address(n)))
# Random 128-bit addresses rarely hit the short forms, so mix in small and IPv4-mapped ones.
v6_any = st.one_of(st.integers(0, 2**128 - 1), v4_ints,
                   v4_ints.map(lambda n: (0xFFFF << 32) | n),
                   st.integers(0, 2**16 - 1).map(lambda n: (0xFE80 << 112) | n),
                   ).map(ipaddress.IPv6Address)
v6 = v6_any.filter(lambda a: a.ipv4_mapped is None).map(str)
endpoints = st.tuples(st.one_of(v4, v6), ports)


@st.composite
def pings(draw: st.DrawFn) -> D.Ping:
    node_key = draw(st.one_of(st.none(), keys32))
    # keyless padding of 32+ bytes would read back as a node key: encode_message refuses it
    padding = draw(st.integers(0, 1000 if node_key is not None else D.KEY_LEN - 1))
    return D.Ping(draw(tx_ids), node_key, padding)


messages = st.one_of(
    pings(),
    st.builds(D.Pong, tx_ids, endpoints),
    st.builds(D.CallMeMaybe, st.lists(endpoints, max_size=20).map(tuple)),
)


def _inner_ish() -> st.SearchStrategy[bytes]:
    """Random bytes, most of them with a plausible type and version so each body parser runs."""
    typed = st.builds(lambda t, v, body: bytes([t, v]) + body,
                      st.integers(0, 11), st.sampled_from([0, 0, 0, 1, 255]),
                      st.binary(max_size=120))
    sized = st.builds(lambda t, n: bytes([t, 0]) + bytes(n),
                      st.integers(1, 3), st.integers(0, 80))
    return st.one_of(st.binary(max_size=80), typed, sized)


def _packet_ish() -> st.SearchStrategy[bytes]:
    """Random bytes, and disco-looking ones with a random, zero or real sender key."""
    sender = st.one_of(keys32, st.just(bytes(32)), st.just(A_PUB), st.just(B_PUB))
    looking = st.builds(lambda s, n, rest: D.MAGIC + s + n + rest,
                        sender, nonces, st.binary(max_size=120))
    return st.one_of(st.binary(max_size=160), looking)


# --- parsers never raise anything but DiscoError -------------------------------------------------


@settings(max_examples=300)
@given(_inner_ish())
def test_decode_message_raises_only_disco_error(inner: bytes) -> None:
    try:
        msg = D.decode_message(inner)
    except D.DiscoError:
        return
    if msg is None:
        assert inner[0] not in (D.TYPE_PING, D.TYPE_PONG, D.TYPE_CALL_ME_MAYBE)
    else:
        assert isinstance(msg, D.Ping | D.Pong | D.CallMeMaybe)


@settings(max_examples=300)
@given(_packet_ish())
def test_packet_parsers_raise_only_disco_error(pkt: bytes) -> None:
    assert D.looks_like_disco(pkt) == (len(pkt) >= 62 and pkt[:6] == D.MAGIC)
    try:
        assert D.sender_key(pkt) == pkt[6:38]
    except D.DiscoError:
        assert not D.looks_like_disco(pkt)
    for opener in (lambda p: D.open_packet(B_PRIV, p), BOX_BA.open):
        try:
            opener(pkt)
        except D.DiscoError:
            pass
        else:
            raise AssertionError("a random packet opened")


@given(st.binary(max_size=40), st.binary(max_size=120))
def test_open_packet_with_random_keys(priv: bytes, pkt: bytes) -> None:
    try:
        D.open_packet(priv, D.MAGIC + pkt)
    except D.DiscoError:
        pass


@settings(max_examples=300)
@given(_inner_ish(), nonces)
def test_authentic_packets_with_arbitrary_inner_bytes(inner: bytes, nonce: bytes) -> None:
    # a real box around anything a (newer, or broken) peer might seal
    pkt = D.MAGIC + A_PUB + bytes(D._make_box(A_PRIV, B_PUB).encrypt(inner, nonce))
    try:
        sender, msg = D.open_packet(B_PRIV, pkt)
    except D.DiscoError:
        try:
            D.decode_message(inner)
        except D.DiscoError:
            return
        raise AssertionError("open_packet failed where decode_message did not") from None
    assert sender == A_PUB and msg == D.decode_message(inner) == BOX_BA.open(pkt)


@given(st.binary(max_size=40))
def test_decode_endpoint_raises_only_disco_error(data: bytes) -> None:
    try:
        ip, port = D.decode_endpoint(data)
    except D.DiscoError:
        assert len(data) != 18
        return
    assert 0 <= port <= 65535
    addr = ipaddress.ip_address(ip)
    assert str(addr) == ip
    assert not (isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped)


# --- round trips ---------------------------------------------------------------------------------


@given(messages)
def test_message_round_trip(msg: D.Message) -> None:
    inner = D.encode_message(msg)
    assert D.decode_message(inner) == msg
    assert D.decode_message(inner + b"\x00" * 5) is not None  # trailing bytes never break it


@given(tx_ids, st.integers(D.KEY_LEN, 1000))
def test_keyless_ping_with_large_padding_is_refused(tx: bytes, padding: int) -> None:
    try:
        D.encode_message(D.Ping(tx, None, padding))
    except D.DiscoError:
        return
    raise AssertionError("ambiguous Ping encoded")


@given(endpoints)
def test_endpoint_round_trip(ep: tuple[str, int]) -> None:
    raw = D.encode_endpoint(ep)
    assert len(raw) == 18 and D.decode_endpoint(raw) == ep


@given(v6_any, ports)
def test_endpoint_text_is_canonical(addr: ipaddress.IPv6Address, port: int) -> None:
    want = str(addr.ipv4_mapped) if addr.ipv4_mapped is not None else str(addr)
    assert D.decode_endpoint(D.encode_endpoint((addr.exploded, port))) == (want, port)


@given(messages, st.one_of(st.none(), nonces))
def test_seal_open_round_trip(msg: D.Message, nonce: bytes | None) -> None:
    pkt = D.seal(A_PRIV, B_PUB, msg, nonce=nonce)
    assert D.looks_like_disco(pkt) and D.sender_key(pkt) == A_PUB
    assert len(pkt) == D.PACKET_OVERHEAD + len(D.encode_message(msg))
    if nonce is not None:
        assert pkt[38:62] == nonce and BOX_AB.seal(msg, nonce) == pkt
    assert D.open_packet(B_PRIV, pkt) == (A_PUB, msg)
    assert BOX_BA.open(pkt) == msg
    assert BOX_AB.open(BOX_BA.seal(msg)) == msg


@settings(max_examples=50)
@given(keys32, keys32, messages)
def test_seal_open_random_key_pairs(a: bytes, b: bytes, msg: D.Message) -> None:
    a_pub, b_pub = bytes(PrivateKey(a).public_key), bytes(PrivateKey(b).public_key)
    assert D.open_packet(b, D.seal(a, b_pub, msg)) == (a_pub, msg)


@given(messages, st.integers(0, 10_000), st.integers(1, 255))
def test_any_flipped_byte_is_rejected(msg: D.Message, where: int, flip: int) -> None:
    pkt = bytearray(BOX_AB.seal(msg))
    pkt[where % len(pkt)] ^= flip
    for opener in (lambda p: D.open_packet(B_PRIV, p), BOX_BA.open):
        try:
            opener(bytes(pkt))
        except D.DiscoError:
            continue
        raise AssertionError("a corrupted packet opened")
