"""Pending-open tracking: what starts and ends a pending open, and how a timeout is diagnosed."""

from __future__ import annotations

import logging

import pytest

from nodeagent.engine.pendopen import PeerInfo, PendingOpens
from nodeagent.packet import TSMP_REASON_ACL, TSMPReject, build_tcp, ip_to_int, parse_into
from nodeagent.packet.parsed import TCP_ACK, TCP_RST, TCP_SYN, Parsed

A = ip_to_int("100.64.0.1")[1]
B = ip_to_int("100.64.0.2")[1]
A6 = ip_to_int("fd7a:115c:a1e0::1")[1]
B6 = ip_to_int("fd7a:115c:a1e0::2")[1]


def parsed(pkt: bytes) -> Parsed:
    p = Parsed()
    parse_into(pkt, p)
    return p


def syn(v: int = 4, sport: int = 5000, dport: int = 22, seq: int = 1000) -> tuple[Parsed, bytes]:
    src, dst = (A, B) if v == 4 else (A6, B6)
    pkt = build_tcp(v, src, dst, sport, dport, seq, 0, TCP_SYN)
    return parsed(pkt), pkt


def reply(flags: int, v: int = 4, sport: int = 5000, dport: int = 22) -> Parsed:
    src, dst = (A, B) if v == 4 else (A6, B6)
    return parsed(build_tcp(v, dst, src, dport, sport, 1, 1001, flags))


def table(peer: PeerInfo | None = None, **kw: float) -> PendingOpens:
    return PendingOpens(lambda v, ip: peer, **kw)


def test_syn_tracked_once_and_reply_ends_it() -> None:
    po = table(PeerInfo("b"))
    p, pkt = syn(seq=1234)
    po.on_outbound(p, pkt, now=0.0)
    po.on_outbound(p, pkt, now=1.0)  # retransmission keeps the first timer
    assert len(po) == 1
    (flow,) = po.flows.values()
    assert flow.deadline == 5.0 and flow.syn_seq == 1234
    po.on_inbound(reply(TCP_SYN | TCP_ACK))
    assert len(po) == 0
    po.on_outbound(p, pkt, now=2.0)
    po.on_inbound(reply(TCP_RST | TCP_ACK))
    assert len(po) == 0


def test_only_new_outgoing_syns_are_tracked() -> None:
    po = table()
    for flags in (TCP_ACK, TCP_SYN | TCP_ACK, TCP_RST):
        pkt = build_tcp(4, A, B, 1, 2, 0, 0, flags)
        po.on_outbound(parsed(pkt), pkt, 0.0)
    assert len(po) == 0


def test_unrelated_inbound_packet_keeps_flow() -> None:
    po = table()
    p, pkt = syn()
    po.on_outbound(p, pkt, 0.0)
    po.on_inbound(reply(TCP_SYN | TCP_ACK, dport=23))
    po.on_inbound(reply(TCP_ACK))  # a bare ACK is not an answer to a SYN
    assert len(po) == 1


@pytest.mark.parametrize("v", [4, 6])
def test_terminal_reject_ends_flow(v: int, caplog: pytest.LogCaptureFixture) -> None:
    po = table(PeerInfo("b"))
    p, pkt = syn(v)
    po.on_outbound(p, pkt, 0.0)
    src, dst = (A, B) if v == 4 else (A6, B6)
    caplog.set_level(logging.INFO, "nodeagent.pendopen")
    flow = po.on_tsmp_reject(TSMPReject(v, 6, TSMP_REASON_ACL, src, dst, 5000, 22))
    assert flow is not None and flow.syn_seq == 1000 and len(po) == 0
    assert "rejected due to acl" in caplog.text
    assert po.expire(100.0) == []


def test_reject_kept_pending_reports_peer_reason_at_timeout() -> None:
    po = table(PeerInfo("b"))
    p, pkt = syn()
    po.on_outbound(p, pkt, 0.0)
    assert po.on_tsmp_reject(TSMPReject(4, 6, TSMP_REASON_ACL, A, B, 5000, 22),
                             ends_flow=False) is None
    assert po.expire(4.9) == []
    (d,) = po.expire(5.0)
    assert (d.reason, d.source) == ("acl", "tsmp_recv")


def test_maybe_broken_records_problem() -> None:
    po = table(PeerInfo("b"))
    p, pkt = syn()
    po.on_outbound(p, pkt, 0.0)
    assert po.on_tsmp_reject(TSMPReject(4, 6, ord("W"), A, B, 5000, 22, maybe_broken=True)) is None
    (d,) = po.expire(6.0)
    assert (d.reason, d.source) == ("host-firewall", "tsmp_recv")


@pytest.mark.parametrize(
    ("peer", "reason"),
    [
        (None, "no-peer"),
        (PeerInfo("b", has_disco_key=False), "peer-unreachable"),
        (PeerInfo("b", in_wireguard=False), "peer-unreachable"),
        (PeerInfo("b", in_wireguard=False, only_default_route=True), None),
        (PeerInfo("b", reachable=False), "peer-unreachable"),
        (PeerInfo("b", reachable=False, home_derp=1), "peer-unreachable"),
        (PeerInfo("b"), "timeout"),
    ],
)
def test_timeout_classification(peer: PeerInfo | None, reason: str | None,
                                 caplog: pytest.LogCaptureFixture) -> None:
    po = table(peer)
    p, pkt = syn()
    po.on_outbound(p, pkt, 0.0)
    caplog.set_level(logging.INFO, "nodeagent.pendopen")
    out = po.expire(5.0)
    assert len(po) == 0 and po.timeouts == 1
    if reason is None:
        assert out == [] and "timeout opening" not in caplog.text
    else:
        (d,) = out
        assert (d.reason, d.source) == (reason, "pendopen_timeout")
        assert d.flow.dst == "100.64.0.2:22"
        assert caplog.text.count("timeout opening") == 1


def test_bounded_under_syn_flood() -> None:
    po = table(capacity=100)
    for port in range(1000, 6000):
        p, pkt = syn(sport=port)
        po.on_outbound(p, pkt, 0.0)
    assert len(po) == 100 and po.evicted == 4900
    assert min(f.key[2] for f in po.flows.values()) == 5900  # the oldest went first


def test_expiry_in_deadline_order() -> None:
    po = table(PeerInfo("b"))
    for i, port in enumerate((1, 2, 3)):
        p, pkt = syn(sport=port)
        po.on_outbound(p, pkt, float(i))
    assert po.next_deadline() == 5.0
    assert [d.flow.key[2] for d in po.expire(6.5)] == [1, 2]
    assert po.next_deadline() == 7.0
