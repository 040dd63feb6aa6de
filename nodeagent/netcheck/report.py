"""Sans-IO netcheck core: the network report, the probe plan, result bookkeeping, the home-DERP
choice, and the ``tailscale netcheck`` text form.

Owns (facts from Tailscale's ``net/netcheck`` and ``cmd/tailscale/cli/netcheck.go``, see
``specs/reference/netcheck.md``):

- :class:`Report` with Tailscale's JSON names; :meth:`Report.to_json` gives Tailscale's exact
  encodings (RFC 3339 ``Now``, latencies as integer nanoseconds keyed by region ID strings,
  ``null`` for unknown tri-state fields and for empty ``Global*Counters``);
- the probe plans: :func:`make_probe_plan_initial` (full reports) and :func:`make_probe_plan`
  (incremental), sets named ``region-<id>-v4`` / ``region-<id>-v6``;
- :class:`ReportBuilder`: which probe still helps, matching STUN replies by transaction ID
  (never raises), per-region/family minimum latencies, ``GlobalV4``/``V6`` and their counters,
  ``MappingVariesByDestIP`` (needs two IPv4 replies), the early-stop delay, HTTPS latencies;
- :class:`ReportHistory`: full-or-incremental, 5 minutes of history and ``PreferredDERP`` with
  Tailscale's hysteresis, on an injectable clock;
- :func:`render_text`: the CLI's text report, with Go's duration form for latencies.

Time: latencies are integer nanoseconds (Go's ``time.Duration``); "now" values passed to the
builder are monotonic nanoseconds; the history's clock returns seconds. No sockets, no asyncio.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from nodeagent.stun.codec import is_stun, parse_binding_response
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

__all__ = [
    "DEFAULT_STUN_PORT",
    "FULL_REPORT_INTERVAL",
    "HISTORY_MAX_AGE",
    "MS",
    "SECOND",
    "V4",
    "V6",
    "Probe",
    "ProbePlan",
    "Report",
    "ReportBuilder",
    "ReportHistory",
    "StunTarget",
    "format_go_duration",
    "format_rfc3339nano",
    "global_addrs",
    "make_probe_plan",
    "make_probe_plan_initial",
    "node_might4",
    "node_might6",
    "render_text",
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
WAIT_REGIONS = 3  # early stop once this many regions answered (100 in verbose mode)
WAIT_REGIONS_VERBOSE = 100

HISTORY_MAX_AGE = 300.0  # seconds of reports kept for PreferredDERP
FULL_REPORT_INTERVAL = 300.0  # a full report at least this often
PREFERRED_DERP_FRAME_TIME = 8.0  # a DERP frame this recent keeps the old home "accessible"
PREFERRED_DERP_ABSOLUTE_DIFF = 10 * MS
DERP_KEEP_HOME_WITHOUT_LATENCY = 120.0  # 2 * DERP keep-alive

_GO_ZERO_TIME = "0001-01-01T00:00:00Z"


# --- the report --------------------------------------------------------------------------------


def format_rfc3339nano(when: datetime | None) -> str:
    """Go's ``time.RFC3339Nano`` of ``when`` in UTC: fraction without trailing zeros (none at
    all when whole), ``Z``. ``None`` is Go's zero time. A naive datetime is taken as UTC."""
    if when is None:
        return _GO_ZERO_TIME
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    text = f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:" \
           f"{when.minute:02d}:{when.second:02d}"
    if when.microsecond:
        text += "." + f"{when.microsecond:06d}".rstrip("0")
    return text + "Z"


def _parse_rfc3339(text: Any) -> datetime | None:
    if not isinstance(text, str):
        raise ValueError("Now: expected an RFC 3339 string")
    if text == _GO_ZERO_TIME:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"Now: {text!r} is not RFC 3339") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def _latencies_json(m: Mapping[int, int]) -> dict[str, int]:
    # Go writes map[int]Duration with the keys as decimal strings, sorted as strings.
    return {k: m[int(k)] for k in sorted(str(r) for r in m)}


