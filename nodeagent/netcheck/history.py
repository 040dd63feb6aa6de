"""netcheck's report history and the home DERP region: :class:`ReportHistory` decides whether
the next report is full or incremental, keeps 5 minutes of reports and sets ``PreferredDERP``
with Tailscale's hysteresis (``addReportHistoryAndSetPreferredDERP``, see
``specs/reference/netcheck.md``), on an injectable clock returning seconds. Sans-IO.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from nodeagent.netcheck.plan import MS
from nodeagent.tailcfg import DERPMap

if TYPE_CHECKING:
    from nodeagent.netcheck.report import Report

__all__ = ["FULL_REPORT_INTERVAL", "HISTORY_MAX_AGE", "ReportHistory", "keep_min"]

HISTORY_MAX_AGE = 300.0  # seconds of reports kept for PreferredDERP
FULL_REPORT_INTERVAL = 300.0  # a full report at least this often
PREFERRED_DERP_FRAME_TIME = 8.0  # a DERP frame this recent keeps the old home "accessible"
PREFERRED_DERP_ABSOLUTE_DIFF = 10 * MS
DERP_KEEP_HOME_WITHOUT_LATENCY = 120.0  # 2 * DERP keep-alive


def keep_min(m: dict[int, int], region: int, d: int) -> None:
    """Keep in ``m`` the smallest latency ``d`` seen for ``region``."""
    prev = m.get(region)
    if prev is None or d < prev:
        m[region] = d


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
                keep_min(best_recent, rid, scaled(rid, d))

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
