"""Where netcheck's STUN probes go and when (facts from Tailscale's ``net/netcheck``, see
``specs/reference/netcheck.md``): a DERP node's STUN target per address family
(:func:`stun_target`) and the probe plans, :func:`make_probe_plan_initial` (full reports) and
:func:`make_probe_plan` (incremental), sets named ``region-<id>-v4`` / ``region-<id>-v6``. Also
the families and time units every netcheck module uses (:data:`V4`, :data:`V6`, :data:`MS`,
:data:`SECOND`: latencies are integer nanoseconds). Sans-IO.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

if TYPE_CHECKING:
    from nodeagent.netcheck.report import Report

__all__ = [
    "DEFAULT_STUN_PORT",
    "MS",
    "SECOND",
    "V4",
    "V6",
    "Probe",
    "ProbePlan",
    "StunTarget",
    "make_probe_plan",
    "make_probe_plan_initial",
    "node_might4",
    "node_might6",
    "probe_set_name",
    "sorted_regions",
    "stun_port",
    "stun_target",
]

V4 = 4
V6 = 6
MS = 1_000_000  # nanoseconds
SECOND = 1_000_000_000

DEFAULT_STUN_PORT = 3478
INITIAL_TRIES = 3  # per family and region in a full report
INITIAL_TRY_SPACING = 100 * MS
INCREMENTAL_REGIONS = 3
DEFAULT_ACTIVE_RETRANSMIT = 200 * MS
RETRY_EXTRA = 50 * MS


# --- where STUN goes -----------------------------------------------------------------------------


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def node_might4(node: DERPNode) -> bool:
    """The node may speak IPv4: no forced IPv4 value, or an IPv4 address there."""
    return node.IPv4 == "" or isinstance(_ip(node.IPv4), ipaddress.IPv4Address)


def node_might6(node: DERPNode) -> bool:
    return node.IPv6 == "" or isinstance(_ip(node.IPv6), ipaddress.IPv6Address)


def stun_port(node: DERPNode) -> int | None:
    """The node's STUN port: ``STUNPort``, 0 → 3478; None (no STUN) when negative or > 65535."""
    if node.STUNPort == 0:
        return DEFAULT_STUN_PORT
    if 0 < node.STUNPort <= 0xFFFF:
        return node.STUNPort
    return None


@dataclass(frozen=True)
class StunTarget:
    """Where one STUN probe goes: ``host`` is an IP literal, or a DNS name to look up in the
    probe's family when ``resolve`` is true."""

    host: str
    port: int
    resolve: bool = False


def stun_target(node: DERPNode, family: int) -> StunTarget | None:
    """The STUN destination of ``node`` for ``family`` (4 or 6), or None when it has none:
    ``STUNTestIP`` if set (only in its own family), else the forced ``IPv4``/``IPv6`` (a non-IP
    value disables the family), else an IP-literal ``HostName``, else a lookup of ``HostName``."""
    port = stun_port(node)
    if port is None:
        return None
    want = ipaddress.IPv4Address if family == V4 else ipaddress.IPv6Address
    if node.STUNTestIP:
        ip = _ip(node.STUNTestIP)
        return StunTarget(str(ip), port) if isinstance(ip, want) else None
    forced = node.IPv4 if family == V4 else node.IPv6
    if forced:
        ip = _ip(forced)
        return StunTarget(str(ip), port) if isinstance(ip, want) else None
    if not node.HostName:
        return None
    ip = _ip(node.HostName)
    if ip is not None:
        return StunTarget(str(ip), port) if isinstance(ip, want) else None
    return StunTarget(node.HostName, port, resolve=True)


# --- the probe plan ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Probe:
    """One STUN probe: after ``delay`` seconds, to ``node`` of region ``region`` over
    ``family`` (4 or 6)."""

    delay: float
    region: int
    node: DERPNode
    family: int

    @property
    def set_name(self) -> str:
        return probe_set_name(self.region, self.family)

    def __repr__(self) -> str:
        return (f"Probe(delay={self.delay:g}, region={self.region}, node={self.node.Name!r}, "
                f"family=v{self.family})")


ProbePlan = dict[str, list[Probe]]  # set name → probes in firing order


def probe_set_name(region: int, family: int) -> str:
    return f"region-{region}-v{family}"


