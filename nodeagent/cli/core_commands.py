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


def _up_setup(p: argparse.ArgumentParser) -> None:
    from nodeagent.agent import DEFAULT_STATE_DIR

    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                   help=f"where the node's identity and prefs live (default {DEFAULT_STATE_DIR})")
    p.add_argument("--hostname", default=None, help="this node's name in the tailnet")
    p.add_argument("--tun", default=None, metavar="NAME",
                   help="TUN device to create and drive (e.g. nodeagent0); none: no data plane")
    p.add_argument("--port", type=int, default=41641,
                   help="WireGuard UDP port (default 41641; 0 picks a free port)")
    p.add_argument("--netmap-file", default=None, metavar="FILE",
                   help="run from a static netmap (JSON, tailcfg shape) instead of control")
    p.add_argument("--login-server", default=None, metavar="URL",
                   help="coordination server URL (nodeagent control serve)")
    p.add_argument("--auth-key", default=None, metavar="KEY",
                   help="pre-auth key for the first login (or NODEAGENT_AUTH_KEY)")


def _up(args: argparse.Namespace, ctx: CLIContext) -> int:
    import os

    from nodeagent.agent import AgentOptions, run, run_agent
    from nodeagent.cli.registry import CLIError

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port {args.port}: must be 0..65535")
    if (args.netmap_file or args.login_server) and not args.tun:
        raise CLIError("--netmap-file and --login-server need --tun NAME (the data plane)")
    if args.netmap_file and args.login_server:
        raise CLIError("--netmap-file and --login-server are alternatives; give one")
    if args.hostname:
        from nodeagent.ipn.prefs import PrefsError, check_hostname

        try:
            check_hostname(args.hostname)
        except PrefsError as e:
            raise CLIError(f"--hostname {str(e).removeprefix('Hostname: ')}") from None
    opts = AgentOptions(socket=ctx.socket, state_dir=args.state_dir, hostname=args.hostname,
                        tun=args.tun, port=args.port, netmap_file=args.netmap_file,
                        login_server=args.login_server,
                        auth_key=args.auth_key or os.environ.get("NODEAGENT_AUTH_KEY"))
    return int(run(run_agent(opts)))


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

    feats = discover()
    for f in feats:
        print(f"{f.feature.name}\t{f.distribution} {f.version}\t{f.feature.description}")
    if not feats:
        print("no features installed (pip install 'nodeagent[all]')", file=sys.stderr)
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
