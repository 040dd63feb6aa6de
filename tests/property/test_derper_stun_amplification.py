"""Hypothesis: the derper's STUN server never amplifies beyond one address attribute.

For random valid binding requests (RFC 5389 with random attributes, optional SOFTWARE and
FINGERPRINT, Tailscale's own form, and RFC 3489 classic requests) from random IPv4/IPv6 sources,
fed through the real ``StunProtocol``: every valid request gets exactly one reply (non-strict
mode), and ``len(reply) <= len(request) + mapped_address_attr_len(source)``.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from nodeagent.stun import codec as C

pytestmark = pytest.mark.feature("derper")

_HH = struct.Struct(">HH")

txids = st.binary(min_size=12, max_size=12)
v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
mapped = v4.map(lambda a: "::ffff:" + a)
sources = st.tuples(st.one_of(v4, v6, mapped), st.integers(1, 65535))

# Any attribute type but FINGERPRINT, which is only valid last (added separately below).
attr_types = st.integers(0, 0xFFFF).filter(lambda t: t != C.ATTR_FINGERPRINT)
attrs = st.lists(st.tuples(attr_types, st.binary(max_size=48)), max_size=5)


def _attrs_bytes(items: list[tuple[int, bytes]]) -> bytes:
    return b"".join(_HH.pack(t, len(v)) + v + b"\x00" * (-len(v) % 4) for t, v in items)


@st.composite
def rfc5389_requests(draw: st.DrawFn) -> bytes:
    body = _attrs_bytes(draw(attrs))
    if draw(st.booleans()):
        sw = draw(st.one_of(st.just(C.SOFTWARE_TAILNODE), st.binary(max_size=40)))
        body += _attrs_bytes([(C.ATTR_SOFTWARE, sw)])
    with_fp = draw(st.booleans())
    head = _HH.pack(C.BINDING_REQUEST, len(body) + (8 if with_fp else 0)) + C.MAGIC
    msg = head + draw(txids) + body
    if with_fp:
        msg += _HH.pack(C.ATTR_FINGERPRINT, 4) + C.fingerprint(msg).to_bytes(4, "big")
    return msg


@st.composite
def rfc3489_requests(draw: st.DrawFn) -> bytes:
    txid16 = draw(st.binary(min_size=16, max_size=16).filter(lambda b: b[:4] != C.MAGIC))
    body = _attrs_bytes(draw(attrs))
    return _HH.pack(C.BINDING_REQUEST, len(body)) + txid16 + body


tailscale_requests = st.builds(C.build_binding_request, txids)
bare_requests = txids.map(lambda t: C.build_binding_request(t, software=None,
                                                            with_fingerprint=False))
requests = st.one_of(rfc5389_requests(), rfc3489_requests(), tailscale_requests, bare_requests)


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append(data)


def _serve(req: bytes, src: tuple[str, int], strict: bool) -> list[bytes]:
    from nodeagent_derper.metrics import DerperMetrics
    from nodeagent_derper.stun_server import StunProtocol

    proto = StunProtocol(DerperMetrics(CollectorRegistry()), strict=strict)
    tr = _Transport()
    proto.connection_made(tr)  # type: ignore[arg-type]  # duck-typed sendto
    proto.datagram_received(req, src)
    return tr.sent


@given(requests, sources, st.booleans())
def test_reply_never_exceeds_request_by_more_than_the_address_attribute(
        req: bytes, src: tuple[str, int], strict: bool) -> None:
    kind, _ = C.parse_binding_request(req, strict=strict)
    sent = _serve(req, src, strict)
    if not strict:
        assert kind in C.ACCEPTED_KINDS  # generic clients keep working
    assert len(sent) == (1 if kind in C.ACCEPTED_KINDS else 0)
    for reply in sent:
        assert len(reply) <= len(req) + C.mapped_address_attr_len(src[0]), (req.hex(), src)


@given(st.one_of(tailscale_requests, bare_requests), sources)
def test_reply_sizes_of_the_two_reference_requests(req: bytes, src: tuple[str, int]) -> None:
    # Bare header (20 bytes): exactly the rule's limit, 32 or 44 bytes. Tailscale's 40-byte
    # request (SOFTWARE tailnode + FINGERPRINT): the same 32 or 44 bytes.
    (reply,) = _serve(req, src, strict=False)
    a = ipaddress.ip_address(src[0])
    attr = 12 if a.version == 4 or a.ipv4_mapped is not None else 24
    assert C.mapped_address_attr_len(src[0]) == attr
    assert len(req) in (20, 40)
    assert len(reply) == C.HEADER_LEN + attr
