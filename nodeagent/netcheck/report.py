"""Sans-IO netcheck core: the network report and the result bookkeeping of one report in
progress.

Owns (facts from Tailscale's ``net/netcheck``, see ``specs/reference/netcheck.md``):

- :class:`Report` with Tailscale's JSON names; :meth:`Report.to_json` gives Tailscale's exact
  encodings (RFC 3339 ``Now``, latencies as integer nanoseconds keyed by region ID strings,
  ``null`` for unknown tri-state fields and for empty ``Global*Counters``);
- :class:`ReportBuilder`: which probe still helps, matching STUN replies by transaction ID
  (never raises), per-region/family minimum latencies, ``GlobalV4``/``V6`` and their counters,
  ``MappingVariesByDestIP`` (needs two IPv4 replies), the early-stop delay, HTTPS latencies.

The probe plans and STUN targets are :mod:`nodeagent.netcheck.plan`, the history and home-DERP
choice :mod:`nodeagent.netcheck.history`, the CLI's text form :mod:`nodeagent.netcheck.text`;
their public names are re-exported here.

Time: latencies are integer nanoseconds (Go's ``time.Duration``); "now" values passed to the
builder are monotonic nanoseconds; the history's clock returns seconds. No sockets, no asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from nodeagent.netcheck.history import (
    FULL_REPORT_INTERVAL,
    HISTORY_MAX_AGE,
    ReportHistory,
    keep_min,
)
from nodeagent.netcheck.plan import (
    DEFAULT_STUN_PORT,
    MS,
    SECOND,
    V4,
    V6,
    Probe,
    ProbePlan,
    StunTarget,
    make_probe_plan,
    make_probe_plan_initial,
    node_might4,
    node_might6,
    stun_target,
)
from nodeagent.netcheck.text import (
    GO_ZERO_TIME,
    format_go_duration,
    format_rfc3339nano,
    render_text,
    round_duration,
)
from nodeagent.stun.codec import is_stun, parse_binding_response
from nodeagent.tailcfg import DERPMap

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
    "round_duration",
    "stun_target",
]

WAIT_REGIONS = 3  # early stop once this many regions answered (100 in verbose mode)
WAIT_REGIONS_VERBOSE = 100


# --- the report --------------------------------------------------------------------------------


def _parse_rfc3339(text: Any) -> datetime | None:
    if not isinstance(text, str):
        raise ValueError("Now: expected an RFC 3339 string")
    if text == GO_ZERO_TIME:
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


# --- bookkeeping -------------------------------------------------------------------------------


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"




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
        keep_min(r.RegionLatency, region, latency_ns)
        ep = _endpoint_text(host, port)
        if ":" in host:
            keep_min(r.RegionV6Latency, region, latency_ns)
            r.IPv6 = True
            r.GlobalV6 = ep
            r.GlobalV6Counters[ep] = r.GlobalV6Counters.get(ep, 0) + 1
        else:
            keep_min(r.RegionV4Latency, region, latency_ns)
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
        keep_min(r.RegionLatency, region, latency_ns)
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
