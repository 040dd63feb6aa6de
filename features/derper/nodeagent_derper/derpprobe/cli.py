"""The ``derpprobe`` command (also ``nodeagent derpprobe``): flags, the DERP map, and either one
round printed as a table (``--once``) or the service (page and metrics on ``--listen``).

Flags are accepted Go-style too (``-once``, ``-derp-map=...``). Every operator error — a bad
flag, an unreadable or malformed map, an address that cannot be bound — is one line
``derpprobe: <what>``; exit status 2 for usage, 1 for runtime errors and for ``--once`` when
any probe failed, 0 otherwise. Logging is :mod:`nodeagent.logconfig`'s (``$DERPPROBE_LOG``
names the level).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import NoReturn

from nodeagent.errors import UserError, run_command
from nodeagent.localapi.server import SOCKET_ENV, default_socket_path
from nodeagent.logconfig import configure_logging
from nodeagent_derper.cli import go_style, parse_duration
from nodeagent_derper.derpprobe.mapload import LOCAL, check_source, load_derp_map
from nodeagent_derper.listen import split_hostport

PROG = "derpprobe"
LOG_ENV = "DERPPROBE_LOG"
DEFAULT_LISTEN = ":8030"
DEFAULT_INTERVAL = 15.0  # seconds between the starts of two rounds
DEFAULT_TIMEOUT = 5.0  # each step of a probe (a dial, a handshake, a packet's return)
MAP_TIMEOUT = 10.0


class UsageError(Exception):
    """Bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False,
                description="Probe the DERP servers of a DERP map: TLS certificate, DERP "
                            "login, STUN, a packet round trip per node and the mesh of "
                            "multi-node regions. --once prints a table; otherwise an HTML "
                            "status page and Prometheus /metrics are served.")
    p.add_argument("--derp-map", default=LOCAL, metavar="SOURCE",
                   help="https://... or http://... URL, file:///path, or 'local': the DERP map "
                        "of the nodeagent agent on this machine (default %(default)s)")
    p.add_argument("--socket", default=None,
                   help=f"LocalAPI socket for --derp-map local (default ${SOCKET_ENV} or "
                        f"{default_socket_path()})")
    p.add_argument("--once", action="store_true",
                   help="probe everything once, print a table, exit 1 if anything failed")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR",
                   help="[host]:port of the status page and /metrics (default %(default)s)")
    p.add_argument("--interval", type=parse_duration, default=DEFAULT_INTERVAL,
                   metavar="DURATION", help="time between probe rounds (default 15s)")
    p.add_argument("--timeout", type=parse_duration, default=DEFAULT_TIMEOUT,
                   metavar="DURATION", help="bound on each step of a probe (default 5s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log a summary of every round")
    return p


def _check(ns: argparse.Namespace) -> tuple[str, int]:
    if not ns.interval > 0:
        raise UsageError("--interval must be more than 0")
    if not ns.timeout > 0:
        raise UsageError("--timeout must be more than 0")
    try:
        check_source(ns.derp_map)
    except UserError as e:
        raise UsageError(str(e)) from None
    try:
        return split_hostport(ns.listen)
    except ValueError as e:
        raise UsageError(f"--listen: {e}") from None


async def _once(ns: argparse.Namespace) -> int:
    from nodeagent_derper.derpprobe.probes import FAIL, run_round
    from nodeagent_derper.derpprobe.report import render_table, summary_line

    dm = await asyncio.to_thread(load_derp_map, ns.derp_map, socket_path=ns.socket,
                                 timeout=MAP_TIMEOUT)
    results = await run_round(dm, timeout=ns.timeout)
    sys.stdout.write(render_table(results))
    print(summary_line(results))
    return 1 if any(r.status == FAIL for r in results) else 0


async def _service(ns: argparse.Namespace, host: str, port: int) -> int:
    from nodeagent_derper.derpprobe.service import ProbeService, serve

    dm = await asyncio.to_thread(load_derp_map, ns.derp_map, socket_path=ns.socket,
                                 timeout=MAP_TIMEOUT)
    svc = ProbeService(dm, source=ns.derp_map, socket_path=ns.socket, interval=ns.interval,
                       timeout=ns.timeout, verbose=ns.verbose)
    log = logging.getLogger("derpprobe")

    def started(url: str) -> None:
        n = len(svc.nodes())
        log.info("serving %s (%d nodes, a round every %gs)", url, n, ns.interval)

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await serve(svc, host, port, started)
    except OSError as e:
        raise UserError(f"cannot listen on {ns.listen}: {e.strerror or e}") from None
    except asyncio.CancelledError:
        return 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        ns = parser.parse_args(go_style(argv, parser))
        host, port = _check(ns)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    ns.socket = ns.socket or default_socket_path()
    # Timestamps, or journald's <priority> under systemd; $DERPPROBE_LOG overrides the level.
    configure_logging(LOG_ENV, "INFO" if ns.verbose or not ns.once else "WARNING")
    if not ns.verbose:
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
    if ns.once:
        return run_command(PROG, lambda: asyncio.run(_once(ns)))
    return run_command(PROG, lambda: asyncio.run(_service(ns, host, port)))


if __name__ == "__main__":
    sys.exit(main())
