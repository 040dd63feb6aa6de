"""How derpprobe shows results: the ``--once`` text table, the per-node summary and the HTML
status page. Pure functions of :class:`~.probes.ProbeResult` lists; no I/O.

The page is one table, one row per node: login, mesh, STUN, packet round trip, TLS certificate
(days left), latency (the packet round trip) and the last error seen. A row's class is its
health: ``ok`` (every probe passed), ``fail`` (any probe failed) or ``unknown`` (not probed
yet). Plain HTML and CSS; it reloads itself with a ``<meta http-equiv="refresh">``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from nodeagent_derper.derpprobe.probes import (
    FAIL,
    LOGIN,
    MESH,
    OK,
    PACKET,
    PROBES,
    SKIP,
    STUN,
    TLS,
    ProbeResult,
)

__all__ = ["Cell", "NodeRow", "node_rows", "render_page", "render_table", "summary_line"]

HEALTH_OK, HEALTH_FAIL, HEALTH_UNKNOWN = "ok", "fail", "unknown"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.1f} ms"


def probe_label(r: ProbeResult) -> str:
    return f"{r.probe} to {r.peer}" if r.peer else r.probe


def _detail(r: ProbeResult) -> str:
    if r.error:
        return r.error
    if r.probe == TLS and r.cert_days_left is not None:
        return f"certificate valid for {r.cert_days_left:.0f} more days"
    return ""


def _order(r: ProbeResult) -> tuple[int, str, int, str]:
    return (r.region, r.node, PROBES.index(r.probe) if r.probe in PROBES else 99, r.peer)


def render_table(results: Iterable[ProbeResult]) -> str:
    """One line per node and probe (and mesh peer): REGION NODE PROBE STATUS LATENCY DETAIL."""
    rows = [("REGION", "NODE", "PROBE", "STATUS", "LATENCY", "DETAIL")]
    for r in sorted(results, key=_order):
        status = {OK: "ok", FAIL: "FAIL", SKIP: "skip"}.get(r.status, r.status)
        rows.append((str(r.region), r.node, probe_label(r), status, _ms(r.latency),
                     " ".join(_detail(r).split())))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
             for row in rows]
    return "\n".join(ln.rstrip() for ln in lines) + "\n"


def summary_line(results: Iterable[ProbeResult]) -> str:
    rs = list(results)
    n = {s: sum(1 for r in rs if r.status == s) for s in (OK, FAIL, SKIP)}
    nodes = len({(r.region, r.node) for r in rs})
    return (f"{len(rs)} probe{'s' * (len(rs) != 1)} of {nodes} node{'s' * (nodes != 1)}: "
            f"{n[OK]} ok, {n[FAIL]} failed, {n[SKIP]} skipped")


# --- per node -------------------------------------------------------------------------------

@dataclass
class Cell:
    """One probe's column of a node's row (mesh: all its pairs together)."""

    status: str = ""  # OK, FAIL, SKIP, or "" when the probe does not apply / has not run
    latency: float | None = None
    text: str = ""  # what the page prints below the status
    error: str = ""


@dataclass
class NodeRow:
    region: int
    node: str
    host: str
    cells: dict[str, Cell] = field(default_factory=dict)
    last_error: str = ""  # the most recent error text ("" = never failed)
    last_error_at: float = 0.0

    @property
    def health(self) -> str:
        states = [c.status for c in self.cells.values()]
        if FAIL in states:
            return HEALTH_FAIL
        return HEALTH_OK if OK in states else HEALTH_UNKNOWN

    @property
    def failing(self) -> list[str]:
        return [p for p in PROBES if self.cells.get(p, Cell()).status == FAIL]


def _cell(results: list[ProbeResult]) -> Cell:
    if len(results) == 1 and not results[0].peer:
        r = results[0]
        text = _ms(r.latency)
        if r.probe == TLS and r.cert_days_left is not None:
            text = f"{r.cert_days_left:.0f} days left"
        return Cell(r.status, r.latency, text, r.error)
    # mesh: one result per peer
    failed = [r for r in results if r.status == FAIL]
    oks = [r for r in results if r.status == OK]
    status = FAIL if failed else OK if oks else SKIP
    worst = max((r.latency for r in oks if r.latency is not None), default=None)
    err = "; ".join(f"to {r.peer}: {r.error}" for r in failed)
    text = f"{len(oks)}/{len(results)} peers" + (f", ≤ {_ms(worst)}" if worst else "")
    return Cell(status, worst, text, err)


def node_rows(nodes: Iterable[tuple[int, str, str]], results: Iterable[ProbeResult],
              last_errors: dict[tuple[int, str], tuple[str, float]] | None = None
              ) -> list[NodeRow]:
    """One row per ``(region, node, host)`` of ``nodes`` (map order), with the latest results
    and the last error remembered per node."""
    by_node: dict[tuple[int, str], dict[str, list[ProbeResult]]] = {}
    for r in results:
        by_node.setdefault((r.region, r.node), {}).setdefault(r.probe, []).append(r)
    rows = []
    for region, node, host in nodes:
        row = NodeRow(region, node, host)
        for probe, rs in by_node.get((region, node), {}).items():
            row.cells[probe] = _cell(sorted(rs, key=lambda r: r.peer))
        if last_errors and (region, node) in last_errors:
            row.last_error, row.last_error_at = last_errors[(region, node)]
        rows.append(row)
    return rows


# --- the page -------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
p.meta { color: #555; margin: 0 0 1em; }
p.maperror { background: #fde2e1; border-left: 4px solid #c62828; padding: .5em .8em; }
table { border-collapse: collapse; width: 100%; background: #fff; }
th, td { border: 1px solid #ddd; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #eee; }
tr.ok { background: #e8f5e9; }
tr.fail { background: #ffebee; }
tr.unknown { background: #f1f1f1; color: #666; }
td.cell-ok { color: #1b5e20; font-weight: 600; }
td.cell-fail { color: #b71c1c; font-weight: 700; }
td.cell-skip, td.cell-none { color: #777; }
td small { display: block; font-weight: 400; color: #555; }
td.err { color: #8e0000; max-width: 32em; word-break: break-word; }
td.health { font-weight: 700; text-transform: uppercase; }
"""

