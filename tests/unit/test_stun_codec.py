"""STUN codec: spec vectors (specs/reference/stun.md §9), request classification, responses."""

from __future__ import annotations

import pytest

from nodeagent.stun import codec as C


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


TXID = bytes(range(12))


def test_tailscale_request_is_exact_40_bytes() -> None:
    assert C.build_binding_request(TXID) == h(
        "00 01 00 14 21 12 a4 42 00 01 02 03 04 05 06 07 08 09 0a 0b 80 22 00 08 74 61 69 6c "
        "6e 6f 64 65 80 28 00 04 8a ab ad 90")


@pytest.mark.parametrize("host,port,want", [
    ("1.2.3.4", 254, "01 01 00 0c 21 12 a4 42 00 01 02 03 04 05 06 07 08 09 0a 0b 00 20 00 08 "
                     "00 01 21 ec 20 10 a7 46"),
    ("2001:db8::1", 3478, "01 01 00 18 21 12 a4 42 00 01 02 03 04 05 06 07 08 09 0a 0b 00 20 00 "
                          "14 00 02 2c 84 01 13 a9 fa 00 01 02 03 04 05 06 07 08 09 0a 0a"),
])
def test_response_vectors(host: str, port: int, want: str) -> None:
    assert C.build_binding_response(TXID, host, port) == h(want)


def test_v4_mapped_source_answered_in_ipv4_form() -> None:
    # nodeagent contract: never the ::ffff: form, even from a dual-stack socket.
    assert C.build_binding_response(TXID, "::ffff:1.2.3.4", 254) == \
        C.build_binding_response(TXID, "1.2.3.4", 254)


RESPONSE_VECTORS = [
    ("01 01 00 0c 21 12 a4 42 23 60 b1 1e 3e c6 8f fa 93 e0 80 07 00 20 00 08 00 01 c7 86 69 57 "
     "85 6f", "2360b11e3ec68ffa93e08007", "72.69.33.45", 59028),
    ("01 01 00 0c 21 12 a4 42 f9 f1 21 cb de 7d 7c 75 92 3c e2 71 00 20 00 08 00 01 c7 87 69 57 "
     "85 6f", "f9f121cbde7d7c75923ce271", "72.69.33.45", 59029),
    ("01 01 00 44 21 12 a4 42 48 2e b6 47 15 e8 b2 8e ae ad 64 44 00 01 00 08 00 01 e4 ab 48 45 "
     "21 2d 00 04 00 08 00 01 27 10 d9 0a 44 98 00 05 00 08 00 01 27 11 d9 74 7a 8a 80 20 00 08 "
     "00 01 c5 b9 69 57 85 6f 80 22 00 10 56 6f 76 69 64 61 2e 6f 72 67 20 30 2e 39 36 00",
     "482eb64715e8b28eaead6444", "72.69.33.45", 58539),
    ("01 01 00 24 21 12 a4 42 7e 57 96 68 29 f4 44 60 9d 1d ea a6 00 01 00 08 00 01 e9 d3 48 45 "
     "21 2d 00 04 00 08 00 01 0d 96 4d 48 a9 d4 00 05 00 08 00 01 0d 97 4d 48 a9 d5",
     "7e57966829f444609d1deaa6", "72.69.33.45", 59859),
    ("01 01 00 24 21 12 a4 42 eb c2 d3 6e f4 71 21 7c 4f 3e 30 8e 80 22 00 0a 65 6e 64 70 6f 69 "
     "6e 74 65 72 00 00 00 20 00 08 00 01 ce 66 5e 12 a4 43 80 28 00 04 b6 99 bb 02 01 01 00 24 "
     "21 12 a4 42", "ebc2d36ef471217c4f3e308e", "127.0.0.1", 61300),
    ("01 01 00 48 21 12 a4 42 06 f5 66 85 d2 8a f3 e6 9c e3 41 e2 00 01 00 14 00 02 90 ce 26 02 "
     "00 d1 b4 cf c1 00 38 b2 31 ff fe ef 96 f6 80 2b 00 14 00 02 0d 96 26 04 a8 80 00 02 00 d1 "
     "00 00 00 00 00 c5 70 01 00 20 00 14 00 02 b1 dc 07 10 a4 93 b2 3a a7 85 ea 38 c2 19 62 0c "
     "d7 14", "06f56685d28af3e69ce341e2", "2602:d1:b4cf:c100:38b2:31ff:feef:96f6", 37070),
    ("01 01 00 14 21 12 a4 42 eb c2 d3 6e f4 71 21 7c 4f 3e 30 8e 80 22 00 01 61 00 00 00 00 20 "
     "00 08 00 01 ce 66 5e 12 a4 43", "ebc2d36ef471217c4f3e308e", "127.0.0.1", 61300),
    ("01 01 00 14 21 12 a4 42 eb c2 d3 6e f4 71 21 7c 4f 3e 30 8e 80 22 00 03 61 62 63 00 00 20 "
     "00 08 00 01 ce 66 5e 12 a4 43", "ebc2d36ef471217c4f3e308e", "127.0.0.1", 61300),
    ("01 01 00 18 21 12 a4 42 4f d5 d2 02 dc b3 7d 31 fc 77 33 06 00 20 00 14 00 02 cd 3d 21 12 "
     "a4 42 4f d5 d2 02 dc b3 82 ce 2d c3 fc c7", "4fd5d202dcb37d31fc773306",
     "209.180.207.193", 60463),
]


