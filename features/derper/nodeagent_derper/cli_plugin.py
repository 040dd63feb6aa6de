"""Adds ``nodeagent derper ...`` and ``nodeagent derpprobe ...`` to the nodeagent CLI: the same
flags as the ``derper`` and ``derpprobe`` commands."""

from __future__ import annotations

import argparse
from typing import Any

from nodeagent.ipnext import hookimpl


def _run(args: argparse.Namespace, ctx: Any) -> int:
    from nodeagent_derper.cli import main

    return int(main(list(args.passthrough_args)) or 0)


def _run_probe(args: argparse.Namespace, ctx: Any) -> int:
    from nodeagent_derper.derpprobe.cli import main

    return int(main(list(args.passthrough_args)) or 0)


@hookimpl
def nodeagent_cli_commands(cli: Any) -> None:
    cli.add_command(("derper",), help="run a DERP relay server (see `derper --help`)",
                    run=_run, needs_socket=False, passthrough=True)
    cli.add_command(("derpprobe",), help="probe the DERP servers of a DERP map (see "
                    "`derpprobe --help`)", run=_run_probe, needs_socket=False, passthrough=True)
