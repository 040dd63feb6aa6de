"""nodeagent.control.explain: verdicts per policy construct, line numbers, nearest miss,
suggested entries, the DST:PORT/proto syntax and the node-request refusal."""

from __future__ import annotations

import json

import pytest

from nodeagent.control.explain import (
    ExplainError,
    answer_node_request,
    explain,
    parse_target,
)
from nodeagent.control.policy import PolicyNode, parse_policy

NODES = [
    PolicyNode(1, "alpha", "alpha-laptop", "alice@example.com", (),
               ("100.64.0.1", "fd7a:115c:a1e0::1")),
    PolicyNode(2, "beta", "beta", "bob@example.com", (), ("100.64.0.2", "fd7a:115c:a1e0::2")),
    PolicyNode(3, "web1", "web1", "alice@example.com", ("tag:web",),
               ("100.64.0.3", "fd7a:115c:a1e0::3")),
    PolicyNode(4, "db1", "db1", "bob@example.com", ("tag:db",),
               ("100.64.0.4", "fd7a:115c:a1e0::4")),
]

POLICY = """// test policy
{
  "groups": {"group:eng": ["alice@example.com"]},
  "tagOwners": {"tag:web": ["alice@example.com"], "tag:db": ["alice@example.com"],
                "tag:ghost": ["alice@example.com"]},
  "hosts": {"lab": "100.64.0.0/31"},
  "acls": [
    {"action": "accept", "src": ["group:eng"], "dst": ["beta:80"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["beta:8080"], "proto": "tcp"},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["lab"], "dst": ["autogroup:tagged:9000-9100"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["100.64.0.3:443"]},
    {"action": "accept", "src": ["tag:ghost"], "dst": ["alpha:7"], "proto": "udp"},
    {"action": "accept", "src": ["*"], "dst": ["db1:*"], "proto": "gre"},
  ],
}
"""


@pytest.fixture(scope="module")
def pol():  # type: ignore[no-untyped-def]
    return parse_policy(POLICY)


def ex(pol, src: str, target: str):  # type: ignore[no-untyped-def]
    host, port, proto = parse_target(target)
    return explain(pol, NODES, src, host, port, proto, file="t.hujson")


@pytest.mark.parametrize("src,target,allowed,index", [
    ("alpha", "beta:80", True, 0),                    # group → name
    ("beta", "beta:80", False, None),                 # bob is not in group:eng
    ("web1", "beta:80", False, None),                 # tagged nodes are in no group
    ("web1", "beta:8080", True, 1),                   # tag, proto tcp
    ("web1", "beta:8080/udp", False, None),           # the entry is tcp only
    ("alpha", "db1:5432", True, 2),                   # autogroup:member → tag
    ("web1", "db1:5432", False, None),                # tagged is no member
    ("100.64.0.1", "web1:9050", True, 3),             # hosts alias → autogroup:tagged
    ("100.64.0.2", "web1:9050", False, None),         # outside the alias
    ("alpha", "beta:9050", False, None),              # beta is not tagged
    ("beta", "web1:443", True, 4),                    # user → IP
    ("db1", "web1:443", False, None),                 # tagged: not bob's any more
    ("fd7a:115c:a1e0::2", "web1:443", False, None),   # the IP entry is IPv4 only
    ("tag:ghost", "alpha:7/udp", True, 5),            # a tag no node carries
    ("alpha", "beta/icmp", True, 0),                  # ICMP ignores ports
    ("alpha", "db1/gre", True, 6),                    # portless proto with port *
    ("alpha", "beta/gre", False, None),               # ... not allowed without one
])
def test_verdicts(pol, src: str, target: str, allowed: bool, index: int | None) -> None:  # type: ignore[no-untyped-def]
    e = ex(pol, src, target)
    assert e.allowed is allowed, e.text()
    if allowed:
        assert e.summary.startswith(f"Allowed: acls[{index}] at t.hujson:")
        assert e.suggestion is None
    else:
        assert e.summary.startswith("Denied: no ACL entry lets")


def test_line_numbers(pol) -> None:  # type: ignore[no-untyped-def]
    lines = POLICY.splitlines()
    for i, acl in enumerate(pol.acls):
        assert '"action"' in lines[acl.line - 1]
        assert lines[acl.line - 1][acl.column - 1] == "{"
        assert i == 0 or acl.line > pol.acls[i - 1].line
    e = ex(pol, "alpha", "beta:80")
    m = e.to_json()["Matches"][0]
    assert (m["File"], m["Line"], m["Index"], m["Allows"]) == ("t.hujson", pol.acls[0].line, 0,
                                                               True)


