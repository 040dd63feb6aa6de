"""``nodeagent web``: the command line of the live rejections page (flags, the listen address).

Light on purpose: the CLI imports it to build its parser, and aiohttp loads only when the
command runs (:mod:`nodeagent_connreject.webserver`).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from nodeagent.errors import UserError

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 8088


class WebError(UserError):
    """One line: what is wrong with the flags or the listen address."""


def setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=None,
                   help=f"TCP port to serve on (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--listen", metavar="ADDR[:PORT]", default=None,
                   help=f"address to serve on (default {DEFAULT_ADDR}); an address that is not "
                        "loopback exposes the page, and your LocalAPI access, to the network")


def parse_listen(listen: str | None, port: int | None) -> tuple[str, int, bool]:
    """(address, port, is_loopback) from the flags. The address must be an IP literal or
    ``localhost``; a port in ``--listen`` and ``--port`` must agree."""
    addr, lport = DEFAULT_ADDR, None
    if listen is not None:
        text = listen.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise WebError(f"--listen {listen!r}: want ADDR, ADDR:PORT or [IPv6]:PORT")
            addr, lport = host, rest[1:] or None
        elif text.count(":") == 1:
            addr, lport = text.split(":")
        else:
            addr = text
        if lport is not None:
            if not lport.isdigit():
                raise WebError(f"--listen {listen!r}: the port must be a number")
            lport = int(lport)
    if addr == "localhost":
        addr = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise WebError(f"--listen {listen!r}: not an IP address (give 127.0.0.1, ::1 or the "
                       "address of one interface)") from None
    if port is not None and lport is not None and port != lport:
        raise WebError(f"--listen {listen!r} and --port {port} name different ports")
    final = port if port is not None else (lport if lport is not None else DEFAULT_PORT)
    if not 0 <= final <= 65535:
        raise WebError(f"port {final}: out of range 0-65535")
    return str(ip), final, ip.is_loopback


def run(args: argparse.Namespace, ctx: Any) -> int:
    addr, port, loopback = parse_listen(args.listen, args.port)
    if not loopback:
        if args.listen is None:  # unreachable today; kept so a future default cannot leak
            raise WebError(f"refusing to serve on {addr}: not loopback (use --listen)")
        print(f"nodeagent web: warning: serving on {addr}, not loopback: anyone who reaches "
              f"it sees this node's rejected connections with your LocalAPI access",
              file=sys.stderr)
    import asyncio

    from nodeagent_connreject.webserver import serve

    try:
        return asyncio.run(serve(ctx.socket, addr, port, loopback_only=loopback))
    except KeyboardInterrupt:
        return 0
