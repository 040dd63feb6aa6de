"""Unit tests for nodeagent.filter.rules: the tailcfg.FilterRule JSON shape in and out."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from nodeagent.filter import (
    DEFAULT_PROTOS,
    FilterRule,
    FilterRuleError,
    NetPortRange,
    parse_rules,
    rules_to_wire,
)


def net(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(s)


def dst(ip: Any, first: Any = 22, last: Any = 22) -> dict[str, Any]:
    return {"IP": ip, "Ports": {"First": first, "Last": last}}


def test_full_shape() -> None:
    rules = parse_rules([
        {
            "SrcIPs": ["100.64.0.1", "100.64.0.0/10", "fd7a::/48"],
            "DstPorts": [dst("100.64.0.2", 22, 22), dst("fd7a:115c:a1e0::2/128", 80, 443)],
            "IPProto": [6, 17],
        }
    ])
    assert rules == [
        FilterRule(
            srcs=(net("100.64.0.1/32"), net("100.64.0.0/10"), net("fd7a::/48")),
            dsts=(NetPortRange(net("100.64.0.2/32"), 22, 22),
                  NetPortRange(net("fd7a:115c:a1e0::2/128"), 80, 443)),
            protos=(6, 17),
        )
    ]


def test_star_means_both_families() -> None:
    (r,) = parse_rules([{"SrcIPs": ["*"], "DstPorts": [dst("*", 0, 65535)]}])
    assert r.srcs == (net("0.0.0.0/0"), net("::/0"))
    assert [d.net for d in r.dsts] == [net("0.0.0.0/0"), net("::/0")]
    assert all((d.first, d.last) == (0, 65535) for d in r.dsts)


def test_default_protos_when_absent_null_or_empty() -> None:
    for extra in ({}, {"IPProto": None}, {"IPProto": []}):
        (r,) = parse_rules([{"SrcIPs": ["*"], "DstPorts": [dst("*")], **extra}])
        assert r.protos == ()
        assert r.effective_protos == DEFAULT_PROTOS == (6, 17, 1, 58)


def test_proto_names_and_strings() -> None:
    (r,) = parse_rules([{"SrcIPs": ["*"], "DstPorts": [dst("*")],
                         "IPProto": ["tcp", "UDP", "icmp", "ipv6-icmp", "132", 47, 6]}])
    assert r.protos == (6, 17, 1, 58, 132, 47)  # duplicates dropped, order kept


def test_unknown_keys_ignored_and_missing_lists_empty() -> None:
    rules = parse_rules([
        {"SrcIPs": ["100.64.0.1"], "SrcBits": [32], "CapGrant": [{"Dsts": ["*"]}]},
        {"DstPorts": [dst("*")]},
        {"SrcIPs": None, "DstPorts": None},
    ])
    assert rules[0] == FilterRule(srcs=(net("100.64.0.1/32"),), dsts=())
    assert rules[1].srcs == ()
    assert rules[2] == FilterRule(srcs=(), dsts=())


def test_host_bits_masked_and_ranges() -> None:
    (r,) = parse_rules([{"SrcIPs": ["100.64.1.7/24", "10.0.0.1-10.0.0.4"], "DstPorts": []}])
    assert r.srcs == (net("100.64.1.0/24"), net("10.0.0.1/32"), net("10.0.0.2/31"),
                      net("10.0.0.4/32"))


def test_none_is_empty_filter() -> None:
    assert parse_rules(None) == []
    assert parse_rules([]) == []


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"x": 1}, "rules: expected a list, got dict"),
        ([5], "rule 0: expected an object, got int"),
        ([{"SrcIPs": "*"}], "rule 0: SrcIPs: expected a list, got str"),
        ([{"SrcIPs": ["*"]}, {"SrcIPs": ["1.2.3.4", "nope"]}],
         "rule 1: SrcIPs[1]: bad prefix 'nope'"),
        ([{"SrcIPs": [7]}], "rule 0: SrcIPs[0]: expected a string, got int"),
        ([{"SrcIPs": ["1.2.3.4/33"]}], "rule 0: SrcIPs[0]: bad prefix '1.2.3.4/33'"),
        ([{"SrcIPs": ["10.0.0.9-10.0.0.1"]}], "rule 0: SrcIPs[0]: bad prefix '10.0.0.9-10.0.0.1'"),
        ([{"SrcIPs": ["fe80::1%eth0"]}], "rule 0: SrcIPs[0]: bad prefix 'fe80::1%eth0'"),
        ([{}, {}, {}, {"DstPorts": [dst("x")]}], "rule 3: DstPorts[0].IP: bad prefix 'x'"),
        ([{"DstPorts": {"IP": "*"}}], "rule 0: DstPorts: expected a list, got dict"),
        ([{"DstPorts": ["*"]}], "rule 0: DstPorts[0]: expected an object, got str"),
        ([{"DstPorts": [{"Ports": {"First": 1, "Last": 2}}]}], "rule 0: DstPorts[0].IP: missing"),
        ([{"DstPorts": [{"IP": "*"}]}], "rule 0: DstPorts[0].Ports: missing"),
        ([{"DstPorts": [{"IP": "*", "Ports": [1, 2]}]}],
         "rule 0: DstPorts[0].Ports: expected an object, got list"),
        ([{"DstPorts": [dst("*", 70000, 70000)]}],
         "rule 0: DstPorts[0].Ports.First: expected an integer 0-65535, got 70000"),
        ([{"DstPorts": [dst("*", 1, "2")]}],
         "rule 0: DstPorts[0].Ports.Last: expected an integer 0-65535, got '2'"),
        ([{"DstPorts": [dst("*", True, 2)]}],
         "rule 0: DstPorts[0].Ports.First: expected an integer 0-65535, got True"),
        ([{"DstPorts": [dst("*"), dst("*", 30, 20)]}],
         "rule 0: DstPorts[1].Ports: First 30 > Last 20"),
        ([{"IPProto": [6, 256]}], "rule 0: IPProto[1]: bad protocol 256"),
        ([{"IPProto": ["bogus"]}], "rule 0: IPProto[0]: bad protocol 'bogus'"),
        ([{"IPProto": [6.0]}], "rule 0: IPProto[0]: bad protocol 6.0"),
        ([{"IPProto": 6}], "rule 0: IPProto: expected a list, got int"),
    ],
)
def test_bad_input_messages(obj: Any, message: str) -> None:
    with pytest.raises(FilterRuleError) as ei:
        parse_rules(obj)
    assert str(ei.value) == message
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_long_bad_value_is_truncated_to_one_short_line() -> None:
    with pytest.raises(FilterRuleError) as ei:
        parse_rules([{"SrcIPs": ["x\n" * 100]}])
    msg = str(ei.value)
    assert msg.startswith("rule 0: SrcIPs[0]: bad prefix 'x\\nx\\n")
    assert "\n" not in msg and len(msg) < 120


def test_wire_round_trip() -> None:
    wire = [
        {"SrcIPs": ["100.64.0.1", "100.64.0.0/10", "*"],
         "DstPorts": [dst("100.64.0.2", 22, 22), dst("fd7a::/48", 0, 65535)],
         "IPProto": [6]},
        {"SrcIPs": ["fd7a:115c:a1e0::1"], "DstPorts": [dst("*", 53, 53)]},
    ]
    rules = parse_rules(wire)
    out = rules_to_wire(rules)
    assert out[0] == {
        "SrcIPs": ["100.64.0.1", "100.64.0.0/10", "0.0.0.0/0", "::/0"],
        "DstPorts": [{"IP": "100.64.0.2", "Ports": {"First": 22, "Last": 22}},
                     {"IP": "fd7a::/48", "Ports": {"First": 0, "Last": 65535}}],
        "IPProto": [6],
    }
    assert "IPProto" not in out[1]
    assert parse_rules(out) == rules
