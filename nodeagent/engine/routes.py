"""Longest-prefix routing of destination addresses to peers (allowed IPs).

Per IP version, one dict per distinct prefix length mapping the masked network (an int) to a
value; a lookup tries the lengths present from longest to shortest, so the cost is bounded by the
number of distinct prefix lengths (a handful in practice), not by the number of routes.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

T = TypeVar("T")

_BITS = {4: 32, 6: 128}


class RouteTable(Generic[T]):
    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, T]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def add(self, prefix: str, value: T) -> None:
        """Add ``prefix`` (CIDR text; a bare address is a host route); ValueError if malformed."""
        net = ipaddress.ip_network(prefix, strict=False)
        v = net.version
        plen = net.prefixlen
        self._tables[v].setdefault(plen, {})[int(net.network_address)] = value
        self._lengths[v] = sorted(self._tables[v], reverse=True)

    def lookup(self, version: int, ip: int) -> T | None:
        """The value of the longest prefix containing ``ip`` (an int of IP ``version``)."""
        tables = self._tables.get(version)
        if not tables:
            return None
        bits = _BITS[version]
        for plen in self._lengths[version]:
            mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
            hit = tables[plen].get(ip & mask)
            if hit is not None:
                return hit
        return None

    def __len__(self) -> int:
        return sum(len(t) for v in self._tables.values() for t in v.values())
