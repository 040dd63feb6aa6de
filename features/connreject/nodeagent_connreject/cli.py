"""``nodeagent debug rejects``: the connection-rejection table a person can act on.

Runs in the CLI process and talks to the agent only through the LocalAPI: ``debug-rejects`` for
the events and ``status`` to name peers by hostname.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from nodeagent.ipnext import hookimpl

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}

ENABLE_HINT = ('recording is off on this node. Grant it the node attribute in the tailnet policy: '
               '"nodeAttrs": [{"target": ["<this node or *>"], "attr": ["debug-conn-reject"]}]')


def hint(reason: str, direction: str, peer: str) -> str:
    """One line saying what a reason means and where to look."""
    if direction == "incoming":
        return {
            "acl": f"this node's tailnet policy does not allow {peer} to connect here",
            "shields": f"shields-up on this node refused {peer} (nodeagent prefs ShieldsUp)",
        }.get(reason, f"this node refused {peer}: {reason}")
    return {
        "acl": f"refused by the tailnet policy on {peer}",
        "shields": f"{peer} has shields-up: it accepts no incoming connections",
        "host-ip-forwarding": f"{peer} cannot forward to the subnet: IP forwarding is off there",
        "host-firewall": f"{peer}'s host firewall dropped the connection",
        "no-peer": "no node in the netmap owns this address (typo, or a route not advertised?)",
        "peer-unreachable": f"{peer} is in the netmap but no path to it works",
        "timeout": f"{peer} is reachable but never answered (service down or filtered?)",
    }.get(reason, f"{peer} rejected it for an unknown reason")


def _split(endpoint: str) -> tuple[str, str]:
    if endpoint.startswith("["):
        addr, _, port = endpoint[1:].partition("]:")
        return addr, port
    addr, _, port = endpoint.rpartition(":")
    return (addr, port) if addr else (endpoint, "")


def _ago(ts: str, now: float) -> str:
    try:
        # Seconds are precise enough for "ago"; drop the fraction Go may give nine digits of.
        t = datetime.fromisoformat(ts.split(".")[0].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return ts
    d = max(0.0, now - t)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return f"{d / 86400:.1f}d ago"


def host_names(status: dict[str, Any]) -> dict[str, str]:
    """Tailnet address → hostname, from a LocalAPI status."""
    names: dict[str, str] = {}
    nodes = [status.get("Self") or {}, *(status.get("Peer") or {}).values()]
    for n in nodes:
        for ip in n.get("TailscaleIPs") or []:
            names[ip] = n.get("HostName") or n.get("DNSName") or ""
    return names


def format_rejects(resp: dict[str, Any], names: dict[str, str], now: float | None = None) -> str:
    now = time.time() if now is None else now
    if not resp.get("Enabled"):
        return f"connection-rejection diagnostics: {ENABLE_HINT}\n"
    rows: list[list[str]] = []
    hints: list[str] = []
    for direction, events in (("outgoing", resp.get("Outgoing") or []),
                              ("incoming", resp.get("Incoming") or [])):
        for ev in reversed(events):  # most recent first: that is what a person looks for
            peer_ep = ev["Dst"] if direction == "outgoing" else ev["Src"]
            addr, _ = _split(peer_ep)
            _, port = _split(ev["Dst"])
            name = names.get(addr, "")
            peer = f"{name} ({addr})" if name else addr
            rows.append([direction, PROTO_NAMES.get(ev["Proto"], str(ev["Proto"])), peer,
                         port or "-", ev["Reason"], ev["Source"]
                         + (" (maybe broken)" if ev.get("MaybeBroken") else ""),
                         str(ev["Count"]), _ago(ev["First"], now), _ago(ev["Last"], now)])
            why = ev.get("Explanation")  # with --explain: the agent's sentence
            hints.append(hint(ev["Reason"], direction, name or addr)
                         + (f"\n    why: {why}" if isinstance(why, str) and why else ""))
    if not rows:
        return "no rejected connections recorded\n"
    # Rows aggregate by (proto, peer, reason): the port is the latest event's destination port.
    head = ["DIRECTION", "PROTO", "PEER", "LAST PORT", "REASON", "SOURCE", "COUNT", "FIRST",
            "LAST"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    for r, h in zip(rows, hints, strict=True):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        out.append(f"    → {h}")
    return "\n".join(out) + "\n"


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw LocalAPI response")
    p.add_argument("--watch", action="store_true",
                   help="redraw as events arrive, from the agent's watch stream (Ctrl-C stops); "
                        "with --json, one compact JSON response per line")
    p.add_argument("--explain", action="store_true",
                   help="add one plain sentence per row: why it failed (asks control for "
                        "policy refusals)")


def _fetch(ctx: Any, explain: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    resp = ctx.localapi.get("debug-rejects?explain=1" if explain else "debug-rejects")
    try:
        names = host_names(ctx.localapi.get("status"))
    except Exception:  # names are a nicety; the table works without them
        names = {}
    return resp, names


def _run(args: argparse.Namespace, ctx: Any) -> int:
    if not args.watch:
        resp, names = _fetch(ctx, explain=getattr(args, "explain", False))
        if args.json:
            json.dump(resp, sys.stdout, indent=2)
            print()
        else:
            print(format_rejects(resp, names), end="")
        return 0
    return _watch(args, ctx, sys.stdout.write)


def _watch(args: argparse.Namespace, ctx: Any, write: Callable[[str], Any]) -> int:
    """Follow ``debug-rejects?watch=1``: the agent sends a snapshot at once and after each
    change (at most five a second); redraw when the table it gives differs."""
    from nodeagent.localapi.client import LocalAPIError
    from nodeagent_connreject.stream import watch_lines

    query = "watch=1&explain=1" if getattr(args, "explain", False) else "watch=1"
    last = None
    try:
        for msg in watch_lines(ctx.socket, query):
            if msg.get("Type") == "closing":
                print("the agent is stopping: watch ended", file=sys.stderr)
                return 0
            resp = msg.get("Rejects")
            if msg.get("Type") != "snapshot" or not isinstance(resp, dict):
                continue  # heartbeats and line types this CLI does not know
            if args.json:
                text = json.dumps(resp, separators=(",", ":")) + "\n"
            else:
                try:
                    names = host_names(ctx.localapi.get("status"))
                except Exception:  # names are a nicety; the table works without them
                    names = {}
                text = format_rejects(resp, names)
            if text != last or args.json:
                write("\x1b[H\x1b[2J" + text if sys.stdout.isatty() and not args.json else text)
                sys.stdout.flush()
                last = text
        raise LocalAPIError(f"the agent at {ctx.socket} ended the watch stream")
    except KeyboardInterrupt:
        return 0


@hookimpl
def nodeagent_cli_commands(cli: Any) -> None:
    cli.add_command(("debug", "rejects"), help="show rejected connections and why",
                    setup=_setup, run=_run)
    from nodeagent_connreject import webcmd

    cli.add_command(("web",), help="serve a live page of rejected connections (local browser)",
                    setup=webcmd.setup, run=webcmd.run)
