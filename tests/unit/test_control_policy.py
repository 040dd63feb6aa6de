"""Policy file parsing (HuJSON, validation with line:column) and per-node compilation."""

from __future__ import annotations

import pytest

from nodeagent.control import hujson
from nodeagent.control.policy import PolicyError, PolicyNode, parse_policy
from nodeagent.filter.match import Matcher
from nodeagent.filter.rules import parse_rules

A = PolicyNode(1, "alpha", "alpha", "alice@example.com", (), ("100.64.0.1", "fd7a:115c:a1e0::1"))
B = PolicyNode(2, "beta", "Beta-Host", "bob@example.com", (), ("100.64.0.2", "fd7a:115c:a1e0::2"))
S = PolicyNode(3, "srv", "srv", "alice@example.com", ("tag:server",),
               ("100.64.0.3", "fd7a:115c:a1e0::3"))
NODES = [A, B, S]

POLICY = """
// comment at the top
{
  "groups": {"group:eng": ["alice@example.com"],},
  "hosts": {"lab": "10.1.0.0/16"},
  "tagOwners": {"tag:server": ["alice@example.com"]},  /* block
     comment */
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["tag:server:22,80-90"], "proto": "tcp"},
    {"action": "accept", "src": ["beta"], "dst": ["alpha:*"]},
    {"action": "accept", "src": ["lab", "100.64.0.9"], "dst": ["100.64.0.0/10:443"]},
  ],
  "nodeAttrs": [
    {"target": ["tag:server"], "attr": ["debug-conn-reject"]},
    {"target": ["*"], "attr": ["x-all"]},
  ],
  "derpMap": {"Regions": {"900": {"RegionID": 900, "RegionCode": "t", "Nodes": [
      {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "DERPPort": 3340}]}}},
}
"""


def test_hujson_comments_and_trailing_commas() -> None:
    doc = hujson.parse('// c\n{"a": [1, 2,], /* x */ "b": {"c": "d",},}')
    assert doc.value == {"a": [1, 2], "b": {"c": "d"}}
    assert doc.where(("b", "c")) == (2, 35)


@pytest.mark.parametrize("text,line,col", [
    ('{\n  "a": 1\n  "b": 2}', 3, 3),          # missing comma
    ('{"a": [1, 2}', 1, 12),                  # bracket mismatch
    ('{\n "a": tru }', 2, 7),                 # bad literal
    ('{"a": 1} x', 1, 10),                    # trailing garbage
    ('{"a": 1, "a": 2}', 1, 10),              # duplicate key
    ('/* open', 1, 1),                        # unterminated comment
])
def test_hujson_syntax_errors_have_line_col(text: str, line: int, col: int) -> None:
    with pytest.raises(hujson.HuJSONError) as ei:
        hujson.parse(text)
    assert (ei.value.line, ei.value.column) == (line, col)
    assert str(ei.value).startswith(f"{line}:{col}: ")


def test_compile_filter_for_tagged_server() -> None:
    pol = parse_policy(POLICY)
    out = pol.compile(NODES)
    rules, caps = out[S.id]
    assert rules[0] == {
        "SrcIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],  # group:eng = alice's untagged nodes
        "DstPorts": [
            {"IP": ip, "Ports": r} for ip in S.addresses
            for r in ({"First": 22, "Last": 22}, {"First": 80, "Last": 90})],
        "IPProto": [6],
    }
    # The /10 rule includes srv too; its destination stays the CIDR as written.
    assert rules[1] == {"SrcIPs": ["10.1.0.0/16", "100.64.0.9"],
                        "DstPorts": [{"IP": "100.64.0.0/10",
                                      "Ports": {"First": 443, "Last": 443}}]}
    assert len(rules) == 2
    assert caps == {"debug-conn-reject": [], "x-all": []}
    assert parse_rules(rules)  # the data plane accepts what control emits


def test_compile_only_rules_that_include_the_node() -> None:
    out = parse_policy(POLICY).compile(NODES)
    a_rules, a_caps = out[A.id]
    b_rules, _ = out[B.id]
    # alpha: reachable from beta on every port (+ the /10 rule), never the tag:server rule.
    assert a_rules[0]["SrcIPs"] == list(B.addresses)
    assert {d["IP"] for d in a_rules[0]["DstPorts"]} == set(A.addresses)
    assert all(d["IP"] not in S.addresses for r in a_rules for d in r["DstPorts"])
    assert a_caps == {"x-all": []}
    # beta only gets the /10 rule.
    assert [r["DstPorts"][0]["IP"] for r in b_rules] == ["100.64.0.0/10"]


