"""Immutable packet filters swapped whole: mutation attempts fail, shields-up is a separate filter
(``Filter.with_shields_up``), and the flow table carries across every swap — in the Filter, in
the TUN Wrapper (``set_filter`` / ``set_shields_up``) and through the DataPlane wired to a real
LocalBackend (a ShieldsUp pref edit and a netmap policy push)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nodeagent.backend import LocalBackend
from nodeagent.dataplane import DataPlane
from nodeagent.engine.core import PeerConfig, PeerState
from nodeagent.filter import (
    ACCEPT,
    DROP_ACL,
    DROP_FRAGMENT,
    DROP_SHIELDS,
    Filter,
    FlowTable,
    Matcher,
    parse_rules,
)
from nodeagent.packet import (
    TCP_SYN,
    TSMP_REASON_ACL,
    TSMP_REASON_SHIELDS,
    Parsed,
    build_tcp,
    build_udp,
    ip_to_int,
    parse_into,
    parse_tsmp_reject,
)
from nodeagent.packet.parsed import PROTO_TSMP
from nodeagent.tailcfg import NetworkMap, Node
from nodeagent.tundev.fake import FakeTun
from nodeagent.tundev.wrapper import Wrapper


def ip(s: str) -> int:
    return ip_to_int(s)[1]


ME, PEER = ip("100.64.0.2"), ip("100.64.0.1")
LOCAL = ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
PEER_KEY = "nodekey:" + "01" * 32
SSH_WIRE = [{"SrcIPs": ["100.64.0.1"],
             "DstPorts": [{"IP": "100.64.0.2", "Ports": {"First": 22, "Last": 22}}]}]
SSH = parse_rules(SSH_WIRE)


def P(pkt: bytes) -> Parsed:
    p = Parsed()
    parse_into(pkt, p)
    return p


def syn_in(dport: int = 22, sport: int = 40000) -> bytes:
    return build_tcp(4, PEER, ME, sport, dport, 1, 0, TCP_SYN)


def udp_out(sport: int = 5000, dport: int = 53) -> bytes:
    return build_udp(4, ME, PEER, sport, dport, b"q")


def udp_reply(sport: int = 53, dport: int = 5000) -> bytes:
    return build_udp(4, PEER, ME, sport, dport, b"a")


# --- the Filter itself -------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "value"), [
    ("shields_up", True), ("drop_fragments", True), ("rules", ()), ("matcher", Matcher([])),
    ("flows", FlowTable()), ("_entries", {}), ("_lru_only", False), ("_hosts4", frozenset()),
    ("_in", []), ("_out", []), ("something_new", 1),
])
def test_filter_attributes_cannot_be_set_or_deleted(name: str, value: object) -> None:
    f = Filter(SSH, LOCAL)
    with pytest.raises(AttributeError, match="immutable"):
        setattr(f, name, value)
    if name != "something_new":
        with pytest.raises(AttributeError, match="immutable"):
            delattr(f, name)
    # Still the same filter, still working.
    assert f.shields_up is False and f.check_in(P(syn_in())) == ACCEPT


def test_filter_rules_are_frozen_and_init_runs_once() -> None:
    f = Filter(list(SSH), LOCAL)
    assert isinstance(f.rules, tuple) and f.rules == tuple(SSH)
    with pytest.raises(AttributeError):
        f.rules.append(SSH[0])  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="immutable"):
        f.__init__([], LOCAL, shields_up=True)  # type: ignore[misc]
    assert f.shields_up is False and f.check_in(P(syn_in())) == ACCEPT


def test_matcher_is_immutable() -> None:
    m = Matcher(SSH)
    for name in ("_v4", "_v6", "rule_count", "table_count", "other"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(m, name, ())
    with pytest.raises(AttributeError, match="immutable"):
        del m._v4
    with pytest.raises(AttributeError, match="immutable"):
        m.__init__([])  # type: ignore[misc]
    assert m.rule_count == 1 and m.match(4, 6, PEER, ME, 22)


def test_with_shields_up_is_a_separate_filter_sharing_state() -> None:
    f = Filter(SSH, LOCAL, drop_fragments=True, flow_capacity=7)
    assert f.with_shields_up(False) is f
    up = f.with_shields_up(True)
    assert up is not f and up.shields_up is True and f.shields_up is False
    assert up.with_shields_up(True) is up
    assert up.flows is f.flows and up.matcher is f.matcher and up.rules is f.rules
    assert up.drop_fragments is True and up.flows.capacity == 7
    # Verdicts: only new inbound connections change fate.
    assert f.check_in(P(syn_in())) == ACCEPT
    assert up.check_in(P(syn_in())) == DROP_SHIELDS
    assert up.check_in(P(syn_in(dport=23))) == DROP_SHIELDS
    # A flow opened through either one admits its reply through the other.
    assert f.check_out(P(udp_out(sport=1))) == ACCEPT
    assert up.check_in(P(udp_reply(dport=1))) == ACCEPT
    assert up.check_out(P(udp_out(sport=2))) == ACCEPT
    assert f.check_in(P(udp_reply(dport=2))) == ACCEPT
    # Counters are shared too: a toggle does not reset them.
    s = up.stats()
    assert s == f.stats()
    assert (s["in_accept"], s["in_shields"], s["out_accept"], s["flows"]) == (3, 2, 2, 2)
    down = up.with_shields_up(False)
    assert down is not f and down.shields_up is False
    assert down.check_in(P(syn_in())) == ACCEPT and down.check_in(P(syn_in(23))) == DROP_ACL


def test_fragment_option_survives_the_shields_swap() -> None:
    import struct

    from nodeagent.packet import build_ipv4

    frag = bytearray(build_ipv4(PEER, ME, 17, bytes(16)))
    struct.pack_into("!H", frag, 6, 185)
    up = Filter([], LOCAL, drop_fragments=True).with_shields_up(True)
    assert up.check_in(P(bytes(frag))) == DROP_FRAGMENT
    assert Filter([], LOCAL).with_shields_up(True).check_in(P(bytes(frag))) == ACCEPT


# --- the Wrapper swaps whole filters -----------------------------------------------------------

class Sink:
    def __init__(self) -> None:
        self.pkts: list[bytes] = []

    def __call__(self, pkts: list[bytes]) -> None:
        self.pkts.extend(pkts)

    def rejects(self) -> list[tuple[int, int]]:
        """(reason byte, rejected destination port) of every TSMP reject sent to peers."""
        out = []
        for pkt in self.pkts:
            p = P(pkt)
            if p.proto == PROTO_TSMP:
                rej = parse_tsmp_reject(pkt, p)
                assert rej is not None
                out.append((rej.reason_byte, rej.dst_port))
        return out


def _wrapper(filt: Filter) -> tuple[Wrapper, FakeTun, Sink, list[tuple[Any, ...]]]:
    tun = FakeTun()
    w = Wrapper(tun, filt)
    sink = Sink()
    w.set_outbound_sink(sink)
    notes: list[tuple[Any, ...]] = []
    w.set_conn_reject_note(lambda *a: notes.append(a))
    return w, tun, sink, notes


def test_wrapper_shields_toggle_swaps_the_object_and_keeps_reject_behaviour() -> None:
    base = Filter(SSH, LOCAL)
    w, tun, sink, notes = _wrapper(base)
    w.from_host([udp_out()])  # a flow opened before shields go up
    w.set_shields_up(True)
    up = w.filter
    assert up is not base and up.shields_up is True and base.shields_up is False
    assert up.flows is base.flows
    w.from_peer([syn_in(), udp_reply()])
    assert tun.written == [udp_reply()]  # the reply still gets in; the new connection does not
    assert sink.rejects() == [(TSMP_REASON_SHIELDS, 22)]
    assert [(n[0], n[7], n[8]) for n in notes] == [("incoming", "shields", "tsmp_sent")]
    assert w.drops_in["shields"] == 1 and w.counters["tsmp_rejects_sent"] == 1
    w.set_shields_up(True)
    assert w.filter is up  # no change, no new object
    w.set_shields_up(False)
    assert w.filter is not up and w.filter.shields_up is False
    w.from_peer([syn_in(), syn_in(dport=23, sport=40001)])
    assert tun.written[-1] == syn_in()
    assert sink.rejects()[-1] == (TSMP_REASON_ACL, 23)
    assert w.drops_in["acl"] == 1


def test_wrapper_policy_swap_keeps_replies_to_earlier_flows() -> None:
    w, tun, _sink, _notes = _wrapper(Filter(SSH, LOCAL))
    w.from_host([udp_out(), build_tcp(4, ME, PEER, 6000, 7000, 1, 0, TCP_SYN)])
    old = w.filter
    w.set_filter(Filter([], LOCAL, flows=old.flows))  # a policy push that allows nothing
    assert w.filter is not old and old.rules == tuple(SSH)
    w.from_peer([udp_reply(), build_tcp(4, PEER, ME, 7000, 6000, 9, 0, TCP_SYN), syn_in()])
    assert tun.written == [udp_reply(), build_tcp(4, PEER, ME, 7000, 6000, 9, 0, TCP_SYN)]
    assert w.drops_in["acl"] == 1


def test_a_batch_is_judged_by_the_filter_it_started_with() -> None:
    """A swap made while a batch is being judged applies from the next batch on."""
    base = Filter(SSH, LOCAL)
    w, tun, _sink, _notes = _wrapper(base)
    swapped = []

    def tap(p: Parsed) -> None:  # runs inside from_peer, after the first SYN is accepted
        if not swapped:
            w.set_shields_up(True)
            swapped.append(True)

    w.inbound_tap = tap
    w.from_peer([syn_in(sport=1), syn_in(sport=2)])
    assert len(tun.written) == 2 and w.filter.shields_up is True
    w.from_peer([syn_in(sport=3)])
    assert len(tun.written) == 2 and w.drops_in["shields"] == 1


# --- DataPlane + LocalBackend: the pref and the netmap both swap -------------------------------

class StubTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []
        self.configured: list[str] = []

    def send(self, peer_key: str, pkts: list[bytes]) -> None:
        self.sent.append((peer_key, list(pkts)))

    def configure(self, peers: list[PeerConfig]) -> None:
        self.configured = [p.key for p in peers]

    def peer_state(self, peer_key: str) -> PeerState:
        return PeerState(configured=peer_key in self.configured, reachable=True)


def _netmap(rules: list[dict[str, Any]]) -> NetworkMap:
    return NetworkMap(SelfNode=Node(Key="nodekey:" + "02" * 32, Addresses=["100.64.0.2/32"]),
                      Peers=[Node(Key=PEER_KEY, HostName="peer", Addresses=["100.64.0.1/32"])],
                      PacketFilter=rules)


@pytest.mark.asyncio
async def test_dataplane_swaps_on_prefs_and_policy_and_keeps_flows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.tundev import netconf

    monkeypatch.setattr(netconf, "add_address", lambda *a, **k: None)
    monkeypatch.setattr(netconf, "del_address", lambda *a, **k: None)
    backend = LocalBackend(tmp_path, features=[])
    transport = StubTransport()
    tun = FakeTun()
    dp = DataPlane(backend, transport, tun_name=tun.name, tun=tun)
    dp.start(asyncio.get_running_loop())
    try:
        assert dp.wrapper is not None and dp.engine is not None
        dp.apply_netmap(_netmap(SSH_WIRE))
        first = dp.filter
        assert first is dp.wrapper.filter and first is not None and first.shields_up is False

        tun.inject([udp_out(sport=1)])  # the host opens a UDP flow to the peer
        assert [k for k, _ in transport.sent] == [PEER_KEY]

        backend.edit_prefs({"ShieldsUpSet": True, "ShieldsUp": True})
        up = dp.filter
        assert up is not first and up is not None and up.shields_up is True
        assert first.shields_up is False  # the old object was not touched

        dp.apply_netmap(_netmap([]))  # policy push while shields are up: still up
        pushed = dp.filter
        assert pushed is not up and pushed is not None and pushed.shields_up is True
        assert pushed.flows is first.flows and pushed.rules == ()

        dp.engine.deliver_from(PEER_KEY, [udp_reply(dport=1), syn_in()])
        assert tun.written == [udp_reply(dport=1)]  # the reply to the earlier flow gets in
        assert dp.wrapper.drops_in["shields"] == 1

        backend.edit_prefs({"ShieldsUpSet": True, "ShieldsUp": False})
        down = dp.filter
        assert down is not pushed and down is not None and down.shields_up is False
        dp.engine.deliver_from(PEER_KEY, [syn_in(sport=40001), udp_reply(dport=1)])
        assert tun.written == [udp_reply(dport=1)] * 2  # no rules now: the SYN is refused
        assert dp.wrapper.drops_in["acl"] == 1
    finally:
        dp.close()
