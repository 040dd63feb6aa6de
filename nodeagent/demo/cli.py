"""Registers ``nodeagent demo`` with the CLI and checks what it needs before anything is made.

Owns the command's flags: ``--keep`` (run until Ctrl-C), ``--web`` (the live page of rejections,
until Ctrl-C), ``--direct`` (no relay) and ``--cleanup`` (only remove what killed demo runs left,
then exit).
"""

from __future__ import annotations

import argparse
import sys

from nodeagent.cli.registry import CLIContext, CLIError, CLIRegistry
from nodeagent.errors import UserError


def register(reg: CLIRegistry) -> None:
    reg.add_command(("demo",), help="build a small tailnet on this machine (root) and show a "
                    "refused connection and why", setup=_setup, run=_run, needs_socket=False)


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true",
                   help="keep the tailnet running after the story, until Ctrl-C")
    p.add_argument("--web", action="store_true",
                   help="also serve the live page of the laptop's rejected connections "
                   "(nodeagent web, feature connreject) on 127.0.0.1; implies --keep")
    p.add_argument("--direct", action="store_true",
                   help="no DERP relay even if the derper feature is installed: the agents "
                   "reach each other directly")
    p.add_argument("--cleanup", action="store_true",
                   help="only remove what earlier (killed) demo runs left behind, then exit")


def _say(line: str) -> None:
    print(line, flush=True)


def _begin(text: str) -> None:
    print(text, end="", flush=True)


def _run(args: argparse.Namespace, ctx: CLIContext) -> int:
    from nodeagent.demo.lab import missing_requirement

    if (why := missing_requirement()) is not None:
        raise CLIError(why)
    if args.cleanup:
        from nodeagent.demo.leftovers import clean_dead_runs

        gone = clean_dead_runs()
        print("removed: " + ", ".join(gone) if gone else "nothing left by earlier demo runs")
        return 0
    from nodeagent.demo.story import run

    try:
        return run(args.keep, _say, _begin, direct=args.direct, web=args.web)
    except CLIError:
        raise
    except UserError as e:
        raise CLIError(f"demo: {e}") from None
    except OSError as e:
        raise CLIError(f"demo: {e.strerror or e}"
                       + (f": {e.filename}" if getattr(e, "filename", None) else "")) from None
    finally:
        sys.stdout.flush()
