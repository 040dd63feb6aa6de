"""netcheck's text forms, as Go writes them: ``tailscale netcheck``'s report
(:func:`render_text`, byte for byte, see ``specs/reference/netcheck.md`` §8), Go's
``time.Duration`` text (:func:`format_go_duration`, :func:`round_duration`) and RFC 3339 with
nanoseconds (:func:`format_rfc3339nano`, used by the report's JSON). Sans-IO.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nodeagent.netcheck.plan import MS, SECOND
from nodeagent.tailcfg import DERPMap

if TYPE_CHECKING:
    from nodeagent.netcheck.report import Report

__all__ = ["GO_ZERO_TIME", "format_go_duration", "format_rfc3339nano", "render_text",
           "round_duration"]

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def format_rfc3339nano(when: datetime | None) -> str:
    """Go's ``time.RFC3339Nano`` of ``when`` in UTC: fraction without trailing zeros (none at
    all when whole), ``Z``. ``None`` is Go's zero time. A naive datetime is taken as UTC."""
    if when is None:
        return GO_ZERO_TIME
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    text = f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}:" \
           f"{when.minute:02d}:{when.second:02d}"
    if when.microsecond:
        text += "." + f"{when.microsecond:06d}".rstrip("0")
    return text + "Z"


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