@pytest.mark.parametrize("msg,txid,host,port", RESPONSE_VECTORS)
def test_parse_response_vectors(msg: str, txid: str, host: str, port: int) -> None:
    assert C.parse_binding_response(h(msg)) == (bytes.fromhex(txid), host, port)


@pytest.mark.parametrize("data,want", [
    (b"", False), (bytes(20), False), (bytes(4) + C.MAGIC + bytes(11), False),
    (bytes(4) + C.MAGIC + bytes(12), True), (bytes(4) + C.MAGIC + bytes(20), True),
    (b"\xf0" + bytes(3) + C.MAGIC + bytes(12), False),
    (b"\x40" + bytes(3) + C.MAGIC + bytes(12), False),
    (b"\x20" + bytes(3) + C.MAGIC + bytes(12), True),
])
def test_is_stun_vectors(data: bytes, want: bool) -> None:
    assert C.is_stun(data) is want


@pytest.mark.parametrize("bad,msg", [
    (b"", "not a STUN"),
    (h("01 11 00 00 21 12 a4 42") + TXID, "not a STUN binding success"),
    (h("01 01 00 10 21 12 a4 42") + TXID + bytes(8), "length beyond"),
    (h("01 01 00 00 21 12 a4 42") + TXID, "no mapped address"),
    (h("01 01 00 08 21 12 a4 42") + TXID + h("00 20 00 04 00 03 00 00"), "family"),
    (h("01 01 00 08 21 12 a4 42") + TXID + h("00 20 00 06 00 01 00 00 01 02 00 00"), "truncated"),
    (h("01 01 00 04 21 12 a4 42") + TXID + h("00 20 00 02"), "truncated"),
])
def test_parse_response_errors(bad: bytes, msg: str) -> None:
    with pytest.raises(C.StunError, match=msg):
        C.parse_binding_response(bad)


def test_xor_mapped_wins_over_mapped_and_last_xor_wins() -> None:
    first = C.build_binding_response(TXID, "10.0.0.1", 1)[20:]
    second = C.build_binding_response(TXID, "10.0.0.2", 2)[20:]
    plain = h("00 01 00 08 00 01 00 03 0a 00 00 03")
    body = plain + first + second
    msg = C._HH.pack(C.BINDING_SUCCESS, len(body)) + C.MAGIC + TXID + body
    assert C.parse_binding_response(msg) == (TXID, "10.0.0.2", 2)


