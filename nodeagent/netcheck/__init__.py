"""netcheck: what the network looks like from this host — UDP, the mapped addresses, latency to
each DERP region and the home region (Tailscale's ``net/netcheck``).

``report`` is the sans-IO core (the Report and its bookkeeping; with ``plan``: STUN targets and
probe plans, ``history``: PreferredDERP with history, ``text``: the CLI's text form);
``client`` is the asyncio adapter (``run_netcheck``, ``NetcheckClient``, the ``StunTransport``
seam). The names re-exported here load on first use, so importing the package or ``report``
never imports asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodeagent.lazy import lazy_exports

if TYPE_CHECKING:
    from nodeagent.netcheck.client import (
        NetcheckClient,
        StunTransport,
        UDPStunTransport,
        run_netcheck,
    )
    from nodeagent.netcheck.report import (
        Probe,
        Report,
        ReportBuilder,
        ReportHistory,
        make_probe_plan,
        make_probe_plan_initial,
        render_text,
    )

_LAZY = {
    "NetcheckClient": "client",
    "StunTransport": "client",
    "UDPStunTransport": "client",
    "run_netcheck": "client",
    "Probe": "report",
    "Report": "report",
    "ReportBuilder": "report",
    "ReportHistory": "report",
    "make_probe_plan": "report",
    "make_probe_plan_initial": "report",
    "render_text": "report",
}

__all__ = [
    "NetcheckClient",
    "Probe",
    "Report",
    "ReportBuilder",
    "ReportHistory",
    "StunTransport",
    "UDPStunTransport",
    "make_probe_plan",
    "make_probe_plan_initial",
    "render_text",
    "run_netcheck",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
