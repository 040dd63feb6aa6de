"""``nodeagent ping PEER``: disco pings through the agent, printed as ``tailscale ping`` does.

Talks only to the LocalAPI: ``GET status`` to turn a name into a Tailscale IP, then up to ``-c``
rounds of ``POST ping?ip=IP&type=disco``. Each reply prints ``pong from NAME (IP) via VIA in
N ms`` where VIA is ``DERP(code)`` or the direct ``ip:port``; it stops at the first direct pong
(unless ``--until-direct=false``) and fails with ``direct connection not established`` when
none came.
"""

from __future__ import annotations

import argparse
import ipaddress
import time
from typing import Any

from nodeagent.cli.registry import CLIContext, CLIError, CLIRegistry
from nodeagent.localapi.client import LocalAPIClient, LocalAPIError


def register(reg: CLIRegistry) -> None:
    reg.add_command(("ping",), help="ping a peer with disco pings (shows DERP or direct path)",
                    setup=_setup, run=_run)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("peer", metavar="PEER", help="a peer's name or Tailscale IP")
    p.add_argument("-c", "--count", type=int, default=10, help="rounds (default %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for each pong (default %(default)s)")
    p.add_argument("--until-direct", default="true", choices=("true", "false"),
                   help="stop at the first direct pong (default true)")


def resolve(status: dict[str, Any], name: str) -> str:
    """A peer's first Tailscale IP from its name (DNS label, DNSName or HostName) or an IP."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    want = name.lower().rstrip(".")
    suffix = str(status.get("MagicDNSSuffix") or "")
    for peer in (status.get("Peer") or {}).values():
        dns = str(peer.get("DNSName") or "").rstrip(".").lower()
        short = dns[: -len(suffix) - 1] if suffix and dns.endswith("." + suffix) else dns
        labels = {dns, short, short.split(".", 1)[0], str(peer.get("HostName") or "").lower()}
        if want in labels and peer.get("TailscaleIPs"):
            return str(peer["TailscaleIPs"][0])
    raise CLIError(f"no peer found named {name!r} (see `nodeagent status`)")


def _run(args: argparse.Namespace, ctx: CLIContext) -> int:
    if args.count < 1:
        raise CLIError("-c must be at least 1")
    status = ctx.localapi.get("status")
    ip = resolve(status, args.peer)
    client = LocalAPIClient(ctx.socket, timeout=args.timeout)
    direct = False
    anything = False
    for i in range(args.count):
        try:
            res = client.json("POST", f"ping?ip={ip}&type=disco")
        except LocalAPIError as e:
            if "timed out" not in str(e) and "timeout" not in str(e):
                raise
            print(f'ping "{ip}" timed out')
            continue
        err = res.get("Err") or ""
        if err:
            if res.get("IsLocalIP"):
                print(err)
                return 0
            if "timeout" in err:
                print(f'ping "{ip}" timed out')
                continue
            raise CLIError(err)
        anything = True
        region = res.get("DERPRegionCode") or res.get("DERPRegionID")
        via = res.get("Endpoint") or (f"DERP({region})" if res.get("DERPRegionID") else "disco")
        ms = float(res.get("LatencySeconds") or 0.0) * 1000
        print(f"pong from {res.get('NodeName', '')} ({res.get('NodeIP', ip)}) via {via} "
              f"in {ms:.0f}ms")
        if res.get("Endpoint") and args.until_direct == "true":
            direct = True
            break
        if i + 1 < args.count:
            time.sleep(1.0)
    if args.until_direct == "true" and not direct:
        raise CLIError("direct connection not established" if anything else "no reply")
    return 0