# --- server-side classification ---


def _req(attrs: bytes, *, cookie: bytes = C.MAGIC, mtype: int = 1) -> bytes:
    return C._HH.pack(mtype, len(attrs)) + cookie + TXID + attrs


def test_classify_tailscale_request() -> None:
    assert C.parse_binding_request(C.build_binding_request(TXID)) == (C.KIND_TAILNODE, TXID)
    assert C.parse_binding_request(C.build_binding_request(TXID), strict=True) == \
        (C.KIND_TAILNODE, TXID)


def test_classify_plain_rfc5389_request_and_strict_mode() -> None:
    plain = _req(b"")
    assert C.parse_binding_request(plain) == (C.KIND_RFC5389, TXID)
    assert C.parse_binding_request(plain, strict=True) == (C.DROP_NOT_TAILNODE, b"")
    other_sw = C.build_binding_request(TXID, software=b"coturn")
    assert C.parse_binding_request(other_sw) == (C.KIND_RFC5389, TXID)
    no_fp = C.build_binding_request(TXID, with_fingerprint=False)
    assert C.parse_binding_request(no_fp) == (C.KIND_TAILNODE, TXID)
    assert C.parse_binding_request(no_fp, strict=True)[0] == C.DROP_NOT_TAILNODE


def test_classify_drops_by_reason() -> None:
    good = C.build_binding_request(TXID)
    bad_fp = good[:-1] + bytes([good[-1] ^ 1])
    assert C.parse_binding_request(bad_fp)[0] == C.DROP_BAD_FINGERPRINT
    assert C.parse_binding_request(good[:19])[0] == C.DROP_NOT_STUN
    assert C.parse_binding_request(b"\xc0" + good[1:])[0] == C.DROP_NOT_STUN
    resp = C.build_binding_response(TXID, "1.2.3.4", 5)
    assert C.parse_binding_request(resp)[0] == C.DROP_NOT_BINDING
    assert C.parse_binding_request(_req(h("80 22 00 08 61 62")))[0] == C.DROP_MALFORMED
    fp_not_last = good[:20] + good[32:40] + good[20:32]
    assert C.parse_binding_request(fp_not_last)[0] in (C.DROP_MALFORMED, C.DROP_BAD_FINGERPRINT)
    # Declared length beyond the datagram.
    assert C.parse_binding_request(good[:2] + b"\x00\x40" + good[4:])[0] == C.DROP_MALFORMED


def test_classic_rfc3489_request_gets_plain_mapped_address() -> None:
    txid16 = bytes(range(100, 116))
    classic = C._HH.pack(1, 8) + txid16 + h("00 03 00 04 00 00 00 00")  # CHANGE-REQUEST 0
    kind, txid = C.parse_binding_request(classic)
    assert (kind, txid) == (C.KIND_RFC3489, txid16)
    resp = C.build_response_for(kind, txid, "127.0.0.1", 17947)
    assert resp == C._HH.pack(0x0101, 12) + txid16 + h("00 01 00 08 00 01 46 1b 7f 00 00 01")
    assert C.parse_binding_request(classic, strict=True)[0] == C.DROP_NOT_STUN
    assert C.parse_binding_request(classic, classic=False)[0] == C.DROP_NOT_STUN
    assert C.parse_binding_request(classic + b"\x00")[0] == C.DROP_NOT_STUN  # length mismatch


def test_response_for_5389_round_trips() -> None:
    kind, txid = C.parse_binding_request(C.build_binding_request(TXID))
    resp = C.build_response_for(kind, txid, "2001:db8::7", 4242)
    assert C.parse_binding_response(resp) == (TXID, "2001:db8::7", 4242)


def test_request_txid_length_checked() -> None:
    with pytest.raises(ValueError):
        C.build_binding_request(b"short")
