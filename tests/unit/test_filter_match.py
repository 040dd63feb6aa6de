"""Unit tests for nodeagent.filter.match: the compiled matcher's structure and edge cases."""

from __future__ import annotations

import ipaddress

from nodeagent.filter import FilterRule, Matcher, NetPortRange, naive_match, parse_rules
from nodeagent.packet import ip_to_int


def ip(s: str) -> int:
    return ip_to_int(s)[1]


def rules(*specs: tuple[list[str], list[tuple[str, int, int]]]) -> list[FilterRule]:
    return parse_rules([
        {"SrcIPs": src,
         "DstPorts": [{"IP": d, "Ports": {"First": a, "Last": b}} for d, a, b in dst]}
        for src, dst in specs
    ])


def test_overlapping_and_adjacent_ranges_merge() -> None:
    m = Matcher(rules((["*"], [("*", 10, 20), ("*", 15, 30), ("*", 31, 40), ("*", 50, 60)])))
    dst = ip("100.64.0.2")
    got = [p for p in range(0, 70) if m.match(4, 6, ip("1.2.3.4"), dst, p)]
    assert got == list(range(10, 41)) + list(range(50, 61))


def test_lookups_bounded_by_distinct_prefix_lengths() -> None:
    many = rules(*[([f"10.{i >> 8}.{i & 255}.1", f"10.200.{i & 255}.0/24"],
                    [("100.64.0.2", 1000 + i, 1000 + i)]) for i in range(2000)])
    m = Matcher(many)
    assert m.rule_count == 2000
    assert m.prefix_lengths() == {4: [32, 24], 6: []}


def test_rule_with_many_sources_and_destinations_is_stored_once() -> None:
    srcs = [f"100.64.{i >> 8}.{i & 255}" for i in range(300)]
    dsts = [(f"100.65.{i >> 8}.{i & 255}", 22, 22) for i in range(300)]
    m = Matcher(rules((srcs, dsts)))
    assert m.table_count == 1
    assert m.match(4, 6, ip("100.64.1.20"), ip("100.65.0.250"), 22)
    assert not m.match(4, 6, ip("100.64.1.20"), ip("100.65.0.250"), 23)


def test_src_listed_by_several_rules_unions_their_destinations() -> None:
    rs = rules((["100.64.0.1"], [("100.64.0.2", 22, 22)]),
               (["100.64.0.1", "100.64.0.3"], [("100.64.0.2", 80, 80)]))
    m = Matcher(rs)
    for src in ("100.64.0.1", "100.64.0.3"):
        for port in (22, 80, 81):
            args = (4, 6, ip(src), ip("100.64.0.2"), port)
            assert m.match(*args) == naive_match(rs, *args), (src, port)
    assert m.match(4, 6, ip("100.64.0.1"), ip("100.64.0.2"), 22)
    assert not m.match(4, 6, ip("100.64.0.3"), ip("100.64.0.2"), 22)


def test_ipv6_prefixes() -> None:
    rs = rules((["fd7a:115c:a1e0::/48"], [("fd7a:115c:a1e0:ab12::/64", 443, 443)]))
    m = Matcher(rs)
    assert m.match(6, 6, ip("fd7a:115c:a1e0:1::9"), ip("fd7a:115c:a1e0:ab12::5"), 443)
    assert not m.match(6, 6, ip("fd7a:115c:a1e1::9"), ip("fd7a:115c:a1e0:ab12::5"), 443)
    assert not m.match(6, 6, ip("fd7a:115c:a1e0:1::9"), ip("fd7a:115c:a1e0:ab13::5"), 443)
    assert not m.match(4, 6, ip("1.2.3.4"), ip("1.2.3.5"), 443)


def test_empty_rule_sets() -> None:
    m = Matcher([])
    assert not m.match(4, 6, 1, 2, 3)
    empty = [FilterRule(srcs=(ipaddress.ip_network("0.0.0.0/0"),), dsts=())]
    assert not Matcher(empty).match(4, 6, 1, 2, 3)
    no_src = [FilterRule(srcs=(), dsts=(NetPortRange(ipaddress.ip_network("0.0.0.0/0")),))]
    assert not Matcher(no_src).match(4, 6, 1, 2, 3)
