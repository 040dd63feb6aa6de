"""Disco codec: spec vectors (specs/reference/disco.md §6), parse rules, seal/open."""

from __future__ import annotations

import subprocess
import sys

import pytest
from nacl.public import PrivateKey

from nodeagent.disco import codec as D
from nodeagent.disco.codec import CallMeMaybe, DiscoError, Ping, Pong


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


TX = bytes(range(1, 13))


def k(at: dict[int, int]) -> bytes:
    """The reference's K(…): a 32-byte key with the given index:value pairs, zeros elsewhere."""
    raw = bytearray(32)
    for i, v in at.items():
        raw[i] = v
    return bytes(raw)


NODE_KEY = k({1: 1, 2: 2, 30: 30, 31: 31})
PING_KEY_HEX = ("01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02 00 00 00 00 00 00 00 00 00 "
                "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 1e 1f")

VECTORS = [
    ("ping", Ping(TX, None), "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c"),
    ("ping+key", Ping(TX, NODE_KEY), PING_KEY_HEX),
    ("ping+pad", Ping(TX, None, 3), "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00"),
    ("ping+key+pad", Ping(TX, NODE_KEY, 3), PING_KEY_HEX + " 00 00 00"),
    ("pong v4", Pong(TX, ("2.3.4.5", 1234)),
     "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00 00 00 00 00 00 00 00 ff ff 02 03 04 05 "
     "04 d2"),
    ("pong v6", Pong(TX, ("fed0::12", 6666)),
     "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c fe d0 00 00 00 00 00 00 00 00 00 00 00 00 00 12 "
     "1a 0a"),
    ("cmm empty", CallMeMaybe(()), "03 00"),
    ("cmm two", CallMeMaybe((("1.2.3.4", 567), ("2001::3456", 789))),
     "03 00 00 00 00 00 00 00 00 00 00 00 ff ff 01 02 03 04 02 37 20 01 00 00 00 00 00 00 00 00 "
     "00 00 00 00 34 56 03 15"),
]


@pytest.mark.parametrize("name,msg,want", VECTORS, ids=[v[0] for v in VECTORS])
def test_vector_encode(name: str, msg: D.Message, want: str) -> None:
    assert D.encode_message(msg) == h(want)


@pytest.mark.parametrize("name,msg,want", VECTORS, ids=[v[0] for v in VECTORS])
def test_vector_decode(name: str, msg: D.Message, want: str) -> None:
    assert D.decode_message(h(want)) == msg
    assert D.decode_message(memoryview(h(want))) == msg


def test_constants() -> None:
    assert D.MAGIC == b"TS\xf0\x9f\x92\xac" == "TS\U0001f4ac".encode()
    assert (D.KEY_LEN, D.NONCE_LEN, D.HEADER_LEN) == (32, 24, 62)
    assert (D.TYPE_PING, D.TYPE_PONG, D.TYPE_CALL_ME_MAYBE) == (1, 2, 3)


def test_derp_magic_ip() -> None:
    assert D.DERP_MAGIC_IP == "127.3.3.40"
    ep = D.derp_endpoint(7)
    assert ep == ("127.3.3.40", 7) and D.is_derp_endpoint(ep)
    assert not D.is_derp_endpoint(("127.3.3.41", 7))
    # a pong for a ping that came via DERP region 7 round-trips through the wire form
    pong = Pong(TX, ep)
    assert D.decode_message(D.encode_message(pong)) == pong
    assert D.encode_endpoint(ep) == h("00" * 10 + "ff ff 7f 03 03 28 00 07")


# --- parse rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", [b"", b"\x01", b"\x01\x00" + TX[:11], b"\x02\x00" + bytes(29)])
def test_short_messages_are_errors(inner: bytes) -> None:
    with pytest.raises(DiscoError):
        D.decode_message(inner)


def test_ping_key_needs_all_32_bytes_else_padding() -> None:
    # 31 bytes after the tx id: no node key, 31 bytes of padding
    assert D.decode_message(b"\x01\x00" + TX + bytes(31)) == Ping(TX, None, 31)
    assert D.decode_message(b"\x01\x00" + TX + bytes(32)) == Ping(TX, bytes(32), 0)
    # padding is counted, not checked for zeros
    assert D.decode_message(h(PING_KEY_HEX) + b"xyz") == Ping(TX, NODE_KEY, 3)


def test_ping_version_is_ignored() -> None:
    assert D.decode_message(b"\x01\x07" + TX) == Ping(TX, None)


def test_pong_trailing_bytes_ignored() -> None:
    want = Pong(TX, ("2.3.4.5", 1234))
    assert D.decode_message(D.encode_message(want) + b"future") == want


