"""Hypothesis properties of the STUN codec: parsers never raise unexpectedly; round trips."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.stun import codec as C

txids = st.binary(min_size=12, max_size=12)
ports = st.integers(0, 65535)
v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6 = st.integers(0, 2**128 - 1).map(lambda n: ipaddress.IPv6Address(n)).filter(
    lambda a: a.ipv4_mapped is None).map(str)


def _stunish() -> st.SearchStrategy[bytes]:
    """Random bytes, half of them with a STUN-looking header so the attribute walk runs."""
    header = st.builds(lambda t, n, x, body: t.to_bytes(2, "big") + n.to_bytes(2, "big")
                       + C.MAGIC + x + body,
                       st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011]), st.integers(0, 80),
                       txids, st.binary(max_size=96))
    return st.one_of(st.binary(max_size=128), header)


@given(_stunish(), st.booleans(), st.booleans())
def test_request_classifier_never_raises(data: bytes, strict: bool, classic: bool) -> None:
    kind, txid = C.parse_binding_request(data, strict=strict, classic=classic)
    if kind in C.ACCEPTED_KINDS:
        assert len(txid) == (16 if kind == C.KIND_RFC3489 else 12)
    else:
        assert kind in C.DROP_REASONS and txid == b""


@given(_stunish())
def test_response_parser_raises_only_stun_error(data: bytes) -> None:
    try:
        txid, host, port = C.parse_binding_response(data)
    except C.StunError:
        return
    assert len(txid) == 12 and 0 <= port <= 65535
    ipaddress.ip_address(host)


@given(txids, st.one_of(v4, v6), ports)
def test_response_round_trip(txid: bytes, host: str, port: int) -> None:
    assert C.parse_binding_response(C.build_binding_response(txid, host, port)) == \
        (txid, host, port)


@given(txids, st.one_of(st.none(), st.binary(max_size=40).filter(lambda b: b != b"tailnode")),
       st.booleans())
def test_request_round_trip(txid: bytes, software: bytes | None, fp: bool) -> None:
    req = C.build_binding_request(txid, software=software, with_fingerprint=fp)
    assert C.parse_binding_request(req) == (C.KIND_RFC5389, txid)
    assert C.parse_binding_request(C.build_binding_request(txid)) == (C.KIND_TAILNODE, txid)


# Byte positions of a tailnode request outside the attribute headers (20-23 SOFTWARE, 32-35
# FINGERPRINT): the STUN header, the SOFTWARE value and the CRC itself.
_CRC_COVERED = [*range(0, 20), *range(24, 32), *range(36, 40)]


@given(txids, st.sampled_from(_CRC_COVERED), st.integers(1, 255))
def test_corrupted_fingerprinted_request_is_never_answered(
        txid: bytes, pos: int, flip: int) -> None:
    # Any flipped bit outside the attribute headers is caught by the CRC (or by the header
    # checks). Corrupting an attribute header can re-frame the attributes so that no
    # FINGERPRINT is seen at all, which the contract allows (a fingerprint is only checked when
    # present) — so those bytes are left out.
    req = bytearray(C.build_binding_request(txid))
    req[pos] ^= flip
    kind, got = C.parse_binding_request(bytes(req))
    assert kind not in C.ACCEPTED_KINDS, (pos, kind, got)
