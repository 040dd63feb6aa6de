"""Rule matching: rules compiled into per-family prefix tables, plus a naive reference matcher.

The question answered is "does any rule allow (proto, src, dst, dst port)?". A packet matches a
rule when its protocol is one of the rule's protocols, its source is inside one of the rule's
``srcs`` and its destination is inside one of the rule's ``dsts`` whose port range admits it.
Ports count only for TCP, UDP and SCTP; ICMP matches by address alone; any other protocol needs
an explicitly listed protocol and a destination entry covering all ports (Tailscale's rule for
portless protocols).

Compilation (why it is not linear in the rule count): for each address family, the distinct
source prefixes are keyed by prefix length → network int. Each source prefix points at the union
of the destination sides of every rule that lists it, itself keyed by protocol → destination
prefix length → network int → merged, sorted port ranges (bisect). A lookup masks the source once
per distinct source prefix length present (≤ 33 for IPv4, ≤ 129 for IPv6), then the destination
once per distinct destination prefix length under that protocol. Source prefixes listed by
exactly the same rules share one merged table, so a rule with many sources and many destinations
is stored once, not once per source.
"""

from __future__ import annotations

import functools
import gc
from bisect import bisect_right
from collections.abc import Iterable

from nodeagent.filter.rules import ALL_PORTS, ICMP_PROTOS, PORT_PROTOS, FilterRule

# proto → ((dst mask, {dst net: (range starts, range ends)}), ...)
DstTable = dict[int, tuple[tuple[int, dict[int, tuple[tuple[int, ...], tuple[int, ...]]]], ...]]
SrcIndex = tuple[tuple[int, dict[int, DstTable]], ...]

_BITS = {4: 32, 6: 128}

_set = object.__setattr__


@functools.cache
def _mask(version: int, plen: int) -> int:
    bits = _BITS[version]
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def _port_range(proto: int, first: int, last: int) -> tuple[int, int] | None:
    """The range stored for ``proto``, or None when the entry cannot admit that protocol."""
    if proto in PORT_PROTOS:
        return first, last
    if proto in ICMP_PROTOS:
        return ALL_PORTS
    return ALL_PORTS if (first, last) == ALL_PORTS else None


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(ranges) == 1:
        return (ranges[0][0],), (ranges[0][1],)
    ranges.sort()
    los: list[int] = []
    his: list[int] = []
    for lo, hi in ranges:
        if his and lo <= his[-1] + 1:
            if hi > his[-1]:
                his[-1] = hi
        else:
            los.append(lo)
            his.append(hi)
    return tuple(los), tuple(his)


# One rule's destination side: (version, proto, dst plen, dst net, lo, hi) entries.
_Entry = tuple[int, int, int, int, int, int]


def _rule_entries(rule: FilterRule) -> list[_Entry]:
    out: list[_Entry] = []
    protos = rule.effective_protos
    for d in rule.dsts:
        net = d.net
        version, plen, addr = net.version, net.prefixlen, int(net.network_address)
        for proto in protos:
            pr = _port_range(proto, d.first, d.last)
            if pr is not None:
                out.append((version, proto, plen, addr, pr[0], pr[1]))
    return out


def _build_table(version: int, entries: Iterable[_Entry]) -> DstTable:
    raw: dict[int, dict[int, dict[int, list[tuple[int, int]]]]] = {}
    for ver, proto, plen, net, lo, hi in entries:
        if ver != version:
            continue  # a source of one family never pairs with a destination of the other
        by_len = raw.setdefault(proto, {})
        by_len.setdefault(plen, {}).setdefault(net, []).append((lo, hi))
    table: DstTable = {}
    for proto, by_len in raw.items():
        if len(by_len) == 1:  # the common case: no sort, one mask
            ((plen, nets),) = by_len.items()
            table[proto] = ((_mask(version, plen), {n: _merge(rs) for n, rs in nets.items()}),)
            continue
        table[proto] = tuple(
            (_mask(version, plen), {n: _merge(rs) for n, rs in nets.items()})
            for plen, nets in sorted(by_len.items(), reverse=True)
        )
    return table


