"""Unit tests for nodeagent.filter.Filter: inbound ACL verdicts and outbound flow tracking."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from nodeagent.filter import (
    ACCEPT,
    DROP_ACL,
    DROP_FRAGMENT,
    DROP_INVALID,
    DROP_NOT_LOCAL,
    DROP_SHIELDS,
    Filter,
    FlowTable,
    parse_rules,
)
from nodeagent.packet import (
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    TCP_RST,
    TCP_SYN,
    Parsed,
    build_icmp,
    build_icmp_echo,
    build_ip,
    build_ipv4,
    build_ipv6,
    build_tcp,
    build_tsmp_ping,
    build_udp,
    ip_to_int,
    parse_into,
)


def ip(s: str) -> int:
    return ip_to_int(s)[1]


ME4, ME6 = ip("100.64.0.2"), ip("fd7a:115c:a1e0::2")
PEER4, PEER6 = ip("100.64.0.1"), ip("fd7a:115c:a1e0::1")
OTHER4, OTHER6 = ip("100.100.9.9"), ip("fd7a:115c:a1e0::99")
LOCAL = ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]


def P(pkt: bytes) -> Parsed:
    p = Parsed()
    parse_into(pkt, p)
    return p


def syn(v: int, src: int, dst: int, sport: int = 40000, dport: int = 22) -> Parsed:
    return P(build_tcp(v, src, dst, sport, dport, 1, 0, TCP_SYN))


def udp(v: int, src: int, dst: int, sport: int = 40000, dport: int = 53) -> Parsed:
    return P(build_udp(v, src, dst, sport, dport, b"q"))


def rule(src: list[str], dsts: list[tuple[str, int, int]], protos: list[Any] | None = None
         ) -> dict[str, Any]:
    r: dict[str, Any] = {"SrcIPs": src, "DstPorts": [
        {"IP": d, "Ports": {"First": lo, "Last": hi}} for d, lo, hi in dsts]}
    if protos is not None:
        r["IPProto"] = protos
    return r


def filt(*rules: dict[str, Any], **kw: Any) -> Filter:
    return Filter(parse_rules(list(rules)), LOCAL, **kw)


SSH = rule(["100.64.0.1", "fd7a:115c:a1e0::1"],
           [("100.64.0.2", 22, 22), ("fd7a:115c:a1e0::2", 22, 22)])


@pytest.mark.parametrize(("v", "src", "dst"), [(4, PEER4, ME4), (6, PEER6, ME6)])
def test_rule_allows_syn_only_from_listed_source_and_port(v: int, src: int, dst: int) -> None:
    f = filt(SSH)
    assert f.check_in(syn(v, src, dst, dport=22)) == ACCEPT
    assert f.check_in(syn(v, src, dst, dport=23)) == DROP_ACL
    stranger = OTHER4 if v == 4 else OTHER6
    assert f.check_in(syn(v, stranger, dst, dport=22)) == DROP_ACL
    assert f.check_in(udp(v, src, dst, dport=22)) == ACCEPT  # default protos include UDP


def test_port_ranges_inclusive() -> None:
    f = filt(rule(["*"], [("*", 8000, 8010)]))
    assert [f.check_in(syn(4, PEER4, ME4, dport=d)) for d in (7999, 8000, 8005, 8010, 8011)] == [
        DROP_ACL, ACCEPT, ACCEPT, ACCEPT, DROP_ACL]


def test_multiple_ranges_and_rules_combine() -> None:
    f = filt(rule(["100.64.0.1"], [("100.64.0.2", 22, 22)]),
             rule(["100.64.0.1"], [("100.64.0.2", 80, 81), ("100.64.0.2", 443, 443)]),
             rule(["100.64.0.0/10"], [("100.64.0.0/24", 9000, 9000)]))
    for port, want in ((22, ACCEPT), (80, ACCEPT), (81, ACCEPT), (82, DROP_ACL), (443, ACCEPT),
                       (9000, ACCEPT)):
        assert f.check_in(syn(4, PEER4, ME4, dport=port)) == want, port
    assert f.check_in(syn(4, OTHER4, ME4, dport=9000)) == ACCEPT
    assert f.check_in(syn(4, OTHER4, ME4, dport=22)) == DROP_ACL


def test_source_and_destination_pair_within_one_rule() -> None:
    # PEER may reach port 22; OTHER may reach port 80; neither gets the other's port.
    f = filt(rule(["100.64.0.1"], [("100.64.0.2", 22, 22)]),
             rule(["100.100.9.9"], [("100.64.0.2", 80, 80)]))
    assert f.check_in(syn(4, PEER4, ME4, dport=80)) == DROP_ACL
    assert f.check_in(syn(4, OTHER4, ME4, dport=22)) == DROP_ACL
    assert f.check_in(syn(4, OTHER4, ME4, dport=80)) == ACCEPT


def test_star_covers_both_families() -> None:
    f = filt(rule(["*"], [("*", 22, 22)]))
    assert f.check_in(syn(4, OTHER4, ME4)) == ACCEPT
    assert f.check_in(syn(6, OTHER6, ME6)) == ACCEPT


def test_families_do_not_cross() -> None:
    f = filt(rule(["100.64.0.1"], [("fd7a:115c:a1e0::2", 22, 22)]),
             rule(["fd7a:115c:a1e0::1"], [("100.64.0.2", 22, 22)]))
    assert f.check_in(syn(4, PEER4, ME4)) == DROP_ACL
    assert f.check_in(syn(6, PEER6, ME6)) == DROP_ACL


def test_proto_list_restricts() -> None:
    f = filt(rule(["*"], [("*", 53, 53)], protos=[17]))
    assert f.check_in(udp(4, PEER4, ME4, dport=53)) == ACCEPT
    assert f.check_in(syn(4, PEER4, ME4, dport=53)) == DROP_ACL
    assert f.check_in(P(build_icmp_echo(4, PEER4, ME4, 1, 1))) == DROP_ACL


def test_icmp_echo_request_matches_by_address_ignoring_ports() -> None:
    f = filt(rule(["100.64.0.1", "fd7a:115c:a1e0::1"],
                  [("100.64.0.2", 22, 22), ("fd7a:115c:a1e0::2", 22, 22)]))
    assert f.check_in(P(build_icmp_echo(4, PEER4, ME4, 7, 1))) == ACCEPT
    assert f.check_in(P(build_icmp_echo(6, PEER6, ME6, 7, 1))) == ACCEPT
    assert f.check_in(P(build_icmp_echo(4, OTHER4, ME4, 7, 1))) == DROP_ACL
    assert f.check_in(P(build_icmp_echo(6, OTHER6, ME6, 7, 1))) == DROP_ACL
    # Other non-response ICMP types are judged like requests (timestamp request, v4 type 13).
    assert f.check_in(P(build_icmp(4, OTHER4, ME4, 13, 0))) == DROP_ACL
    assert f.check_in(P(build_icmp(4, PEER4, ME4, 13, 0))) == ACCEPT


def test_icmp_requires_icmp_in_proto_list() -> None:
    f = filt(rule(["*"], [("*", 0, 65535)], protos=[6]))
    assert f.check_in(P(build_icmp_echo(4, PEER4, ME4, 7, 1))) == DROP_ACL
    assert f.check_in(P(build_icmp_echo(6, PEER6, ME6, 7, 1))) == DROP_ACL


@pytest.mark.parametrize(("v", "src", "dst", "types"), [
    (4, OTHER4, ME4, (0, 3, 11, 12)), (6, OTHER6, ME6, (1, 2, 3, 4, 129))])
def test_icmp_responses_accepted_without_rules_even_with_shields(
        v: int, src: int, dst: int, types: tuple[int, ...]) -> None:
    f = filt(shields_up=True)
    for t in types:
        assert f.check_in(P(build_icmp(v, src, dst, t, 0))) == ACCEPT, t
    assert f.check_in(P(build_icmp_echo(v, src, dst, 1, 1, reply=True))) == ACCEPT
    assert f.check_in(P(build_icmp_echo(v, src, dst, 1, 1))) == DROP_SHIELDS


@pytest.mark.parametrize("flags", [TCP_ACK, TCP_ACK | TCP_PSH, TCP_SYN | TCP_ACK, TCP_RST,
                                   TCP_FIN | TCP_ACK, 0])
def test_tcp_non_syn_accepted_without_rules_or_with_shields(flags: int) -> None:
    for shields in (False, True):
        f = filt(shields_up=shields)
        assert f.check_in(P(build_tcp(4, OTHER4, ME4, 1, 2, 1, 1, flags))) == ACCEPT
        assert f.check_in(P(build_tcp(6, OTHER6, ME6, 1, 2, 1, 1, flags))) == ACCEPT


def test_tcp_syn_with_other_flags_is_still_a_new_connection() -> None:
    f = filt()
    assert f.check_in(P(build_tcp(4, PEER4, ME4, 1, 2, 1, 0, TCP_SYN | 0x40 | 0x80))) == DROP_ACL


def test_not_local_destination_dropped_first() -> None:
    f = filt(rule(["*"], [("*", 0, 65535)]))
    assert f.check_in(syn(4, PEER4, OTHER4)) == DROP_NOT_LOCAL
    assert f.check_in(syn(6, PEER6, OTHER6)) == DROP_NOT_LOCAL
    # Even replies and non-SYN TCP must be for us.
    assert f.check_in(P(build_tcp(4, PEER4, OTHER4, 1, 2, 1, 1, TCP_ACK))) == DROP_NOT_LOCAL
    assert f.check_in(P(build_icmp_echo(4, PEER4, OTHER4, 1, 1, reply=True))) == DROP_NOT_LOCAL


def test_local_prefixes_may_be_subnets() -> None:
    f = Filter(parse_rules([rule(["*"], [("*", 22, 22)])]),
               ["100.64.0.2", "10.1.0.0/16", "fd00:1::/64"])
    assert f.check_in(syn(4, PEER4, ME4)) == ACCEPT
    assert f.check_in(syn(4, PEER4, ip("10.1.200.3"))) == ACCEPT
    assert f.check_in(syn(4, PEER4, ip("10.2.0.1"))) == DROP_NOT_LOCAL
    assert f.check_in(syn(6, PEER6, ip("fd00:1::77"))) == ACCEPT
    assert f.check_in(syn(6, PEER6, ip("fd00:2::77"))) == DROP_NOT_LOCAL


def test_bad_local_prefix() -> None:
    with pytest.raises(ValueError, match="local prefix: bad prefix 'nope'"):
        Filter([], ["nope"])


def test_invalid_parsed_dropped() -> None:
    f = filt(rule(["*"], [("*", 0, 65535)]))
    bad = P(b"\x45\x00")
    assert f.check_in(bad) == DROP_INVALID
    assert f.check_out(bad) == DROP_INVALID
    assert f.check_in(P(b"\x50" + bytes(30))) == DROP_INVALID  # IP version 5: UNKNOWN


def _v4_fragment(src: int, dst: int) -> bytes:
    pkt = bytearray(build_ipv4(src, dst, 17, bytes(16)))
    struct.pack_into("!H", pkt, 6, 185)  # fragment offset 185 * 8: a non-first fragment
    return bytes(pkt)


def _v6_fragment(src: int, dst: int) -> bytes:
    frag = struct.pack("!BBHI", 17, 0, 185 << 3, 0x1234) + bytes(16)
    return build_ipv6(src, dst, 44, frag)


def test_non_first_fragments_accepted_even_with_shields() -> None:
    for shields in (False, True):
        f = filt(shields_up=shields)
        p4 = P(_v4_fragment(OTHER4, ME4))
        assert p4.is_fragment
        assert f.check_in(p4) == ACCEPT
        assert f.check_in(P(_v6_fragment(OTHER6, ME6))) == ACCEPT
    f = filt()
    assert f.check_in(P(_v4_fragment(OTHER4, OTHER4))) == DROP_NOT_LOCAL


def test_drop_fragments_option() -> None:
    f = filt(rule(["*"], [("*", 0, 65535)]), drop_fragments=True)
    assert f.check_in(P(_v4_fragment(PEER4, ME4))) == DROP_FRAGMENT
    assert f.check_in(P(_v6_fragment(PEER6, ME6))) == DROP_FRAGMENT


def test_tsmp_accepted() -> None:
    f = filt(shields_up=True)
    assert f.check_in(P(build_tsmp_ping(4, OTHER4, ME4, bytes(8)))) == ACCEPT


def test_other_protocols_need_explicit_proto_and_all_ports() -> None:
    gre = P(build_ip(4, PEER4, ME4, 47, bytes(8)))
    assert filt(rule(["*"], [("*", 0, 65535)])).check_in(gre) == DROP_ACL  # not in defaults
    assert filt(rule(["*"], [("*", 0, 100)], protos=[47])).check_in(gre) == DROP_ACL
    assert filt(rule(["*"], [("*", 0, 65535)], protos=[47])).check_in(gre) == ACCEPT
    assert filt(rule(["*"], [("*", 0, 65535)], protos=["gre"]), shields_up=True
                ).check_in(gre) == DROP_SHIELDS


def test_shields_up_drops_new_flows_and_has_a_shields_down_twin() -> None:
    f = filt(SSH, shields_up=True)
    assert f.shields_up is True
    assert f.check_in(syn(4, PEER4, ME4)) == DROP_SHIELDS
    assert f.check_in(udp(6, PEER6, ME6, dport=22)) == DROP_SHIELDS
    assert f.check_in(syn(4, OTHER4, ME4)) == DROP_SHIELDS  # shields, not acl, is the reason
    down = f.with_shields_up(False)
    assert down is not f and down.shields_up is False and f.shields_up is True
    assert down.check_in(syn(4, PEER4, ME4)) == ACCEPT
    assert down.check_in(syn(4, OTHER4, ME4)) == DROP_ACL
    assert f.check_in(syn(4, PEER4, ME4)) == DROP_SHIELDS  # the original is unchanged


@pytest.mark.parametrize(("v", "me", "peer"), [(4, ME4, PEER4), (6, ME6, PEER6)])
def test_udp_reply_to_our_flow_accepted_without_rules_and_with_shields(
        v: int, me: int, peer: int) -> None:
    f = filt(shields_up=True)
    reply = udp(v, peer, me, sport=53, dport=40000)
    assert f.check_in(reply) == DROP_SHIELDS
    assert f.check_out(udp(v, me, peer, sport=40000, dport=53)) == ACCEPT
    assert f.check_in(reply) == ACCEPT
    # Only the exact reversed tuple: another source port or peer is still new.
    assert f.check_in(udp(v, peer, me, sport=54, dport=40000)) == DROP_SHIELDS
    assert f.with_shields_up(False).check_in(udp(v, peer, me, sport=54, dport=40000)) == DROP_ACL


def test_tcp_simultaneous_open_reply_accepted() -> None:
    f = filt()
    assert f.check_out(syn(4, ME4, PEER4, sport=5000, dport=6000)) == ACCEPT
    assert f.check_in(syn(4, PEER4, ME4, sport=6000, dport=5000)) == ACCEPT
    assert f.check_in(syn(4, PEER4, ME4, sport=6000, dport=5001)) == DROP_ACL


def test_outbound_tcp_data_does_not_fill_flow_table() -> None:
    f = filt()
    f.check_out(P(build_tcp(4, ME4, PEER4, 5000, 6000, 1, 1, TCP_ACK | TCP_PSH)))
    f.check_out(P(build_tcp(4, ME4, PEER4, 5000, 6000, 1, 1, TCP_SYN | TCP_ACK)))
    assert len(f.flows) == 0
    f.check_out(syn(4, ME4, PEER4, sport=5000, dport=6000))
    assert len(f.flows) == 1


def test_outbound_applies_no_acl_and_accepts_anything_valid() -> None:
    f = filt(shields_up=True)
    for p in (syn(4, ME4, OTHER4), udp(6, ME6, OTHER6), P(build_icmp_echo(4, ME4, OTHER4, 1, 1)),
              P(build_ip(4, ME4, OTHER4, 47, bytes(4))), P(_v4_fragment(ME4, OTHER4))):
        assert f.check_out(p) == ACCEPT


def test_families_do_not_share_flows() -> None:
    f = filt()
    # An IPv4 flow must not admit an IPv6 packet whose addresses have the same integer values.
    f.check_out(udp(4, ME4, PEER4, sport=1000, dport=2000))
    local6 = Filter([], [f"::{ME4 >> 16:x}:{ME4 & 0xFFFF:x}/128"], flows=f.flows)
    p6 = udp(6, PEER4, ME4, sport=2000, dport=1000)
    assert p6.dst_ip == ME4
    assert local6.check_in(p6) == DROP_ACL
    assert f.check_in(udp(4, PEER4, ME4, sport=2000, dport=1000)) == ACCEPT


def test_flow_lru_bound_enforced() -> None:
    f = filt(flow_capacity=3)
    for port in (1, 2, 3):
        f.check_out(udp(4, ME4, PEER4, sport=port, dport=53))
    # Refresh flow 1 by an inbound reply, so flow 2 is now the least recent.
    assert f.check_in(udp(4, PEER4, ME4, sport=53, dport=1)) == ACCEPT
    f.check_out(udp(4, ME4, PEER4, sport=4, dport=53))
    assert len(f.flows) == 3
    got = {port: f.check_in(udp(4, PEER4, ME4, sport=53, dport=port)) for port in (1, 2, 3, 4)}
    assert got == {1: ACCEPT, 2: DROP_ACL, 3: ACCEPT, 4: ACCEPT}
    assert f.stats()["flow_evictions"] == 1
    for port in range(100, 200):
        f.check_out(udp(4, ME4, PEER4, sport=port, dport=53))
    assert len(f.flows) == 3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_flow_ttl_expires_idle_flows() -> None:
    clock = FakeClock()
    f = filt(flow_ttl=30.0, clock=clock)
    f.check_out(udp(4, ME4, PEER4, sport=1, dport=53))
    reply = udp(4, PEER4, ME4, sport=53, dport=1)
    clock.now += 20
    assert f.check_in(reply) == ACCEPT  # refreshes the flow
    clock.now += 29
    assert f.check_in(reply) == ACCEPT
    clock.now += 31
    assert f.check_in(reply) == DROP_ACL
    assert len(f.flows) == 0


def test_flow_table_shared_across_rule_updates() -> None:
    old = filt()
    old.check_out(udp(4, ME4, PEER4, sport=1, dport=53))
    new = filt(SSH, flows=old.flows)
    assert new.check_in(udp(4, PEER4, ME4, sport=53, dport=1)) == ACCEPT


def test_flow_table_validates_arguments() -> None:
    with pytest.raises(ValueError):
        FlowTable(0)
    with pytest.raises(ValueError):
        FlowTable(10, ttl=0)


def test_stats_count_verdicts() -> None:
    f = filt(SSH)
    f.check_in(syn(4, PEER4, ME4))
    f.check_in(syn(4, OTHER4, ME4))
    f.check_in(syn(4, PEER4, OTHER4))
    f.check_in(P(b""))
    f.check_out(udp(4, ME4, PEER4))
    f = f.with_shields_up(True)  # the shields twin shares the counters: toggling keeps them
    f.check_in(syn(4, PEER4, ME4))
    s = f.stats()
    assert s["in_accept"] == 1 and s["in_acl"] == 1 and s["in_not_local"] == 1
    assert s["in_invalid"] == 1 and s["in_shields"] == 1 and s["in_fragment"] == 0
    assert s["out_accept"] == 1 and s["flows"] == 1
