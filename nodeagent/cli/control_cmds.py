"""``nodeagent control ...``: run the coordination server and administer it.

Owns the control-plane CLI. Admin commands find the server from ``--state-dir`` (its
``control-url`` and ``admin-token`` files) or from ``--control URL --admin-token T``; every
failure is one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from nodeagent.cli.registry import CLIContext, CLIError, CLIRegistry

log = logging.getLogger("nodeagent.control")


def register(reg: CLIRegistry) -> None:
    reg.add_group(("control",), "run and administer the coordination server")
    reg.add_command(("control", "serve"), help="run the coordination server in the foreground",
                    setup=_serve_setup, run=_serve, needs_socket=False)
    reg.add_group(("control", "authkey"), "pre-auth keys")
    reg.add_command(("control", "authkey", "create"), help="create a pre-auth key",
                    setup=_authkey_setup, run=_authkey_create, needs_socket=False)
    reg.add_command(("control", "authkey", "list"), help="list pre-auth keys (never secrets)",
                    setup=_conn_setup, run=_authkey_list, needs_socket=False)
    reg.add_command(("control", "nodes"), help="list the tailnet's nodes",
                    setup=_nodes_setup, run=_nodes, needs_socket=False)
    reg.add_command(("control", "delete"), help="delete a node (ID, name, IP or nodekey)",
                    setup=_node_arg_setup, run=_delete, needs_socket=False)
    reg.add_command(("control", "expire"), help="expire a node's key now",
                    setup=_node_arg_setup, run=_expire, needs_socket=False)
    reg.add_group(("control", "policy"), "the tailnet policy")
    reg.add_command(("control", "policy", "set"), help="validate and install a policy file",
                    setup=_policy_set_setup, run=_policy_set, needs_socket=False)
    reg.add_command(("control", "policy", "get"), help="print the running policy",
                    setup=_conn_setup, run=_policy_get, needs_socket=False)
    reg.add_command(("control", "c2n"), help="send a c2n request to a node; print status, body",
                    setup=_c2n_setup, run=_c2n, needs_socket=False)
    reg.add_command(("control", "explain"),
                    help="why the policy allows or denies a flow: SRC DST:PORT[/proto]",
                    setup=_explain_setup, run=_explain, needs_socket=False)


# --- serve -----------------------------------------------------------------------------------

def _serve_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    p.add_argument("--state-dir", required=True, help="database, server key and admin token")
    p.add_argument("--policy", default=None, help="policy file (HuJSON); SIGHUP re-reads it")
    p.add_argument("--domain", default=None, help="tailnet DNS suffix")
    p.add_argument("--node-key-expiry", type=float, default=180.0,
                   help="days until a node key expires; 0 = never (default %(default)s)")
    p.add_argument("--keepalive", type=float, default=15.0,
                   help="seconds between stream keepalives (default %(default)s)")


def _split_listen(s: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d{1,5})", s)
    if not m or int(m.group(2)) > 65535:
        raise CLIError(f"--listen {s!r}: expected HOST:PORT")
    return m.group(1) or "0.0.0.0", int(m.group(2))


def _serve(args: argparse.Namespace, ctx: CLIContext) -> int:
    from nodeagent.control.policy import PolicyError
    from nodeagent.control.server import DEFAULT_DOMAIN, ControlServer, ServerConfig

    host, port = _split_listen(args.listen)
    cfg = ServerConfig(state_dir=Path(args.state_dir),
                       policy_path=Path(args.policy) if args.policy else None,
                       domain=args.domain or DEFAULT_DOMAIN,
                       key_expiry=max(0.0, args.node_key_expiry) * 86400.0,
                       keepalive=max(0.1, args.keepalive))
    try:
        srv = ControlServer(cfg)
    except PolicyError as e:
        raise CLIError(f"bad policy: {e}") from None
    except OSError as e:
        raise CLIError(f"state dir {args.state_dir}: {e.strerror}") from None
    return asyncio.run(_serve_async(srv, host, port))


async def _serve_async(srv: Any, host: str, port: int) -> int:
    from nodeagent.control.policy import PolicyError

    try:
        url = await srv.start(host, port)
    except OSError as e:
        srv.store.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    print(f"control server listening on {url} (admin token in "
          f"{srv.cfg.state_dir / 'admin-token'})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def reload() -> None:
        try:
            srv.reload_policy()
            log.info("policy reloaded")
        except PolicyError as e:
            log.error("policy not reloaded, keeping the running one: %s", e)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await srv.stop()
    return 0


# --- admin commands --------------------------------------------------------------------------

def _conn_setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None, help="the server's state dir (local server)")
    p.add_argument("--control", default=None, help="server URL (with --admin-token)")
    p.add_argument("--admin-token", default=None, help="admin token (with --control)")


def _admin(args: argparse.Namespace) -> Any:
    from nodeagent.control.admin import AdminClient, AdminClientError

    if args.control:
        if not args.admin_token:
            raise CLIError("--control needs --admin-token (or use --state-dir)")
        return AdminClient(args.control, args.admin_token)
    if args.state_dir:
        try:
            return AdminClient.from_state_dir(args.state_dir)
        except AdminClientError as e:
            raise CLIError(str(e)) from None
    raise CLIError("say which server: --state-dir DIR, or --control URL --admin-token T")


def _call(args: argparse.Namespace, fn: str, *a: Any, **kw: Any) -> Any:
    from nodeagent.control.admin import AdminClientError

    client = _admin(args)
    try:
        return getattr(client, fn)(*a, **kw)
    except AdminClientError as e:
        raise CLIError(str(e)) from None


def _authkey_setup(p: argparse.ArgumentParser) -> None:
    _conn_setup(p)
    p.add_argument("--reusable", action="store_true", help="usable by several nodes")
    p.add_argument("--ephemeral", action="store_true",
                   help="nodes are deleted soon after they go offline")
    p.add_argument("--tag", action="append", default=[], help="tag:x given to nodes (repeat)")
    p.add_argument("--user", default="admin", help="owner of the nodes (default %(default)s)")
    p.add_argument("--expiry", type=float, default=90.0,
                   help="days until the key expires; 0 = never (default %(default)s)")


def _authkey_create(args: argparse.Namespace, ctx: CLIContext) -> int:
    for t in args.tag:
        if not t.startswith("tag:") or len(t) <= 4:
            raise CLIError(f"--tag {t!r}: tags look like tag:<name>")
    out = _call(args, "create_authkey", user=args.user, reusable=args.reusable,
                ephemeral=args.ephemeral, tags=args.tag, expiry=max(0.0, args.expiry) * 86400)
    print(out["key"])
    return 0


def _authkey_list(args: argparse.Namespace, ctx: CLIContext) -> int:
    for k in _call(args, "authkeys"):
        flags = [f for f, on in (("reusable", k["Reusable"]), ("ephemeral", k["Ephemeral"]),
                                 ("revoked", k["Revoked"])) if on]
        print(f"{k['ID']}\t{k['Prefix']}…\t{k['User']}\t{','.join(k['Tags']) or '-'}\t"
              f"{','.join(flags) or '-'}\tused {k['Used']}\texpires {_when(k['Expires'])}")
    return 0


def _nodes_setup(p: argparse.ArgumentParser) -> None:
    _conn_setup(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "never"


def _nodes(args: argparse.Namespace, ctx: CLIContext) -> int:
    nodes = _call(args, "nodes")
    if args.json:
        json.dump(nodes, sys.stdout, indent=2)
        print()
        return 0
    rows = [["ID", "NAME", "ADDRESSES", "OWNER", "STATUS", "LAST SEEN", "KEY EXPIRY"]]
    for n in nodes:
        status = "expired" if n["Expired"] else ("online" if n["Online"] else "offline")
        rows.append([str(n["ID"]), n["Name"], ",".join(n["Addresses"]),
                     ",".join(n["Tags"]) or n["User"], status, _when(n["LastSeen"]),
                     _when(n["KeyExpiry"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _node_arg_setup(p: argparse.ArgumentParser) -> None:
    _conn_setup(p)
    p.add_argument("node", help="node ID, name, IP or nodekey")


def _delete(args: argparse.Namespace, ctx: CLIContext) -> int:
    n = _call(args, "delete", args.node)
    print(f"deleted node {n['ID']} {n['Name']}")
    return 0


def _expire(args: argparse.Namespace, ctx: CLIContext) -> int:
    n = _call(args, "expire", args.node)
    print(f"expired the key of node {n['ID']} {n['Name']}")
    return 0


def _policy_set_setup(p: argparse.ArgumentParser) -> None:
    _conn_setup(p)
    p.add_argument("file", help="policy file (HuJSON)")


def _policy_set(args: argparse.Namespace, ctx: CLIContext) -> int:
    try:
        text = Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    try:
        warnings = _call(args, "set_policy", text)
    except CLIError as e:
        msg = str(e)
        if re.match(r"\d+:\d+: ", msg):
            raise CLIError(f"{args.file}:{msg} (policy unchanged)") from None
        raise
    for w in warnings or []:
        print(f"nodeagent: warning: {args.file}:{w}", file=sys.stderr)
    print(f"policy from {args.file} installed")
    return 0


def _policy_get(args: argparse.Namespace, ctx: CLIContext) -> int:
    sys.stdout.write(_call(args, "get_policy"))
    return 0


def _c2n_setup(p: argparse.ArgumentParser) -> None:
    _conn_setup(p)
    p.add_argument("node", help="node ID, name, IP or nodekey")
    p.add_argument("method", help="HTTP method, e.g. GET")
    p.add_argument("path", help="path, e.g. /debug/rejects")
    p.add_argument("--data", default="", help="request body")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default %(default)s)")


def _c2n(args: argparse.Namespace, ctx: CLIContext) -> int:
    status, _headers, body = _call(args, "c2n", args.node, args.method, args.path,
                                   args.data.encode(), timeout=args.timeout)
    print(f"status {status}")
    text = body.decode(errors="replace")
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0 if 200 <= status < 300 else 1


def _explain_setup(p: argparse.ArgumentParser) -> None:
    _conn_setup(p)
    p.add_argument("src", help="source: node name, IP or tag")
    p.add_argument("dst", help="DST:PORT[/proto], e.g. beta:22 or beta:53/udp or beta/icmp")
    p.add_argument("--json", action="store_true", help="print JSON")


def _explain(args: argparse.Namespace, ctx: CLIContext) -> int:
    from nodeagent.control.explain import ExplainError, parse_target

    try:
        host, port, proto = parse_target(args.dst)
    except ExplainError as e:
        raise CLIError(str(e)) from None
    out = _call(args, "explain", args.src, host, port, proto)
    if args.json:
        out.pop("Text", None)
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(out.get("Text") or out.get("Summary", ""))
    return 0 if out.get("Allowed") else 1