def _latencies_from(v: Any, name: str) -> dict[int, int]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{name}: expected an object")
    out: dict[int, int] = {}
    for k, d in v.items():
        try:
            rid = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: key {k!r} is not a region ID") from None
        if isinstance(d, bool) or not isinstance(d, int):
            raise ValueError(f"{name}[{k}]: expected integer nanoseconds")
        out[rid] = d
    return out


def _counters_from(v: Any, name: str) -> dict[str, int]:
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool)
            for k, n in v.items()):
        raise ValueError(f"{name}: expected an object of counts")
    return dict(v)


_BOOLS = ("UDP", "IPv6", "IPv4", "IPv6CanSend", "IPv4CanSend", "OSHasIPv6", "ICMPv4")
_OPT_BOOLS = ("MappingVariesByDestIP", "UPnP", "PMP", "PCP", "CaptivePortal")


@dataclass
class Report:
    """A network report (Tailscale's ``netcheck.Report``). Latencies are nanoseconds; ``None``
    in a tri-state field means "unknown / not checked"."""

    Now: datetime | None = None  # when the report was finished (UTC)
    UDP: bool = False  # a STUN reply arrived (any family)
    IPv6: bool = False  # an IPv6 round trip completed (STUN or HTTPS)
    IPv4: bool = False  # likewise IPv4 (or ICMP)
    IPv6CanSend: bool = False  # a STUN packet of that family left without (fatal) error
    IPv4CanSend: bool = False
    OSHasIPv6: bool = False  # a UDP socket could be bound to [::1]:0
    ICMPv4: bool = False
    MappingVariesByDestIP: bool | None = None
    UPnP: bool | None = None
    PMP: bool | None = None
    PCP: bool | None = None
    PreferredDERP: int = 0  # home region ID, 0 = none
    RegionLatency: dict[int, int] = field(default_factory=dict)
    RegionV4Latency: dict[int, int] = field(default_factory=dict)
    RegionV6Latency: dict[int, int] = field(default_factory=dict)
    GlobalV4Counters: dict[str, int] = field(default_factory=dict)
    GlobalV6Counters: dict[str, int] = field(default_factory=dict)
    GlobalV4: str = ""  # "ip:port" of the first IPv4 reply
    GlobalV6: str = ""  # "[ip]:port" of the last IPv6 reply
    CaptivePortal: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The report as Tailscale encodes it (field order and encodings of Go's JSON)."""
        return {
            "Now": format_rfc3339nano(self.Now),
            "UDP": self.UDP,
            "IPv6": self.IPv6,
            "IPv4": self.IPv4,
            "IPv6CanSend": self.IPv6CanSend,
            "IPv4CanSend": self.IPv4CanSend,
            "OSHasIPv6": self.OSHasIPv6,
            "ICMPv4": self.ICMPv4,
            "MappingVariesByDestIP": self.MappingVariesByDestIP,
            "UPnP": self.UPnP,
            "PMP": self.PMP,
            "PCP": self.PCP,
            "PreferredDERP": self.PreferredDERP,
            "RegionLatency": _latencies_json(self.RegionLatency),
            "RegionV4Latency": _latencies_json(self.RegionV4Latency),
            "RegionV6Latency": _latencies_json(self.RegionV6Latency),
            "GlobalV4Counters": dict(sorted(self.GlobalV4Counters.items())) or None,
            "GlobalV6Counters": dict(sorted(self.GlobalV6Counters.items())) or None,
            "GlobalV4": self.GlobalV4,
            "GlobalV6": self.GlobalV6,
            "CaptivePortal": self.CaptivePortal,
        }

    @classmethod
    def from_json(cls, data: Any) -> Report:
        """A report from its JSON object (ours or Tailscale's); ``ValueError`` naming the field
        when a known field has the wrong type. Unknown fields are ignored."""
        if not isinstance(data, dict):
            raise ValueError("report: expected an object")
        r = cls(Now=_parse_rfc3339(data["Now"]) if "Now" in data else None)
        for name in _BOOLS:
            v = data.get(name, False)
            if not isinstance(v, bool):
                raise ValueError(f"{name}: expected true or false")
            setattr(r, name, v)
        for name in _OPT_BOOLS:
            v = data.get(name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"{name}: expected true, false or null")
            setattr(r, name, v)
        pd = data.get("PreferredDERP", 0)
        if isinstance(pd, bool) or not isinstance(pd, int):
            raise ValueError("PreferredDERP: expected an integer")
        r.PreferredDERP = pd
        for name in ("RegionLatency", "RegionV4Latency", "RegionV6Latency"):
            setattr(r, name, _latencies_from(data.get(name), name))
        for name in ("GlobalV4Counters", "GlobalV6Counters"):
            setattr(r, name, _counters_from(data.get(name), name))
        for name in ("GlobalV4", "GlobalV6"):
            v = data.get(name, "")
            if not isinstance(v, str):
                raise ValueError(f"{name}: expected a string")
            setattr(r, name, v)
        return r

    def copy(self) -> Report:
        """A copy whose maps are not shared with this report."""
        return replace(self, RegionLatency=dict(self.RegionLatency),
                       RegionV4Latency=dict(self.RegionV4Latency),
                       RegionV6Latency=dict(self.RegionV6Latency),
                       GlobalV4Counters=dict(self.GlobalV4Counters),
                       GlobalV6Counters=dict(self.GlobalV6Counters))

    def any_port_mapping_checked(self) -> bool:
        return self.UPnP is not None or self.PMP is not None or self.PCP is not None


def global_addrs(report: Report) -> list[str]:
    """This host's own addresses as magicsock advertises them: ``GlobalV4`` plus other IPv4
    mapped addresses seen more than once, then the same for IPv6."""
    out: list[str] = []
    for first, counters in ((report.GlobalV4, report.GlobalV4Counters),
                            (report.GlobalV6, report.GlobalV6Counters)):
        if first:
            out.append(first)
        out.extend(a for a, n in sorted(counters.items()) if n > 1 and a != first)
    return out


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


# --- bookkeeping -------------------------------------------------------------------------------


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _keep_min(m: dict[int, int], region: int, d: int) -> None:
    prev = m.get(region)
    if prev is None or d < prev:
        m[region] = d


class ReportBuilder:
    """One report in progress: probes in flight, sets done, results. The asyncio adapter asks
    :meth:`should_fire` before each probe, records it with :meth:`note_sent`, feeds every
    STUN-looking datagram to :meth:`receive` and ends with :meth:`finish`."""

    def __init__(self, plan: ProbePlan, *, full: bool = True, verbose: bool = False) -> None:
        self.plan = plan
        self.full = full
        self.report = Report()
        self.wait_regions = WAIT_REGIONS_VERBOSE if verbose else WAIT_REGIONS
        self._inflight: dict[bytes, tuple[Probe, int]] = {}
        self._done: set[str] = set()
        self._unsendable: dict[str, int] = {}
        self._early_stop: int | None = None
        self._early_stop_taken = False
        self.finished = False

    # probes

    def would_help(self, probe: Probe) -> bool:
        """A probe helps if its region has no latency yet, or it is IPv6 and there is no IPv6
        result yet, or it is IPv4 and ``MappingVariesByDestIP`` is still unknown."""
        r = self.report
        if probe.region not in r.RegionLatency:
            return True
        if probe.family == V6 and not r.RegionV6Latency:
            return True
        return probe.family == V4 and r.MappingVariesByDestIP is None

    def should_fire(self, probe: Probe) -> bool:
        """Called when a probe's delay has passed: False if its set is done, or (cancelling the
        set) if it would not help any more."""
        name = probe.set_name
        if self.finished or name in self._done:
            return False
        if not self.would_help(probe):
            self._done.add(name)
            return False
        return True

    def note_sent(self, probe: Probe, txid: bytes, sent_ns: int) -> None:
        """The request with ``txid`` is about to go out (record before sending, so that even
        an immediate reply matches)."""
        self._inflight[bytes(txid)] = (probe, sent_ns)

    def note_send_result(self, probe: Probe, txid: bytes, ok: bool) -> None:
        """How the send went: ``ok`` (or an error meaning "lost UDP") sets ``IPv4CanSend`` /
        ``IPv6CanSend``; a failed send counts as a probe that could not be sent."""
        if ok:
            if probe.family == V4:
                self.report.IPv4CanSend = True
            else:
                self.report.IPv6CanSend = True
            return
        self._inflight.pop(bytes(txid), None)
        self.note_unsendable(probe)

    def note_unsendable(self, probe: Probe) -> None:
        """The probe had no address (negative STUNPort, failed lookup) or could not be sent.
        A set none of whose probes could be sent is done: there is nothing to wait for."""
        name = probe.set_name
        n = self._unsendable.get(name, 0) + 1
        self._unsendable[name] = n
        if n >= len(self.plan.get(name, ())):
            self._done.add(name)

    def cancel_set(self, name: str) -> None:
        self._done.add(name)

    def set_done(self, name: str) -> bool:
        return name in self._done

    def all_sets_done(self) -> bool:
        return all(name in self._done for name in self.plan)

    # replies

    def receive(self, data: bytes | bytearray | memoryview, now_ns: int) -> bool:
        """Offer one datagram; True if it was the reply to one of our probes (and was
        recorded). Anything else — not STUN, malformed, unknown or repeated transaction ID, a
        reply after :meth:`finish` — is ignored. Never raises."""
        if self.finished or not is_stun(data):
            return False
        try:
            txid, host, port = parse_binding_response(bytes(data))
        except ValueError:
            return False
        entry = self._inflight.pop(txid, None)
        if entry is None:
            return False
        probe, sent_ns = entry
        self.add_node_latency(probe.region, host, port, max(0, now_ns - sent_ns))
        self._done.add(probe.set_name)  # the first reply of a set ends it
        return True

    def add_node_latency(self, region: int, host: str, port: int, latency_ns: int) -> None:
        """A STUN reply from ``region`` naming this host's mapped ``host:port`` after
        ``latency_ns``. The mapped address's family decides which family it counts for."""
        r = self.report
        r.UDP = True
        _keep_min(r.RegionLatency, region, latency_ns)
        ep = _endpoint_text(host, port)
        if ":" in host:
            _keep_min(r.RegionV6Latency, region, latency_ns)
            r.IPv6 = True
            r.GlobalV6 = ep
            r.GlobalV6Counters[ep] = r.GlobalV6Counters.get(ep, 0) + 1
        else:
            _keep_min(r.RegionV4Latency, region, latency_ns)
            r.IPv4 = True
            r.GlobalV4Counters[ep] = r.GlobalV4Counters.get(ep, 0) + 1
            if not r.GlobalV4:
                r.GlobalV4 = ep
            elif ep != r.GlobalV4:
                r.MappingVariesByDestIP = True
            elif r.MappingVariesByDestIP is None:
                r.MappingVariesByDestIP = False
        if len(r.RegionLatency) == self.wait_regions and self._early_stop is None:
            wait = max(r.RegionLatency.values())
            self._early_stop = wait * 2 if self.full else wait

    def take_early_stop(self) -> int | None:
        """Once: nanoseconds to keep waiting for the other regions, after the third region
        (100th in verbose mode) answered — the slowest latency so far, doubled for a full
        report. None before that, and after it was taken."""
        if self._early_stop is None or self._early_stop_taken:
            return None
        self._early_stop_taken = True
        return self._early_stop

    def add_https_latency(self, region: int, latency_ns: int, family: int) -> None:
        """An HTTPS (or HTTP) latency check of ``region`` over ``family`` succeeded; ``UDP``
        stays as it is."""
        r = self.report
        _keep_min(r.RegionLatency, region, latency_ns)
        if family == V6:
            r.IPv6 = True
        else:
            r.IPv4 = True

    def https_regions(self, dm: DERPMap) -> list[int]:
        """Regions for the HTTPS latency fallback: no latency yet, at least one non-STUNOnly
        node, neither ``Avoid`` nor ``NoMeasureNoHome``."""
        return [rid for rid, reg in sorted(dm.Regions.items())
                if rid not in self.report.RegionLatency and not reg.Avoid
                and not reg.NoMeasureNoHome and any(not n.STUNOnly for n in reg.Nodes)]

    def finish(self, now: datetime | None = None) -> Report:
        """Stop accepting replies and return the report with ``Now`` set."""
        self.finished = True
        self._inflight.clear()
        self.report.Now = now if now is not None else datetime.now(UTC)
        return self.report


# --- history and the home region ---------------------------------------------------------------


class ReportHistory:
    """Reports of the last 5 minutes and the choice of ``PreferredDERP`` with hysteresis
    (Tailscale's ``addReportHistoryAndSetPreferredDERP``). ``clock`` returns seconds
    (monotonic by default); DERP-frame times and ``started`` use the same clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: Report | None = None
        self.last_full: float | None = None
        self.force_region = 0  # debug "force prefer DERP"
        self._prev: list[tuple[float, Report]] = []
        self._derp_frame: dict[int, float] = {}
        self._want_full = False

    def request_full(self) -> None:
        self._want_full = True

    def next_is_full(self) -> bool:
        """Whether the next report is full: the first, a requested one, > 5 min since the last
        full one, or after a report with no UDP and a captive portal."""
        if self.last is None or self._want_full or self.last_full is None:
            return True
        if self.clock() - self.last_full > FULL_REPORT_INTERVAL:
            return True
        return not self.last.UDP and self.last.CaptivePortal is True

    def note_derp_frame(self, region: int, at: float | None = None) -> None:
        """A DERP frame arrived from ``region`` (at ``at``, default now)."""
        self._derp_frame[region] = self.clock() if at is None else at

    def _heard_from(self, region: int, since: float) -> bool:
        t = self._derp_frame.get(region)
        return t is not None and t >= since

    def add_report(self, report: Report, dm: DERPMap | None, *, full: bool = False,
                   started: float | None = None) -> int:
        """Remember ``report``, set its ``PreferredDERP`` and return it. ``started`` is when the
        report began (this clock); ``full`` records a full report's time."""
        now = self.clock()
        if started is None:
            started = now
        self._prev = [(t, r) for t, r in self._prev if now - t <= HISTORY_MAX_AGE]
        self._prev.append((now, report))
        prev_derp = self.last.PreferredDERP if self.last is not None else 0
        scores = dm.HomeParams.RegionScore if dm is not None and dm.HomeParams else {}

        def scaled(rid: int, d: int) -> int:
            s = scores.get(rid, 0.0)
            return int(d * s) if s > 0 else d

        best_recent: dict[int, int] = {}
        for _, r in self._prev:
            for rid, d in r.RegionLatency.items():
                _keep_min(best_recent, rid, scaled(rid, d))

        preferred = 0
        best_any = 0
        old_cur = 0
        for rid, d in sorted(report.RegionLatency.items()):
            if rid == prev_derp:
                old_cur = scaled(rid, d)
            best = best_recent[rid]
            if preferred == 0 or best < best_any:
                best_any, preferred = best, rid

        def accessible(rid: int) -> bool:
            return rid in report.RegionLatency or self._heard_from(rid, started) or \
                self._heard_from(rid, now - PREFERRED_DERP_FRAME_TIME)

        if prev_derp and preferred != prev_derp and accessible(prev_derp):
            if old_cur - best_any < PREFERRED_DERP_ABSOLUTE_DIFF or \
                    best_any > old_cur // 3 * 2:
                preferred = prev_derp
        if self.force_region and accessible(self.force_region):
            preferred = self.force_region
        if preferred == 0 and prev_derp and \
                self._heard_from(prev_derp, now - DERP_KEEP_HOME_WITHOUT_LATENCY):
            preferred = prev_derp

        report.PreferredDERP = preferred
        self.last = report
        if full:
            self.last_full = now
            self._want_full = False
        return preferred


# --- text --------------------------------------------------------------------------------------


def _frac(v: int, prec: int) -> tuple[str, int]:
    """Go's fmtFrac: the fraction of v / 10**prec without trailing zeros (no dot when zero)."""
    digits = ""
    printed = False
    for _ in range(prec):
        d = v % 10
        printed = printed or d != 0
        if printed:
            digits = str(d) + digits
        v //= 10
    return ("." + digits if printed else ""), v


def format_go_duration(ns: int) -> str:
    """Go's ``time.Duration.String``: ``0s``, ``750ns``, ``1.5µs``, ``12.3ms``, ``1.2s``,
    ``1m30s``, ``2h0m0s``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < SECOND:
        if u < 1_000:
            return f"{sign}{u}ns"
        if u < MS:
            frac, whole = _frac(u, 3)
            return f"{sign}{whole}{frac}µs"
        frac, whole = _frac(u, 6)
        return f"{sign}{whole}{frac}ms"
    frac, u = _frac(u, 9)
    text = f"{u % 60}{frac}s"
    u //= 60
    if u:
        text = f"{u % 60}m{text}"
        u //= 60
        if u:
            text = f"{u}h{text}"
    return sign + text


def round_duration(ns: int, m: int) -> int:
    """Go's ``Duration.Round``: to the nearest multiple of ``m``, halves away from zero."""
    if m <= 0:
        return ns
    r = abs(ns) % m
    mag = abs(ns) - r if r + r < m else abs(ns) + m - r
    return -mag if ns < 0 else mag


def _tri(v: bool | None) -> str:
    return "" if v is None else ("true" if v else "false")


def _port_mapping(r: Report) -> str:
    if not r.any_port_mapping_checked():
        return "not checked"
    return ", ".join(name for name, v in (("UPnP", r.UPnP), ("NAT-PMP", r.PMP), ("PCP", r.PCP))
                     if v)


def render_text(report: Report, derpmap: DERPMap | None, verbose: bool = False) -> str:
    """``tailscale netcheck``'s text report (specs/reference/netcheck.md §8), byte for byte."""
    r = report
    regions = derpmap.Regions if derpmap is not None else {}
    out = ["", "Report:", f"\t* Time: {format_rfc3339nano(r.Now)}",
           f"\t* UDP: {_tri(r.UDP)}"]
    out.append(f"\t* IPv4: yes, {r.GlobalV4}" if r.GlobalV4 else "\t* IPv4: (no addr found)")
    if r.GlobalV6:
        out.append(f"\t* IPv6: yes, {r.GlobalV6}")
    elif r.IPv6:
        out.append("\t* IPv6: (no addr found)")
    elif r.OSHasIPv6:
        out.append("\t* IPv6: no, but OS has support")
    else:
        out.append("\t* IPv6: no, unavailable in OS")
    out.append(f"\t* MappingVariesByDestIP: {_tri(r.MappingVariesByDestIP)}")
    out.append(f"\t* PortMapping: {_port_mapping(r)}")
    if r.CaptivePortal is not None:
        out.append(f"\t* CaptivePortal: {_tri(r.CaptivePortal)}")
    if not r.RegionLatency:
        out.append("\t* Nearest DERP: unknown (no response to latency probes)")
    else:
        if r.PreferredDERP == 0:
            out.append("\t* Nearest DERP: [none]")
        elif r.PreferredDERP in regions:
            out.append(f"\t* Nearest DERP: {regions[r.PreferredDERP].RegionName}")
        else:
            out.append(f"\t* Nearest DERP: {r.PreferredDERP} (region not found in map)")
        out.append("\t* DERP latency:")

        def order(rid: int) -> tuple[int, int, int]:
            lat = r.RegionLatency.get(rid)
            return (0, lat, rid) if lat is not None else (1, 0, rid)

        for rid in sorted(regions, key=order):
            reg = regions[rid]
            lat = r.RegionLatency.get(rid)
            text = "" if lat is None else format_go_duration(round_duration(lat, MS // 10))
            num = f"derp{rid}, " if verbose else ""
            out.append(f"\t\t- {reg.RegionCode:>3}: {text:<7} ({num}{reg.RegionName})")
    return "\n".join(out) + "\n"