@pytest.mark.parametrize("inner", [
    b"\x03\x00" + bytes(17),            # not a multiple of 18
    b"\x03\x00" + bytes(19),
    b"\x03\x01" + bytes(18),            # version != 0
    b"\x03\x00",                        # empty
    b"\x03\x05",
])
def test_call_me_maybe_lenient(inner: bytes) -> None:
    assert D.decode_message(inner) == CallMeMaybe(())


@pytest.mark.parametrize("mtype", [0x00, *range(0x04, 0x0A), 0x7F, 0xFF])
def test_unknown_types_decode_to_none(mtype: int) -> None:
    assert D.decode_message(bytes([mtype, 0])) is None
    assert D.decode_message(bytes([mtype, 0]) + bytes(200)) is None


def test_relay_vector_decodes_to_none() -> None:
    bind = h("04 00 00 00 00 01 00 00 00 02 00 01 02" + " 00" * 27 + " 1e 1f") + bytes(range(32))
    assert D.decode_message(bind) is None


def test_encode_rejects_bad_messages() -> None:
    bad = [
        Ping(TX[:11], None),
        Ping(TX, b"short"),
        Ping(TX, None, -1),
        Ping(TX, None, 32),                   # would read back as a node key
        Pong(TX, ("not-an-ip", 1)),
        Pong(TX, ("1.2.3.4", 65536)),
        Pong(TX, ("1.2.3.4", -1)),
        CallMeMaybe((("1.2.3.4", "80"),)),  # type: ignore[arg-type]
    ]
    for msg in bad:
        with pytest.raises(DiscoError):
            D.encode_message(msg)
    with pytest.raises(DiscoError):
        D.encode_message("ping")  # type: ignore[arg-type]
    assert D.encode_message(Ping(TX, None, 31))  # the largest keyless padding is fine
    assert D.decode_message(D.encode_message(Ping(TX, NODE_KEY, 1000))) == Ping(TX, NODE_KEY, 1000)


# --- endpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ep,raw", [
    (("1.2.3.4", 567), "00000000000000000000ffff01020304 0237"),
    (("2001::3456", 789), "20010000000000000000000000003456 0315"),
    (("::", 0), "00000000000000000000000000000000 0000"),
    (("::102:304", 1), "00000000000000000000000001020304 0001"),  # IPv4-compatible stays v6
])
def test_endpoint_codec(ep: tuple[str, int], raw: str) -> None:
    assert D.encode_endpoint(ep) == h(raw)
    assert D.decode_endpoint(h(raw)) == ep


def test_endpoint_text_forms() -> None:
    assert D.decode_endpoint(D.encode_endpoint(("::ffff:1.2.3.4", 9))) == ("1.2.3.4", 9)
    assert D.decode_endpoint(D.encode_endpoint(("2001:0DB8:0:0:0:0:0:1", 9))) == ("2001:db8::1", 9)
    assert D.decode_endpoint(D.encode_endpoint(("fe80::1%eth0", 9))) == ("fe80::1", 9)


@pytest.mark.parametrize("n", [0, 17, 19])
def test_endpoint_wrong_length(n: int) -> None:
    with pytest.raises(DiscoError):
        D.decode_endpoint(bytes(n))


# --- outer packet --------------------------------------------------------------------------------


def test_looks_like_disco_boundaries() -> None:
    assert not D.looks_like_disco(D.MAGIC + bytes(55))   # 61 bytes
    assert D.looks_like_disco(D.MAGIC + bytes(56))       # 62 bytes
    assert D.looks_like_disco(memoryview(D.MAGIC + bytes(56)))
    assert D.looks_like_disco(bytearray(D.MAGIC + bytes(56)))
    assert not D.looks_like_disco(b"TS\xf0\x9f\x92\xad" + bytes(56))
    assert not D.looks_like_disco(b"")


def test_sender_key() -> None:
    key = bytes(range(32))
    assert D.sender_key(D.MAGIC + key + bytes(24)) == key
    with pytest.raises(DiscoError):
        D.sender_key(D.MAGIC + key + bytes(23))


def _pair() -> tuple[bytes, bytes]:
    priv = PrivateKey.generate()
    return bytes(priv), bytes(priv.public_key)


