"""Property: ``nodeagent.control.explain`` and the compiled packet filter never disagree.

Random policies (groups, tags, hosts, autogroups, users, names, IPs and CIDRs of both families,
port lists and protocols) over random nodes; for random flows between the nodes the explanation's
verdict must be the verdict of ``Filter.check_in`` on the destination node's compiled rules for a
built packet of that flow. A suggested entry, added to the policy, must make the filter accept.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.control.explain import explain
from nodeagent.control.policy import PolicyNode, parse_policy
from nodeagent.filter import ACCEPT, Filter, parse_rules
from nodeagent.packet import TCP_SYN, Parsed, build_ip, build_tcp, build_udp, parse_into

TAGS = ["tag:a", "tag:b", "tag:c"]
USERS = ["u1@x", "u2@x", "u3@x"]
NAMES = ["n0", "n1", "n2", "n3", "n4"]
PORTS = ["*", "22", "20-30", "22,80", "80", "0-21,23-65535"]
PROTOS = [None, "tcp", "udp", "icmp", "ipv6-icmp", "gre", "sctp"]
FLOW_PROTOS = [6, 17, 1, 47, 132]
FLOW_PORTS = [0, 22, 25, 80, 443]


def v4(i: int) -> str:
    return f"100.64.0.{i + 1}"


def v6(i: int) -> str:
    return f"fd7a:115c:a1e0::{i + 1:x}"


NETS = ["100.64.0.0/30", "100.64.0.4/31", "100.64.0.2", "fd7a:115c:a1e0::/126",
        "fd7a:115c:a1e0::3", "0.0.0.0/0"]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[str, list[PolicyNode]]:
    n = draw(st.integers(2, 5))
    nodes = []
    for i in range(n):
        tags = tuple(draw(st.lists(st.sampled_from(TAGS), max_size=2, unique=True)))
        nodes.append(PolicyNode(i + 1, NAMES[i], draw(st.sampled_from([NAMES[i], f"h{i}"])),
                                draw(st.sampled_from(USERS)), tags, (v4(i), v6(i))))
    groups = {"group:g1": draw(st.lists(st.sampled_from(USERS), max_size=2, unique=True))
              or ["nobody@x"], "group:g2": ["u2@x"]}
    hosts = {"h-lab": draw(st.sampled_from(NETS)), "h-six": "fd7a:115c:a1e0::/127"}
    sels = ["*", *TAGS, "group:g1", "group:g2", "autogroup:member", "autogroup:tagged",
            "h-lab", "h-six", *NAMES, *USERS, "h1", *NETS, v4(0), v6(1)]
    acls = []
    for _ in range(draw(st.integers(0, 5))):
        proto = draw(st.sampled_from(PROTOS))
        dsts = []
        for _ in range(draw(st.integers(1, 3))):
            sel = draw(st.sampled_from(sels))
            ports = "*" if proto not in (None, "tcp", "udp", "sctp") else draw(
                st.sampled_from(PORTS))
            shown = f"[{sel}]" if ":" in sel and "/" not in sel and not sel.startswith(
                ("tag:", "group:", "autogroup:")) else sel
            dsts.append(f"{shown}:{ports}")
        entry: dict[str, Any] = {"action": "accept",
                                 "src": draw(st.lists(st.sampled_from(sels), min_size=1,
                                                      max_size=3)),
                                 "dst": dsts}
        if proto is not None:
            entry["proto"] = proto
        acls.append(entry)
    doc = {"groups": groups, "hosts": hosts, "tagOwners": {t: ["u1@x"] for t in TAGS},
           "acls": acls}
    return json.dumps(doc, indent=1), nodes


def filter_verdict(rules_wire: list[dict[str, Any]], dst: PolicyNode, version: int, proto: int,
                   src_ip: str, dst_ip: str, port: int) -> bool:
    f = Filter(parse_rules(rules_wire), list(dst.addresses))
    s, d = int(ipaddress.ip_address(src_ip)), int(ipaddress.ip_address(dst_ip))
    if proto == 6:
        pkt = build_tcp(version, s, d, 40000, port, 1, 0, TCP_SYN)
    elif proto == 17:
        pkt = build_udp(version, s, d, 40000, port)
    elif proto in (1, 58):
        pkt = build_ip(version, s, d, proto, bytes([128 if version == 6 else 8, 0, 0, 0, 0, 0,
                                                   0, 0]))
    elif proto == 132:  # SCTP common header: ports, verification tag, checksum
        pkt = build_ip(version, s, d, proto, struct.pack("!HHII", 40000, port, 0, 0))
    else:
        pkt = build_ip(version, s, d, proto, bytes(12))
    p = Parsed()
    parse_into(pkt, p)
    return f.check_in(p) == ACCEPT


@settings(max_examples=300, deadline=None)
@given(worlds(), st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.sampled_from([4, 6]),
                                    st.sampled_from(FLOW_PROTOS), st.sampled_from(FLOW_PORTS),
                                    st.booleans()), min_size=1, max_size=8))
def test_explain_agrees_with_filter(world: tuple[str, list[PolicyNode]],
                                    flows: list[tuple[int, int, int, int, int, bool]]) -> None:
    text, nodes = world
    pol = parse_policy(text)
    compiled = pol.compile(nodes)
    for si, di, version, proto, port, by_name in flows:
        src, dst = nodes[si % len(nodes)], nodes[di % len(nodes)]
        if proto == 1 and version == 6:
            proto = 58
        port = port if proto in (6, 17, 132) else 0
        sip = src.addresses[0] if version == 4 else src.addresses[1]
        dip = dst.addresses[0] if version == 4 else dst.addresses[1]
        want = filter_verdict(compiled[dst.id][0], dst, version, proto, sip, dip, port)
        s_arg = src.name if by_name and version == 4 else sip
        d_arg = dst.name if by_name and version == 4 else dip
        e = explain(pol, nodes, s_arg, d_arg, port, proto)
        assert e.allowed == want, (text, s_arg, d_arg, port, proto, e.text())
        if not want:
            assert e.suggestion is not None
            fixed = json.loads(text)
            fixed["acls"].append(json.loads(e.suggestion))
            pol2 = parse_policy(json.dumps(fixed))
            rules2 = pol2.compile(nodes)[dst.id][0]
            assert filter_verdict(rules2, dst, version, proto, sip, dip, port), e.suggestion