_COLUMNS = ((LOGIN, "Login"), (MESH, "Mesh"), (STUN, "STUN"), (PACKET, "Round trip"),
            (TLS, "TLS cert"))
_WORD = {OK: "ok", FAIL: "FAIL", SKIP: "skip", "": "&ndash;"}


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _ago(at: float, now: float) -> str:
    secs = max(0, int(now - at))
    if secs < 120:
        return f"{secs} s ago"
    return f"{secs // 60} min ago" if secs < 7200 else f"{secs // 3600} h ago"


def _td(cell: Cell | None) -> str:
    c = cell or Cell()
    cls = f"cell-{c.status or 'none'}"
    title = f' title="{_esc(c.error)}"' if c.error else ""
    text = c.text
    if c.status == FAIL and c.error:
        text = c.error if len(c.error) <= 48 else c.error[:47] + "…"
    small = f"<small>{_esc(text)}</small>" if text else ""
    return f'<td class="{cls}"{title}>{_WORD.get(c.status, _esc(c.status))}{small}</td>'


def render_page(rows: list[NodeRow], *, source: str, interval: float,
                last_round: float | None, round_seconds: float | None, map_error: str = "",
                now: float | None = None) -> str:
    now = time.time() if now is None else now
    refresh = max(1, round(interval))
    if last_round is None:
        when = "no round finished yet"
    else:
        took = f" in {round_seconds:.1f} s" if round_seconds is not None else ""
        when = (f"last round {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last_round))}"
                f" ({_ago(last_round, now)}){took}")
    failing = sum(1 for r in rows if r.health == HEALTH_FAIL)
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="refresh" content="{refresh}">',
           f"<title>derpprobe: {failing} of {len(rows)} nodes failing</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>derpprobe</h1>",
           f'<p class="meta">DERP map {_esc(source)} · {len(rows)} nodes, '
           f'<span id="failing">{failing}</span> failing · {when} · probing every '
           f"{interval:g} s</p>"]
    if map_error:
        out.append(f'<p class="maperror">{_esc(map_error)}</p>')
    head = "".join(f"<th>{t}</th>" for t in
                   ("Region", "Node", "Host", "Health", *(c[1] for c in _COLUMNS), "Latency",
                    "Last error"))
    out += ["<table>", f"<thead><tr>{head}</tr></thead>", "<tbody>"]
    for r in rows:
        rid = _esc(f"node-{r.region}-{r.node}")
        cells = "".join(_td(r.cells.get(p)) for p, _ in _COLUMNS)
        pkt = r.cells.get(PACKET)
        latency = _ms(pkt.latency) if pkt and pkt.status == OK else ""
        err = ""
        if r.last_error:
            err = f"{_esc(r.last_error)}<small>{_ago(r.last_error_at, now)}</small>"
        out.append(
            f'<tr id="{rid}" class="{r.health}" data-node="{_esc(r.node)}" '
            f'data-health="{r.health}" data-failing="{_esc(" ".join(r.failing))}">'
            f"<td>{r.region}</td><td>{_esc(r.node)}</td><td>{_esc(r.host)}</td>"
            f'<td class="health">{r.health}</td>{cells}<td>{latency}</td>'
            f'<td class="err">{err}</td></tr>')
    out += ["</tbody></table>", "</body></html>"]
    return "\n".join(out) + "\n"
