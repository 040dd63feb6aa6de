"""``nodeagent netcheck``: ask the agent for a network report and print it as Tailscale's
``tailscale netcheck`` does (text, or the Report JSON with ``--format json|json-line``).

Talks to the agent only through the LocalAPI: ``GET derpmap`` (to name the regions, and to fail
with one line when the agent has no DERP map) and ``GET debug-netcheck`` (the agent runs the
probes from its own host). The text form is ``nodeagent.netcheck.report.render_text``.
"""

from __future__ import annotations

import argparse
import json
import sys

from nodeagent.cli.registry import CLIContext, CLIError, CLIRegistry
from nodeagent.localapi.client import LocalAPIClient
from nodeagent.netcheck.report import Report, render_text
from nodeagent.tailcfg import derpmap_from_wire, marshal_json

JSON_WARNING = "# Warning: this JSON format is not yet considered a stable interface"
# The agent's netcheck takes up to 5 s; leave room for a slow DNS lookup on top.
NETCHECK_TIMEOUT = 20.0


def register(reg: CLIRegistry) -> None:
    reg.add_command(("netcheck",), help="print an analysis of local network conditions",
                    setup=_setup, run=_run)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="", choices=("", "json", "json-line"),
                   help='output format: "" (human-readable), "json" or "json-line"')
    p.add_argument("--verbose", action="store_true",
                   help="wait for more regions and show region IDs")


def _run(args: argparse.Namespace, ctx: CLIContext) -> int:
    status, body, _ = ctx.localapi.request("GET", "derpmap")
    if status != 200:
        ctx.localapi.json("GET", "derpmap")  # raises with the agent's message
    try:
        raw_map = json.loads(body)  # ``null`` before a netmap (LocalAPIClient.json refuses it)
        dm = derpmap_from_wire(raw_map) if raw_map is not None else None
    except ValueError as e:
        raise CLIError(f"the agent's DERP map is not usable: {e}") from None
    if dm is None or not dm.Regions:
        raise CLIError("no DERP map: the agent has not received one (netcheck needs a netmap "
                       "with a DERPMap from control or --netmap-file)")
    api = LocalAPIClient(ctx.socket, timeout=NETCHECK_TIMEOUT)
    raw = api.get("debug-netcheck?verbose=true" if args.verbose else "debug-netcheck")
    try:
        report = Report.from_json(raw)
    except ValueError as e:
        raise CLIError(f"the agent's report is not usable: {e}") from None
    if args.format:
        print(JSON_WARNING, file=sys.stderr)
        indent = "\t" if args.format == "json" else None
        print(marshal_json(report.to_json(), indent))
        return 0
    sys.stdout.write(render_text(report, dm, verbose=args.verbose))
    return 0
