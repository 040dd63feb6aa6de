"""``nodeagent debug derp REGION``: ask the agent to check one DERP region and print what it found.

Talks only to the LocalAPI (``POST debug-derp-region?region=...``, write permission). Prints the
findings, then the warnings and errors, in plain words; ``--json`` prints the agent's answer as
it is. Exits 1 when the check found errors (Tailscale's CLI exits 0 either way).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from nodeagent.cli.registry import CLIContext, CLIError, CLIRegistry
from nodeagent.localapi.client import LocalAPIClient

# The agent probes every node (TLS, HTTP, logins, STUN, round trips) with 5 s steps.
TIMEOUT = 120.0


def register(reg: CLIRegistry) -> None:
    reg.add_command(("debug", "derp"),
                    help="check a DERP region from the agent: TLS, HTTP, DERP logins, STUN, "
                         "a packet round trip", setup=_setup, run=_run)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("region", metavar="REGION", help="region ID (e.g. 900) or code (e.g. nyc)")
    p.add_argument("--json", action="store_true", help="print the LocalAPI answer as JSON")


def _run(args: argparse.Namespace, ctx: CLIContext) -> int:
    region = args.region.strip()
    if not region:
        raise CLIError("REGION is empty: give a region ID or code")
    client = LocalAPIClient(ctx.socket, timeout=TIMEOUT)
    rep = client.json("POST", f"debug-derp-region?region={quote(region, safe='')}")
    if not isinstance(rep, dict):
        raise CLIError("debug-derp-region: the agent's answer is not a report object")
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        print()
    else:
        sys.stdout.write(format_report(region, rep))
    return 1 if rep.get("Errors") else 0


def _lines(rep: dict[str, Any], key: str) -> list[str]:
    v = rep.get(key)
    return [str(x) for x in v] if isinstance(v, list) else []


def format_report(region: str, rep: dict[str, Any]) -> str:
    info, warns, errs = _lines(rep, "Info"), _lines(rep, "Warnings"), _lines(rep, "Errors")
    out = [f"DERP region {region}:"]
    out += [f"  - {x}" for x in info]
    out += [f"  warning: {x}" for x in warns]
    out += [f"  error: {x}" for x in errs]
    if errs:
        out.append(f"{len(errs)} error(s), {len(warns)} warning(s): this region does not work "
                   "from this node as it should.")
    elif warns:
        out.append(f"No errors; {len(warns)} warning(s).")
    else:
        out.append("No problems found.")
    return "\n".join(out) + "\n"