def _compile(rules: list[FilterRule]) -> tuple[int, int, SrcIndex, SrcIndex]:
    """Rules → (rule count, distinct destination tables, IPv4 source index, IPv6 source index)."""
    entries = [_rule_entries(r) for r in rules]
    # (version, src plen, src net) → ids of the rules listing that source prefix.
    src_rules: dict[tuple[int, int, int], list[int]] = {}
    for i, r in enumerate(rules):
        if not entries[i]:
            continue
        for s in r.srcs:
            ids = src_rules.setdefault((s.version, s.prefixlen, int(s.network_address)), [])
            if not ids or ids[-1] != i:
                ids.append(i)
    shared: dict[tuple[int, tuple[int, ...]], DstTable] = {}
    per_len: dict[int, dict[int, dict[int, DstTable]]] = {4: {}, 6: {}}
    for (version, plen, net), ids in src_rules.items():
        key = (version, tuple(ids))
        table = shared.get(key)
        if table is None:
            table = _build_table(version, (e for i in ids for e in entries[i]))
            shared[key] = table
        if table:
            per_len[version].setdefault(plen, {})[net] = table
    v4: SrcIndex = tuple(
        (_mask(4, plen), nets) for plen, nets in sorted(per_len[4].items(), reverse=True)
    )
    v6: SrcIndex = tuple(
        (_mask(6, plen), nets) for plen, nets in sorted(per_len[6].items(), reverse=True)
    )
    return len(rules), len(shared), v4, v6


class Matcher:
    """Compiled rule set; :meth:`match` costs O(distinct prefix lengths), not O(rules).

    Immutable: the tables are built once in ``__init__`` and setting or deleting an attribute
    raises ``AttributeError`` (a new rule set means a new Matcher, inside a new Filter).
    """

    __slots__ = ("_v4", "_v6", "rule_count", "table_count")

    _v4: SrcIndex
    _v6: SrcIndex
    rule_count: int
    table_count: int

    def __init__(self, rules: Iterable[FilterRule]) -> None:
        try:
            object.__getattribute__(self, "_v4")
        except AttributeError:
            pass
        else:
            raise AttributeError("Matcher is immutable: it cannot be initialised twice")
        # Compiling allocates many small containers that all survive; the cyclic collector
        # would rescan them repeatedly (over half the compile time at 10 000 rules) and can
        # find no garbage among them, so it waits until the tables are built.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            rule_count, table_count, v4, v6 = _compile(list(rules))
        finally:
            if was_enabled:
                gc.enable()
        _set(self, "rule_count", rule_count)
        _set(self, "table_count", table_count)
        _set(self, "_v4", v4)
        _set(self, "_v6", v6)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Matcher is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Matcher is immutable: cannot delete {name!r}")

    def match(self, version: int, proto: int, src: int, dst: int, port: int) -> bool:
        """Whether some rule admits the packet; ``port`` is ignored unless TCP/UDP/SCTP."""
        for mask, nets in self._v4 if version == 4 else self._v6:
            table = nets.get(src & mask)
            if table is None:
                continue
            dsts = table.get(proto)
            if dsts is None:
                continue
            for dmask, dnets in dsts:
                r = dnets.get(dst & dmask)
                if r is not None:
                    los, his = r
                    i = bisect_right(los, port)
                    if i and his[i - 1] >= port:
                        return True
        return False

    def prefix_lengths(self) -> dict[int, list[int]]:
        """Distinct source prefix lengths per family (how many lookups a miss costs)."""
        out: dict[int, list[int]] = {}
        for version, index in ((4, self._v4), (6, self._v6)):
            bits = _BITS[version]
            out[version] = [bits - (((1 << bits) - 1) ^ m).bit_length() for m, _ in index]
        return out


def naive_match(
    rules: Iterable[FilterRule], version: int, proto: int, src: int, dst: int, port: int
) -> bool:
    """The same question answered by scanning every rule: the reference for tests/benchmarks."""
    for r in rules:
        if proto not in r.effective_protos:
            continue
        if not any(
            s.version == version and src & _mask(version, s.prefixlen) == int(s.network_address)
            for s in r.srcs
        ):
            continue
        for d in r.dsts:
            n = d.net
            if n.version != version:
                continue
            if dst & _mask(version, n.prefixlen) != int(n.network_address):
                continue
            if proto in PORT_PROTOS:
                if d.first <= port <= d.last:
                    return True
            elif proto in ICMP_PROTOS or (d.first, d.last) == ALL_PORTS:
                return True
    return False