def test_compiled_filter_semantics() -> None:
    rules, _ = parse_policy(POLICY).compile(NODES)[S.id]
    m = Matcher(parse_rules(rules))
    a1, s3 = 0x64400001, 0x64400003
    b2 = 0x64400002
    assert m.match(4, 6, a1, s3, 22)
    assert m.match(4, 6, a1, s3, 85)
    assert not m.match(4, 6, a1, s3, 23)
    assert not m.match(4, 17, a1, s3, 22)  # proto tcp only
    assert not m.match(4, 6, b2, s3, 22)   # bob is not in group:eng


def test_names_resolve_by_user_name_and_hostname() -> None:
    pol = parse_policy('{"acls": [{"action": "accept", "src": ["bob@example.com"], '
                       '"dst": ["Beta-Host:1000-2000", "nobody-yet:*"]}]}')
    out = pol.compile(NODES)
    assert out[B.id][0][0]["DstPorts"] == [
        {"IP": ip, "Ports": {"First": 1000, "Last": 2000}} for ip in B.addresses]
    assert out[A.id][0] == []  # nobody-yet resolves to no node: no rule


def test_tagged_nodes_lose_user_identity() -> None:
    pol = parse_policy('{"acls": [{"action": "accept", "src": ["alice@example.com"], '
                       '"dst": ["*:*"]}]}')
    rules, _ = pol.compile(NODES)[B.id]
    assert rules[0]["SrcIPs"] == list(A.addresses)  # not srv, though alice created it


def test_default_wildcard_rule() -> None:
    pol = parse_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    rules, caps = pol.compile([A])[A.id]
    assert rules == [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*",
                                                     "Ports": {"First": 0, "Last": 65535}}]}]
    assert caps == {}


def test_ipv6_dst_forms() -> None:
    pol = parse_policy('{"acls": [{"action": "accept", "src": ["*"], '
                       '"dst": ["[fd7a:115c:a1e0::1]:22", "fd7a:115c:a1e0::/48:80"]}]}')
    rules, _ = pol.compile([A])[A.id]
    assert [(d["IP"], d["Ports"]["First"]) for d in rules[0]["DstPorts"]] == [
        ("fd7a:115c:a1e0::1", 22), ("fd7a:115c:a1e0::/48", 80)]


def test_derp_map_is_parsed() -> None:
    pol = parse_policy(POLICY)
    assert pol.derp_map is not None and pol.derp_map.Regions[900].Nodes[0].DERPPort == 3340
    assert pol.derp_map_wire is not None and "900" in pol.derp_map_wire["Regions"]


def _err(text: str) -> str:
    with pytest.raises(PolicyError) as ei:
        parse_policy(text)
    return str(ei.value)


@pytest.mark.parametrize("text,expect", [
    ('{\n  "acls": [\n    {"action": "deny", "src": ["*"], "dst": ["*:*"]}]}',
     '3:16: acl: action must be "accept"'),
    ('{"acls": [{"action": "accept",\n "src": ["tag:nope"], "dst": ["*:*"]}]}',
     "2:10: 'tag:nope' is not declared in tagOwners"),
    ('{"acls": [{"action": "accept", "src": ["*"],\n  "dst": ["a:70000"]}]}',
     "2:11: bad port '70000'"),
    ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["a:9-3"]}]}',
     "1:54: bad port range '9-3'"),
    ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["alpha"]}]}',
     "1:54: dst 'alpha': expected <selector>:<ports>"),
    ('{"acl": []}', "1:9: policy: unknown field 'acl'"),
    ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "bogus"}]}',
     "1:71: proto: unknown protocol 'bogus'"),
    ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"], "proto": "icmp"}]}',
     "1:72: acl: ports can only be given"),
    ('{"nodeAttrs": [{"target": ["*"]}]}', "1:16: nodeAttrs entry: missing 'attr'"),
    ('{"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]}',
     "1:40: 'group:x' is not declared in groups"),
    ('{"derpMap": {"Regions": {"x": {"RegionID": 1}}}}', "1:13: DERPMap.Regions: region id"),
    ('{"acls": [}', "1:11: unexpected character"),
])
def test_policy_errors_point_at_the_value(text: str, expect: str) -> None:
    assert _err(text).startswith(expect)