def test_nearest_miss_port(pol) -> None:  # type: ignore[no-untyped-def]
    e = ex(pol, "web1", "beta:22")
    assert not e.allowed
    assert e.nearest is not None and e.nearest.index == 1
    assert e.nearest_text == (f"acls[1] at t.hujson:{pol.acls[1].line} allows "
                              "tag:web → beta:8080/tcp, not :22.")
    assert "Nearest: acls[1]" in e.sentence


def test_nearest_miss_source_and_expansion(pol) -> None:  # type: ignore[no-untyped-def]
    e = ex(pol, "beta", "beta:80")
    assert e.nearest is not None and e.nearest.index == 0
    assert "not from beta (group:eng is alice@example.com; beta belongs to bob@example.com)" \
        in e.nearest_text
    allowed = ex(pol, "alpha", "beta:80")
    assert "group:eng is alice@example.com; alpha belongs to alice@example.com" \
        in allowed.expansions
    hosts = ex(pol, "100.64.0.1", "web1:9050")
    assert any("hosts 'lab' is 100.64.0.0/31" in x for x in hosts.expansions)
    assert any("web1 carries tag:web" in x for x in hosts.expansions)


def test_nearest_miss_protocol(pol) -> None:  # type: ignore[no-untyped-def]
    e = ex(pol, "web1", "beta:8080/udp")
    assert e.nearest is not None and e.nearest.index == 1
    assert e.nearest_text.endswith("not udp.")


def test_every_relevant_entry_listed(pol) -> None:  # type: ignore[no-untyped-def]
    e = ex(pol, "alpha", "beta:8080")
    idx = {m["Index"] for m in e.to_json()["Matches"]}
    assert {0, 1} <= idx  # 0: source and destination, 1: destination and port
    assert 6 in idx  # "*" matches the source


@pytest.mark.parametrize("src,target", [
    ("beta", "beta:80"), ("web1", "beta:22"), ("alpha", "beta/gre"), ("db1", "web1:443"),
    ("tag:ghost", "beta:22/udp"), ("fd7a:115c:a1e0::2", "web1:443"), ("web1", "beta/icmp"),
])
def test_suggestion_allows_the_flow(pol, src: str, target: str) -> None:  # type: ignore[no-untyped-def]
    e = ex(pol, src, target)
    assert not e.allowed and e.suggestion is not None
    entry = json.loads(e.suggestion)
    text = POLICY.replace('"acls": [', '"acls": [\n    ' + e.suggestion + ",")
    e2 = ex(parse_policy(text), src, target)
    assert e2.allowed, (e.suggestion, e2.text())
    assert entry["action"] == "accept" and len(entry["src"]) == len(entry["dst"]) == 1


def test_suggestion_prefers_tags_and_names(pol) -> None:  # type: ignore[no-untyped-def]
    assert json.loads(ex(pol, "web1", "beta:22").suggestion) == {
        "action": "accept", "src": ["tag:web"], "dst": ["beta:22"], "proto": "tcp"}
    assert json.loads(ex(pol, "alpha", "beta/icmp").suggestion or "null") is None  # allowed
    assert json.loads(ex(pol, "web1", "beta/icmp").suggestion)["dst"] == ["beta:*"]


def test_parse_target() -> None:
    assert parse_target("beta:22") == ("beta", 22, 6)
    assert parse_target("beta:53/udp") == ("beta", 53, 17)
    assert parse_target("beta/icmp") == ("beta", 0, 1)
    assert parse_target("[fd7a::1]:22/tcp") == ("fd7a::1", 22, 6)
    assert parse_target("fd7a::1/ipv6-icmp") == ("fd7a::1", 0, 58)
    assert parse_target("tag:web:443") == ("tag:web", 443, 6)
    for bad in ("beta", "beta:x", "beta:70000", "beta:22/bogus", ":22"):
        with pytest.raises(ExplainError):
            parse_target(bad)


def test_unknown_endpoints(pol) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ExplainError, match="no node, IP or tag 'nobody'"):
        explain(pol, NODES, "nobody", "beta", 22, 6)
    with pytest.raises(ExplainError, match="different address families"):
        explain(pol, NODES, "100.64.0.1", "fd7a:115c:a1e0::2", 22, 6)


def test_node_request_only_own_flows(pol) -> None:  # type: ignore[no-untyped-def]
    ok = answer_node_request(pol, NODES, 1, "100.64.0.1", "100.64.0.2", 80, 6)
    assert ok["Result"]["Allowed"] is True
    as_dst = answer_node_request(pol, NODES, 2, "100.64.0.1", "100.64.0.2", 80, 6)
    assert "Result" in as_dst
    other = answer_node_request(pol, NODES, 3, "100.64.0.1", "100.64.0.2", 80, 6)
    assert other == {"Error": "a node may only ask about flows it is the source or "
                              "destination of"}
    names = answer_node_request(pol, NODES, 1, "alpha", "beta", 80, 6)
    assert "Error" in names and "Result" not in names
