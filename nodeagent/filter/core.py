"""The stateful packet filter: verdicts for packets entering (``check_in``) and leaving
(``check_out``) this host, given parsed headers only (sans-IO, no per-packet logging).

Outbound (host → peers) applies no ACL: every valid packet passes, and new flows are recorded so
their replies pass inbound — UDP and SCTP on every packet (which also keeps the flow fresh), TCP
only on a SYN without ACK, because inbound non-SYN TCP passes anyway and only a simultaneous open
needs the record.

Inbound (peers → host), in order:

1. not IPv4/IPv6 → ``DROP_INVALID``; destination outside ``local_prefixes`` → ``DROP_NOT_LOCAL``
   (a peer must not make us forward to addresses we never advertised).
2. Non-first fragment → ``ACCEPT`` (its ports are in the first fragment, which was judged; this
   is Tailscale's behaviour), or ``DROP_FRAGMENT`` when built with ``drop_fragments=True``.
   Unlike Tailscale, which passes fragments before its local-address check, the local check runs
   first here: a fragment for an address we do not own has nowhere legitimate to go.
3. TSMP → ``ACCEPT`` (agent-to-agent; the TUN wrapper normally consumes it before the filter).
4. TCP without "SYN set, ACK clear" → ``ACCEPT``: a new connection cannot start without that
   SYN, which is what gets judged; the connection state itself lives in the host's kernel.
5. ICMP responses → ``ACCEPT`` without flow state: echo reply, destination unreachable, time
   exceeded and parameter problem (ICMPv4 0, 3, 11, 12; ICMPv6 1, 2, 3, 4, 129). They are only
   harmful as answers to something, and the host's stack discards unsolicited ones. (Tailscale
   accepts echo replies and unreachable/time-exceeded; parameter problem is our addition.)
6. TCP SYN, UDP and SCTP whose reversed tuple is a flow we initiated → ``ACCEPT``.
7. Shields up → ``DROP_SHIELDS``.
8. Rule match → ``ACCEPT``, else ``DROP_ACL``. ICMP echo requests (and other non-response ICMP
   types) match by addresses and protocol with ports ignored; other portless protocols need a
   rule naming the protocol with an all-ports destination.

A ``Filter`` is immutable: rules, compiled matcher, local addresses, ``shields_up`` and
``drop_fragments`` are fixed when it is built, and setting or deleting any attribute raises
``AttributeError``. A policy push builds a new ``Filter`` (passing ``flows=`` so the flow table
carries over) and shields-up is a separate filter, :meth:`Filter.with_shields_up`; the TUN wrapper
installs either with one attribute store. The only mutable state a filter points at is shared on
purpose: the :class:`~nodeagent.filter.flows.FlowTable` (so replies to flows opened before a swap
still pass after it) and the verdict counters (shared between a filter and its shields twin, so
toggling shields-up does not reset them).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from nodeagent.filter.flows import FAMILY_V6, FlowKey, FlowTable
from nodeagent.filter.match import Matcher
from nodeagent.filter.rules import FilterRule, Network
from nodeagent.packet.parsed import (
    IPV4,
    IPV6,
    PROTO_FRAGMENT,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_TSMP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    Parsed,
)

ACCEPT = 0
DROP_ACL = 1
DROP_SHIELDS = 2
DROP_NOT_LOCAL = 3
DROP_INVALID = 4
DROP_FRAGMENT = 5

# Indexed by verdict; the names match the TUN wrapper's drop reasons.
VERDICT_NAMES: tuple[str, ...] = ("accept", "acl", "shields", "not_local", "invalid", "fragment")

ICMP4_RESPONSES = frozenset((0, 3, 11, 12))
ICMP6_RESPONSES = frozenset((1, 2, 3, 4, 129))

_SYN_ACK = TCP_SYN | TCP_ACK

# Per-family local address set: host addresses (one set probe) plus (mask, networks) for
# shorter prefixes such as subnet routes, probed only when the host set misses.
_LocalNets = tuple[tuple[int, frozenset[int]], ...]


def _local_sets(prefixes: Iterable[str | Network]) -> tuple[
    frozenset[int], _LocalNets, frozenset[int], _LocalNets
]:
    hosts: dict[int, set[int]] = {4: set(), 6: set()}
    nets: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
    for pfx in prefixes:
        try:
            n = ipaddress.ip_network(pfx, strict=False)
        except (ValueError, TypeError):
            raise ValueError(f"local prefix: bad prefix {pfx!r}") from None
        bits = n.max_prefixlen
        if n.prefixlen == bits:
            hosts[n.version].add(int(n.network_address))
        else:
            mask = ((1 << bits) - 1) ^ ((1 << (bits - n.prefixlen)) - 1)
            nets[n.version].setdefault(mask, set()).add(int(n.network_address))

    def freeze(v: int) -> _LocalNets:
        return tuple((m, frozenset(s)) for m, s in sorted(nets[v].items(), reverse=True))

    return frozenset(hosts[4]), freeze(4), frozenset(hosts[6]), freeze(6)


def _built(obj: object) -> bool:
    """Whether ``__init__`` already ran on ``obj`` (its matcher slot is filled)."""
    try:
        object.__getattribute__(obj, "matcher")
    except AttributeError:
        return False
    return True


def _in_nets(nets: _LocalNets, ip: int) -> bool:
    for mask, members in nets:
        if ip & mask in members:
            return True
    return False


_set = object.__setattr__


class Filter:
    """Inbound ACL + outbound flow tracking; immutable once built (see the module docstring).

    ``flows`` lets a replacement filter (new rules from a netmap update) keep the flow table of
    the one it replaces, so established UDP flows survive the update. Shields-up is a flag fixed
    at construction: :meth:`with_shields_up` gives the filter to swap in when it changes.
    """

    __slots__ = (
        "shields_up",
        "drop_fragments",
        "rules",
        "matcher",
        "flows",
        "_entries",
        "_lru_only",
        "_hosts4",
        "_nets4",
        "_hosts6",
        "_nets6",
        "_in",
        "_out",
    )

    shields_up: bool
    drop_fragments: bool
    rules: tuple[FilterRule, ...]
    matcher: Matcher
    flows: FlowTable
    _entries: OrderedDict[FlowKey, float]
    _lru_only: bool
    _hosts4: frozenset[int]
    _nets4: _LocalNets
    _hosts6: frozenset[int]
    _nets6: _LocalNets
    _in: list[int]
    _out: list[int]

    def __init__(
        self,
        rules: Iterable[FilterRule],
        local_prefixes: Iterable[str | Network],
        *,
        shields_up: bool = False,
        flow_capacity: int = 8192,
        clock: Callable[[], float] = time.monotonic,
        flow_ttl: float | None = None,
        drop_fragments: bool = False,
        flows: FlowTable | None = None,
    ) -> None:
        if _built(self):
            raise AttributeError("Filter is immutable: it cannot be initialised twice")
        frozen_rules = tuple(rules)
        table = flows if flows is not None else FlowTable(flow_capacity, ttl=flow_ttl, clock=clock)
        hosts4, nets4, hosts6, nets6 = _local_sets(local_prefixes)
        _set(self, "shields_up", bool(shields_up))
        _set(self, "drop_fragments", bool(drop_fragments))
        _set(self, "rules", frozen_rules)
        _set(self, "matcher", Matcher(frozen_rules))
        _set(self, "flows", table)
        # Hot-path shortcut: without a ttl a known flow only needs its recency bumped, done here
        # inline; anything else (new flow, eviction, ttl) goes through FlowTable's methods.
        _set(self, "_entries", table.entries)
        _set(self, "_lru_only", table.ttl is None)
        _set(self, "_hosts4", hosts4)
        _set(self, "_nets4", nets4)
        _set(self, "_hosts6", hosts6)
        _set(self, "_nets6", nets6)
        _set(self, "_in", [0] * len(VERDICT_NAMES))
        _set(self, "_out", [0] * len(VERDICT_NAMES))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(
            f"Filter is immutable: cannot set {name!r}; build a new Filter (or use "
            "with_shields_up) and swap it in whole")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Filter is immutable: cannot delete {name!r}")

    def with_shields_up(self, on: bool = True) -> Filter:
        """The filter to install when shields-up becomes ``on``: ``self`` if it already is, else a
        new Filter with the same rules, matcher, local addresses, flow table and counters.

        With shields up every new inbound connection is refused (``DROP_SHIELDS``); replies to
        flows this host opened, non-SYN TCP, ICMP responses, TSMP and (unless built with
        ``drop_fragments``) non-first fragments still pass."""
        on = bool(on)
        if on is self.shields_up:
            return self
        twin = object.__new__(Filter)
        for name in Filter.__slots__:
            _set(twin, name, object.__getattribute__(self, name))
        _set(twin, "shields_up", on)
        return twin

    def check_out(self, p: Parsed) -> int:
        """Verdict for a packet from this host toward a peer; records the flow it belongs to."""
        kind = p.kind
        if kind != IPV4 and kind != IPV6:
            self._out[DROP_INVALID] += 1
            return DROP_INVALID
        proto = p.proto
        if proto == PROTO_UDP or proto == PROTO_SCTP or (
            proto == PROTO_TCP and p.tcp_flags & _SYN_ACK == TCP_SYN
        ):
            key = (proto | FAMILY_V6 if kind == IPV6 else proto,
                   p.src_ip, p.src_port, p.dst_ip, p.dst_port)
            if self._lru_only and key in self._entries:
                self._entries.move_to_end(key)
            else:
                self.flows.record(key)
        self._out[ACCEPT] += 1
        return ACCEPT

    def check_in(self, p: Parsed) -> int:
        """Verdict for a packet from a peer toward this host (see the module docstring)."""
        kind = p.kind
        counts = self._in
        dst = p.dst_ip
        if kind == IPV4:
            if dst not in self._hosts4 and not (self._nets4 and _in_nets(self._nets4, dst)):
                counts[DROP_NOT_LOCAL] += 1
                return DROP_NOT_LOCAL
        elif kind == IPV6:
            if dst not in self._hosts6 and not (self._nets6 and _in_nets(self._nets6, dst)):
                counts[DROP_NOT_LOCAL] += 1
                return DROP_NOT_LOCAL
        else:
            counts[DROP_INVALID] += 1
            return DROP_INVALID
        proto = p.proto
        port = 0
        if proto == PROTO_TCP:
            if p.tcp_flags & _SYN_ACK != TCP_SYN:
                counts[ACCEPT] += 1
                return ACCEPT
            port = p.dst_port
        elif proto == PROTO_UDP or proto == PROTO_SCTP:
            port = p.dst_port
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            if p.icmp_type in (ICMP4_RESPONSES if proto == PROTO_ICMP else ICMP6_RESPONSES):
                counts[ACCEPT] += 1
                return ACCEPT
        elif proto == PROTO_FRAGMENT:
            v = DROP_FRAGMENT if self.drop_fragments else ACCEPT
            counts[v] += 1
            return v
        elif proto == PROTO_TSMP:
            counts[ACCEPT] += 1
            return ACCEPT
        if proto == PROTO_TCP or proto == PROTO_UDP or proto == PROTO_SCTP:
            key = (proto | FAMILY_V6 if kind == IPV6 else proto, dst, port, p.src_ip, p.src_port)
            if self._lru_only:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    counts[ACCEPT] += 1
                    return ACCEPT
            elif self.flows.seen(key):
                counts[ACCEPT] += 1
                return ACCEPT
        if self.shields_up:
            counts[DROP_SHIELDS] += 1
            return DROP_SHIELDS
        if self.matcher.match(kind, proto, p.src_ip, dst, port):
            counts[ACCEPT] += 1
            return ACCEPT
        counts[DROP_ACL] += 1
        return DROP_ACL

    def stats(self) -> dict[str, int]:
        """Counters: ``in_<verdict>`` / ``out_<verdict>`` packets, flow table size, evictions."""
        out: dict[str, int] = {}
        for direction, counts in (("in", self._in), ("out", self._out)):
            for name, n in zip(VERDICT_NAMES, counts, strict=True):
                out[f"{direction}_{name}"] = n
        out["flows"] = len(self.flows)
        out["flow_evictions"] = self.flows.evictions
        return out