@pytest.mark.parametrize("msg", [v[1] for v in VECTORS], ids=[v[0] for v in VECTORS])
def test_seal_open_round_trip(msg: D.Message) -> None:
    a_priv, a_pub = _pair()
    b_priv, b_pub = _pair()
    nonce = bytes(range(24))
    pkt = D.seal(a_priv, b_pub, msg, nonce=nonce)
    assert pkt[:6] == D.MAGIC and pkt[6:38] == a_pub and pkt[38:62] == nonce
    assert len(pkt) == D.PACKET_OVERHEAD + len(D.encode_message(msg))
    assert D.looks_like_disco(pkt) and D.sender_key(pkt) == a_pub
    assert D.open_packet(b_priv, pkt) == (a_pub, msg)
    # the precomputed boxes agree with the one-shot functions, both ways
    ab, ba = D.DiscoBox(a_priv, b_pub), D.DiscoBox(b_priv, a_pub)
    assert ab.seal(msg, nonce) == pkt
    assert ba.open(pkt) == msg
    assert ab.open(ba.seal(msg)) == msg
    assert D.open_packet(a_priv, ba.seal(msg)) == (b_pub, msg)


def test_random_nonces_differ() -> None:
    a_priv, _ = _pair()
    _, b_pub = _pair()
    box = D.DiscoBox(a_priv, b_pub)
    msg = Ping(TX, NODE_KEY)
    assert box.seal(msg)[38:62] != box.seal(msg)[38:62]
    assert D.seal(a_priv, b_pub, msg)[38:62] != D.seal(a_priv, b_pub, msg)[38:62]


def test_wrong_receiver_key() -> None:
    a_priv, a_pub = _pair()
    _, b_pub = _pair()
    c_priv, _ = _pair()
    pkt = D.seal(a_priv, b_pub, Ping(TX, NODE_KEY))
    with pytest.raises(DiscoError):
        D.open_packet(c_priv, pkt)
    with pytest.raises(DiscoError):
        D.DiscoBox(c_priv, a_pub).open(pkt)


def test_flipped_bytes_do_not_open() -> None:
    a_priv, a_pub = _pair()
    b_priv, b_pub = _pair()
    pkt = D.seal(a_priv, b_pub, Pong(TX, ("2.3.4.5", 1234)))
    box = D.DiscoBox(b_priv, a_pub)
    for pos in range(len(pkt)):
        bad = bytearray(pkt)
        bad[pos] ^= 0x01
        with pytest.raises(DiscoError):
            D.open_packet(b_priv, bytes(bad))
        with pytest.raises(DiscoError):
            box.open(bytes(bad))
    with pytest.raises(DiscoError):
        D.open_packet(b_priv, pkt[:-1])
    with pytest.raises(DiscoError):
        D.open_packet(b_priv, pkt + b"\x00")


def test_disco_box_rejects_other_sender() -> None:
    _, a_pub = _pair()
    b_priv, b_pub = _pair()
    c_priv, c_pub = _pair()
    from_c = D.seal(c_priv, b_pub, Ping(TX, None))
    with pytest.raises(DiscoError, match="another sender"):
        D.DiscoBox(b_priv, a_pub).open(from_c)
    assert D.DiscoBox(b_priv, c_pub).open(from_c) == Ping(TX, None)


def test_open_unknown_type_and_malformed_inner() -> None:
    a_priv, a_pub = _pair()
    b_priv, b_pub = _pair()
    # seal arbitrary inner bytes with a raw box, the way a newer peer might
    box = D._make_box(a_priv, b_pub)
    header = D.MAGIC + a_pub
    unknown = header + bytes(box.encrypt(b"\x09\x00" + bytes(80), bytes(24)))
    assert D.open_packet(b_priv, unknown) == (a_pub, None)
    assert D.DiscoBox(b_priv, a_pub).open(unknown) is None
    short_pong = header + bytes(box.encrypt(b"\x02\x00" + bytes(10), bytes(24)))
    with pytest.raises(DiscoError):
        D.open_packet(b_priv, short_pong)
    empty = header + bytes(box.encrypt(b"", bytes(24)))
    with pytest.raises(DiscoError):
        D.open_packet(b_priv, empty)


def test_bad_keys_are_disco_errors() -> None:
    a_priv, _ = _pair()
    with pytest.raises(DiscoError):
        D.DiscoBox(a_priv, b"short")
    with pytest.raises(DiscoError):
        D.DiscoBox(b"short", bytes(range(32)))
    with pytest.raises(DiscoError):
        D.DiscoBox(a_priv, bytes(32))  # low-order point: zero shared secret
    # a packet claiming a low-order sender key
    with pytest.raises(DiscoError):
        D.open_packet(a_priv, D.MAGIC + bytes(32) + bytes(24) + bytes(40))
    with pytest.raises(DiscoError):
        D.seal(a_priv, bytes(range(32)), Ping(TX, None), nonce=bytes(23))


def test_codec_imports_without_asyncio() -> None:
    code = ("import sys, nodeagent.disco.codec\n"
            "assert 'asyncio' not in sys.modules\n"
            "import nodeagent.disco as d\n"
            "d.Ping, d.DiscoBox\n"
            "assert 'asyncio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
