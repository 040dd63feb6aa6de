"""Property tests for nodeagent.filter: the compiled matcher agrees with a naive linear scan,
``parse_rules`` raises only FilterRuleError on arbitrary JSON-like input, and the wire rendering
round-trips."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.filter import (
    ACCEPT,
    DROP_ACL,
    Filter,
    FilterRule,
    FilterRuleError,
    Matcher,
    NetPortRange,
    naive_match,
    parse_rules,
    rules_to_wire,
)
from nodeagent.packet import TCP_SYN, Parsed, build_ip, build_tcp, build_udp, parse_into

# A small address space so random prefixes and random packets actually collide.
V4_BASE = int(ipaddress.IPv4Address("100.64.0.0"))
V6_BASE = int(ipaddress.IPv6Address("fd7a:115c:a1e0::"))
PROTOS = [1, 6, 17, 47, 58, 132]
PORTS = st.integers(0, 40) | st.sampled_from([0, 22, 80, 443, 65535])


@st.composite
def addrs(draw: st.DrawFn, version: int) -> int:
    if version == 4:
        return V4_BASE | draw(st.integers(0, 0xFF)) << 8 | draw(st.integers(0, 3))
    return V6_BASE | draw(st.integers(0, 0xFF)) << 16 | draw(st.integers(0, 3))


@st.composite
def nets(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    version = draw(st.sampled_from([4, 6]))
    a = draw(addrs(version))
    if version == 4:
        plen = draw(st.sampled_from([0, 8, 10, 16, 23, 24, 30, 31, 32]))
        return ipaddress.IPv4Network((a, plen), strict=False)
    plen = draw(st.sampled_from([0, 48, 64, 100, 112, 126, 127, 128]))
    return ipaddress.IPv6Network((a, plen), strict=False)


@st.composite
def port_ranges(draw: st.DrawFn) -> tuple[int, int]:
    if draw(st.booleans()):
        return (0, 65535)
    a, b = draw(PORTS), draw(PORTS)
    return (min(a, b), max(a, b))


@st.composite
def filter_rules(draw: st.DrawFn) -> FilterRule:
    srcs = tuple(draw(st.lists(nets(), max_size=4)))
    dsts = tuple(NetPortRange(n, *draw(port_ranges())) for n in draw(st.lists(nets(), max_size=4)))
    protos = tuple(draw(st.lists(st.sampled_from(PROTOS), max_size=3, unique=True)))
    return FilterRule(srcs, dsts, protos)


@st.composite
def packets(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    version = draw(st.sampled_from([4, 6]))
    return (version, draw(st.sampled_from(PROTOS)), draw(addrs(version)), draw(addrs(version)),
            draw(PORTS))


@settings(max_examples=400, deadline=None)
@given(st.lists(filter_rules(), max_size=12), st.lists(packets(), min_size=1, max_size=20))
def test_compiled_matcher_agrees_with_naive(rules: list[FilterRule],
                                            pkts: list[tuple[int, int, int, int, int]]) -> None:
    m = Matcher(rules)
    for pkt in pkts:
        assert m.match(*pkt) == naive_match(rules, *pkt), pkt


@settings(max_examples=200, deadline=None)
@given(st.lists(filter_rules(), max_size=8), st.lists(packets(), min_size=1, max_size=10))
def test_filter_new_flow_verdict_is_naive_match(
        rules: list[FilterRule], pkts: list[tuple[int, int, int, int, int]]) -> None:
    """End to end through built packets: a new flow is accepted exactly when a rule allows it."""
    p = Parsed()
    local = [f"{ipaddress.ip_address(d)}" for _, _, _, d, _ in pkts]
    f = Filter(rules, local)
    for version, proto, src, dst, port in pkts:
        if proto == 6:
            pkt = build_tcp(version, src, dst, 1234, port, 1, 0, TCP_SYN)
        elif proto == 17:
            pkt = build_udp(version, src, dst, 1234, port)
        elif proto in (1, 58):
            # An echo request of the packet's own family; ICMP in the other family's header is
            # not what a peer sends.
            proto = 58 if version == 6 else 1
            t = 128 if version == 6 else 8
            pkt = build_ip(version, src, dst, proto, bytes([t, 0, 0, 0, 0, 0, 0, 0]))
            port = 0
        else:
            pkt = build_ip(version, src, dst, proto, bytes(12))
        parse_into(pkt, p)
        want = ACCEPT if naive_match(rules, version, proto, src, dst, p.dst_port) else DROP_ACL
        assert f.check_in(p) == want


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(["*", "100.64.0.1", "10.0.0.0/8", "fd7a::/48",
                                              "1.2.3.4-1.2.3.9", "tcp", "6", "::1%eth0"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["SrcIPs", "DstPorts", "IPProto", "IP", "Ports", "First",
                                       "Last", "CapGrant", "x"]), inner, max_size=5),
    max_leaves=30,
)


@st.composite
def rule_shaped(draw: st.DrawFn) -> Any:
    """Mostly well-shaped rules with random leaves, so the deep fields get exercised."""
    def entry() -> Any:
        return draw(st.one_of(JSONISH, st.fixed_dictionaries(
            {"IP": JSONISH, "Ports": st.one_of(JSONISH, st.fixed_dictionaries(
                {"First": JSONISH, "Last": JSONISH}))})))
    return [
        {"SrcIPs": draw(st.one_of(JSONISH, st.lists(JSONISH, max_size=3))),
         "DstPorts": [entry() for _ in range(draw(st.integers(0, 3)))],
         "IPProto": draw(st.one_of(JSONISH, st.lists(JSONISH, max_size=3)))}
        for _ in range(draw(st.integers(0, 3)))
    ]


@settings(max_examples=500, deadline=None)
@given(st.one_of(JSONISH, rule_shaped()))
def test_parse_rules_raises_only_filter_rule_error(obj: Any) -> None:
    try:
        rules = parse_rules(obj)
    except FilterRuleError as e:
        msg = str(e)
        assert msg.startswith(("rule ", "rules: ")) and "\n" not in msg
        return
    assert parse_rules(rules_to_wire(rules)) == rules
    Matcher(rules)  # whatever parses also compiles


@settings(max_examples=200, deadline=None)
@given(st.lists(filter_rules(), max_size=6))
def test_wire_round_trip(rules: list[FilterRule]) -> None:
    wire = rules_to_wire(rules)
    back = parse_rules(wire)
    # Parsing dedupes repeated prefixes/entries; compare against the deduplicated form.
    want = [FilterRule(tuple(dict.fromkeys(r.srcs)), tuple(dict.fromkeys(r.dsts)), r.protos)
            for r in rules]
    assert back == want


# --- immutable filters swapped whole -------------------------------------------------------

ME4 = V4_BASE | 2
FLOW_PORTS = st.integers(1, 4)  # few ports, so replies hit flows opened earlier


@st.composite
def traffic(draw: st.DrawFn) -> tuple[str, bytes]:
    """("out", host → peer) or ("in", peer → host): UDP or TCP SYN on a small port space."""
    direction = draw(st.sampled_from(["out", "in"]))
    peer = V4_BASE | draw(st.integers(0, 2))
    sport, dport = draw(FLOW_PORTS), draw(FLOW_PORTS)
    src, dst = (ME4, peer) if direction == "out" else (peer, ME4)
    if draw(st.booleans()):
        return direction, build_udp(4, src, dst, sport, dport)
    return direction, build_tcp(4, src, dst, sport, dport, 1, 0, TCP_SYN)


def _run(f: Filter, pkts: list[tuple[str, bytes]]) -> list[int]:
    p = Parsed()
    out = []
    for direction, pkt in pkts:
        parse_into(pkt, p)
        out.append(f.check_out(p) if direction == "out" else f.check_in(p))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(filter_rules(), max_size=6), st.booleans(), st.lists(traffic(), max_size=30))
def test_shields_twin_is_indistinguishable_from_a_filter_built_that_way(
        rules: list[FilterRule], shields: bool, pkts: list[tuple[str, bytes]]) -> None:
    local = [f"{ipaddress.ip_address(ME4)}/32"]
    built = Filter(rules, local, shields_up=shields, flow_capacity=5)
    twin = Filter(rules, local, shields_up=not shields, flow_capacity=5).with_shields_up(shields)
    assert twin.shields_up is shields
    assert _run(built, pkts) == _run(twin, pkts)
    assert list(built.flows.entries) == list(twin.flows.entries)
    assert built.stats() == twin.stats()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(
    st.lists(traffic(), max_size=8),
    st.one_of(st.none(), st.booleans(), st.lists(filter_rules(), max_size=4)),
), max_size=8))
def test_replies_to_earlier_flows_pass_across_every_swap(
        steps: list[tuple[list[tuple[str, bytes]], bool | list[FilterRule] | None]]) -> None:
    """Traffic, then a swap (None: none; a bool: shields-up toggled; rules: a policy push), and
    so on: a reply to any flow the host opened earlier passes whatever filter is in force."""
    local = [f"{ipaddress.ip_address(ME4)}/32"]
    f = Filter([], local)  # the flow table never evicts here (capacity 8192)
    opened: set[tuple[int, int, int, int, int]] = set()
    p = Parsed()
    for pkts, swap in steps:
        for direction, pkt in pkts:
            parse_into(pkt, p)
            key = (p.proto, p.src_ip, p.src_port, p.dst_ip, p.dst_port)
            if direction == "out":
                assert f.check_out(p) == ACCEPT
                opened.add(key)
            else:
                reply_to = (p.proto, p.dst_ip, p.dst_port, p.src_ip, p.src_port)
                verdict = f.check_in(p)
                if reply_to in opened:
                    assert verdict == ACCEPT, (pkt.hex(), f.shields_up)
        if isinstance(swap, bool):
            f = f.with_shields_up(swap)
        elif swap is not None:
            f = Filter(swap, local, shields_up=f.shields_up, flows=f.flows)
