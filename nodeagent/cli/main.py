"""Entry point of the ``nodeagent`` command: parser construction, dispatch, error reporting.

Every user-caused error prints one line ``nodeagent: <what>`` and exits non-zero; tracebacks are
reserved for bugs.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from nodeagent.cli import core_commands
from nodeagent.cli.registry import CLIContext, CLIError, CLIRegistry, load_feature_commands
from nodeagent.errors import run_command
from nodeagent.localapi.server import SOCKET_ENV, default_socket_path
from nodeagent.logconfig import configure_logging


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def build_parser(reg: CLIRegistry) -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: a sub-command's parser must not overwrite a --socket given before it.
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help=f"LocalAPI socket (default ${SOCKET_ENV} or {default_socket_path()})")
    top = _Parser(prog="nodeagent", description="nodeagent: a hackable node agent for "
                  "WireGuard mesh networks.", parents=[common])
    subs: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): top.add_subparsers(dest="_cmd0", metavar="COMMAND")}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): top}

    def group(path: tuple[str, ...]) -> argparse._SubParsersAction:
        if path in subs:
            return subs[path]
        parent = group(path[:-1])
        p = parent.add_parser(path[-1], help=reg.groups.get(path, ""), parents=[common])
        p.set_defaults(_group=path, _parser=p)
        parsers[path] = p
        subs[path] = p.add_subparsers(dest=f"_cmd{len(path)}", metavar="COMMAND")
        return subs[path]

    for path in sorted(reg.groups, key=len):
        group(path)
    for path, cmd in sorted(reg.commands.items()):
        p = group(path[:-1]).add_parser(path[-1], help=cmd.help, description=cmd.help,
                                        parents=[common])
        if cmd.setup is not None:
            cmd.setup(p)
        p.set_defaults(_command=cmd, _cmd_path=("nodeagent", *path))
    return top


def _passthrough(reg: CLIRegistry, argv: list[str]) -> argparse.Namespace | None:
    """argparse cannot hand leading flags to a sub-command's REMAINDER, so commands that wrap
    another program's parser are recognised by their path before argparse runs."""
    for path, cmd in reg.commands.items():
        if cmd.passthrough and tuple(argv[:len(path)]) == path:
            return argparse.Namespace(_command=cmd, _cmd_path=("nodeagent", *path), socket=None,
                                      passthrough_args=list(argv[len(path):]))
    return None


def main(argv: list[str] | None = None) -> int:
    configure_logging("NODEAGENT_LOG")
    reg = CLIRegistry()
    core_commands.register(reg)
    try:
        load_feature_commands(reg)
    except Exception as e:  # a broken feature must not break the core CLI
        print(f"nodeagent: warning: feature CLI commands failed to load: {e}", file=sys.stderr)
    parser = build_parser(reg)
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        args = _passthrough(reg, argv) or parser.parse_args(argv)
        cmd = getattr(args, "_command", None)
        if cmd is None:
            p = getattr(args, "_parser", parser)
            p.print_help(sys.stderr)
            return 2
        ctx = CLIContext(socket=getattr(args, "socket", None) or default_socket_path())
        return int(cmd.run(args, ctx) or 0)

    return run_command("nodeagent", body)


if __name__ == "__main__":
    sys.exit(main())
