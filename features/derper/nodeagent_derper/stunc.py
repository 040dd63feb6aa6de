"""``stunc HOST [PORT]``: send one STUN binding request and print the mapped address and RTT.

Output (stdout, two lines): ``mapped <ip>:<port>`` (IPv6 in brackets) and ``rtt <ms> ms``.
Errors are one line ``stunc: <what>`` on stderr with exit status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import NoReturn

from nodeagent.stun.client import DEFAULT_PORT, DEFAULT_TIMEOUT, StunTimeout, stun_query


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"stunc: {message} (see `stunc --help`)", file=sys.stderr)
        sys.exit(2)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="stunc", description="Ask a STUN server for this host's mapped address.")
    p.add_argument("host", help="STUN server host name or address")
    p.add_argument("port", nargs="?", type=int, default=DEFAULT_PORT,
                   help=f"UDP port (default {DEFAULT_PORT})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT:g})")
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 0 < ns.port < 65536:
        print(f"stunc: port {ns.port} out of range", file=sys.stderr)
        return 2
    try:
        (ip, port), rtt = asyncio.run(stun_query(ns.host, ns.port, ns.timeout))
    except StunTimeout as e:
        print(f"stunc: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"stunc: {ns.host}:{ns.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"mapped {format_hostport(ip, port)}")
    print(f"rtt {rtt * 1000:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