def _add_sets(plan: ProbePlan, region: int, p4: list[Probe], p6: list[Probe]) -> None:
    if p4:
        plan[probe_set_name(region, V4)] = p4
    if p6:
        plan[probe_set_name(region, V6)] = p6


def make_probe_plan_initial(dm: DERPMap, *, have_v4: bool, have_v6: bool) -> ProbePlan:
    """The full plan: every region with nodes except ``NoMeasureNoHome`` ones (``Avoid`` ones
    are measured), 3 tries per family; try t goes to node t mod (node count) after t * 100 ms.
    A family is probed when the host has it (test nodes: always) and the node may speak it."""
    plan: ProbePlan = {}
    for rid, reg in sorted(dm.Regions.items()):
        if reg.NoMeasureNoHome or not reg.Nodes:
            continue
        p4: list[Probe] = []
        p6: list[Probe] = []
        for t in range(INITIAL_TRIES):
            n = reg.Nodes[t % len(reg.Nodes)]
            delay = t * INITIAL_TRY_SPACING / SECOND
            test = n.is_test_node()
            if (have_v4 or test) and node_might4(n):
                p4.append(Probe(delay, rid, n, V4))
            if (have_v6 or test) and node_might6(n):
                p6.append(Probe(delay, rid, n, V6))
        _add_sets(plan, rid, p4, p6)
    return plan


def sorted_regions(dm: DERPMap, last: Report) -> list[tuple[int, DERPRegion]]:
    """Regions an incremental report may probe, fastest in ``last`` first (unmeasured last, by
    ID): without ``NoMeasureNoHome`` ones, ``Avoid`` ones unless home, and empty ones."""
    home = last.PreferredDERP
    regions = [(rid, reg) for rid, reg in dm.Regions.items()
               if reg.Nodes and not reg.NoMeasureNoHome and (not reg.Avoid or rid == home)]

    def key(item: tuple[int, DERPRegion]) -> tuple[int, int, int]:
        rid = item[0]
        lat = last.RegionLatency.get(rid)
        return (0, lat, rid) if lat is not None else (1, 0, rid)

    return sorted(regions, key=key)


def make_probe_plan(dm: DERPMap, *, have_v4: bool, have_v6: bool,
                    last: Report | None) -> ProbePlan:
    """The incremental plan from the last report (the full plan when there is none or it has
    no latencies): the 3 fastest regions and the home; 1 try each, 2 for the fastest two, 4 for
    the home; try t after t * (1.2 * last latency, or 200 ms) plus t * 50 ms when t > 1. On a
    dual-stack host whose last report had both families, the 3rd and slower regions alternate
    (even sorted index IPv4 only, odd IPv6 only); without IPv6 results last time, IPv6 is
    dropped for non-home regions beyond the fastest two and for every retry."""
    if last is None or not last.RegionLatency:
        return make_probe_plan_initial(dm, have_v4=have_v4, have_v6=have_v6)
    plan: ProbePlan = {}
    had4 = bool(last.RegionV4Latency)
    had6 = bool(last.RegionV6Latency)
    had_both = have_v6 and had4 and had6
    home = last.PreferredDERP
    for ri, (rid, reg) in enumerate(sorted_regions(dm, last)):
        is_home = rid == home
        if ri >= INCREMENTAL_REGIONS and not is_home:
            continue
        fastest_two = ri < 2
        do4, do6 = True, True
        tries = 2 if fastest_two else 1
        if not fastest_two and had_both:
            do4, do6 = (True, False) if ri % 2 == 0 else (False, True)
        if not fastest_two and not had6 and not is_home:
            do6 = False
        if is_home:
            tries = 4
        prev = last.RegionLatency.get(rid, 0) * 120 // 100 or DEFAULT_ACTIVE_RETRANSMIT
        p4: list[Probe] = []
        p6: list[Probe] = []
        for t in range(tries):
            n = reg.Nodes[t % len(reg.Nodes)]
            delay_ns = t * prev + (t * RETRY_EXTRA if t > 1 else 0)
            delay = delay_ns / SECOND
            test = n.is_test_node()
            if do4 and (have_v4 or test) and node_might4(n):
                p4.append(Probe(delay, rid, n, V4))
            if do6 and (t == 0 or had6) and (have_v6 or test) and node_might6(n):
                p6.append(Probe(delay, rid, n, V6))
        _add_sets(plan, rid, p4, p6)
    return plan
