"""The core's own commands: up, status, features, version, debug metrics (and, registered from
here, the control and netcheck commands)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nodeagent.cli.registry import CLIContext, CLIRegistry
from nodeagent.version import CAPABILITY_VERSION, __version__


def register(reg: CLIRegistry) -> None:
    reg.add_command(("up",), help="run the agent in the foreground until SIGINT/SIGTERM",
                    setup=_up_setup, run=_up, needs_socket=False)
    reg.add_command(("status",), help="show this node and its peers", setup=_status_setup,
                    run=_status)
    reg.add_command(("features",), help="list installed features", run=_features,
                    needs_socket=False)
    reg.add_command(("version",), help="print the version and capability version",
                    run=_version, needs_socket=False)
    reg.add_group(("debug",), "debugging commands (features add more)")
    reg.add_command(("debug", "metrics"), help="print the agent's counters (Prometheus text)",
                    run=_debug_metrics)
    from nodeagent.cli import control_cmds, derp_cmd, netcheck_cmd, ping_cmd

    control_cmds.register(reg)
    netcheck_cmd.register(reg)
    derp_cmd.register(reg)
    ping_cmd.register(reg)
    from nodeagent.demo import cli as demo_cli

    demo_cli.register(reg)


def _up_setup(p: argparse.ArgumentParser) -> None:
    from nodeagent.cli.up_options import add_up_flags

    add_up_flags(p)  # each flag with its NODEAGENT_* environment default


def _up(args: argparse.Namespace, ctx: CLIContext) -> int:
    from nodeagent.agent import run, run_agent
    from nodeagent.cli.up_options import up_options

    return int(run(run_agent(up_options(args, ctx.socket))))


def _status_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw LocalAPI status JSON")


def _status(args: argparse.Namespace, ctx: CLIContext) -> int:
    st = ctx.localapi.get("status")
    if args.json:
        json.dump(st, sys.stdout, indent=2)
        print()
        return 0
    print(format_status(st), end="")
    return 0


def format_status(st: dict[str, Any]) -> str:
    lines = []
    state = st.get("BackendState", "?")
    if state != "Running":
        lines.append(f"# backend state: {state}")
    rows = []

    def row(ps: dict[str, Any], is_self: bool) -> list[str]:
        ips = ps.get("TailscaleIPs") or ["-"]
        if is_self:
            conn = "-"
        elif not ps.get("Online"):
            conn = "offline"
        elif ps.get("CurAddr"):
            conn = f"direct {ps['CurAddr']}"
        elif ps.get("Relay"):
            conn = f"relay \"{ps['Relay']}\""
        else:
            conn = "idle"
        extra = ""
        if not is_self and (ps.get("RxBytes") or ps.get("TxBytes")):
            extra = f", tx {ps.get('TxBytes', 0)} rx {ps.get('RxBytes', 0)}"
        return [ips[0], ps.get("HostName") or "-", ps.get("OS") or "-", conn + extra]

    rows.append(row(st.get("Self") or {}, True))
    for _key, ps in sorted((st.get("Peer") or {}).items(),
                           key=lambda kv: kv[1].get("HostName", "")):
        rows.append(row(ps, False))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    for h in st.get("Health") or []:
        lines.append(f"# health: {h}")
    return "\n".join(lines) + "\n"


def _features(args: argparse.Namespace, ctx: CLIContext) -> int:
    from nodeagent.ipnext.feature import discover
    from nodeagent.ipnext.known import KNOWN_FEATURES, install_command

    feats = discover()
    for f in feats:
        print(f"{f.feature.name}\t{f.distribution} {f.version}\t{f.feature.description}")
    if not feats:
        print(f"no features installed; all of them: {install_command(*KNOWN_FEATURES)}",
              file=sys.stderr)
    return 0


def _version(args: argparse.Namespace, ctx: CLIContext) -> int:
    print(f"nodeagent {__version__} (capability version {CAPABILITY_VERSION})")
    return 0


def _debug_metrics(args: argparse.Namespace, ctx: CLIContext) -> int:
    status, body, _ = ctx.localapi.request("GET", "metrics")
    if status != 200:
        ctx.localapi.json("GET", "metrics")  # raises with the agent's message
    sys.stdout.write(body.decode())
    return 0
