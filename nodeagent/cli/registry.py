"""The CLI command registry that features extend through the ``nodeagent_cli_commands`` hook."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import pluggy

from nodeagent.errors import UserError
from nodeagent.ipnext.feature import discover
from nodeagent.ipnext.hookspecs import PROJECT, CLISpec
from nodeagent.ipnext.known import KNOWN_FEATURES, not_installed_message
from nodeagent.localapi.client import LocalAPIClient


class CLIError(UserError):
    """A user-caused error: printed as one line, exit status 1."""


@dataclass
class CLIContext:
    socket: str

    @cached_property
    def localapi(self) -> LocalAPIClient:
        return LocalAPIClient(self.socket)


Setup = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace, CLIContext], int]


@dataclass
class Command:
    path: tuple[str, ...]
    help: str
    setup: Setup | None
    run: Run
    needs_socket: bool = True
    passthrough: bool = False  # every argument after the path goes to ``args.passthrough_args``


class CLIRegistry:
    def __init__(self) -> None:
        self.commands: dict[tuple[str, ...], Command] = {}
        self.groups: dict[tuple[str, ...], str] = {}

    def add_group(self, path: tuple[str, ...], help: str) -> None:
        self.groups.setdefault(path, help)

    def add_command(self, path: tuple[str, ...], *, help: str, run: Run,
                    setup: Setup | None = None, needs_socket: bool = True,
                    passthrough: bool = False) -> None:
        """Register a command. ``passthrough`` commands hand all their arguments, flags
        included, to another program's parser (``args.passthrough_args``)."""
        path = tuple(path)
        if path in self.commands:
            raise ValueError(f"CLI command {' '.join(path)!r} is already registered")
        for i in range(1, len(path)):
            self.add_group(path[:i], f"{' '.join(path[:i])} commands")
        self.commands[path] = Command(path, help, setup, run, needs_socket, passthrough)


def load_feature_commands(reg: CLIRegistry) -> list[str]:
    """Let installed features add their commands; return the names of features that did."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CLISpec)
    names = []
    for inst in discover():
        if inst.feature.cli is not None:
            pm.register(inst.feature.cli, name=inst.feature.name)
            names.append(inst.feature.name)
    pm.hook.nodeagent_cli_commands(cli=reg)
    installed = {inst.feature.name for inst in discover()}
    # Commands of known features that are not installed answer with the install command,
    # whatever flags follow them (passthrough: argparse would reject the flags first).
    for f in KNOWN_FEATURES.values():
        for path in f.cli:
            if path not in reg.commands:
                reg.add_command(path, help=f"(needs the {f.name} feature)",
                                run=_missing(f.name, f.name in installed),
                                setup=_swallow_args, needs_socket=False, passthrough=True)
    return names


def _missing(name: str, installed: bool) -> Run:
    def run(args: argparse.Namespace, ctx: CLIContext) -> int:
        cmd = " ".join(args._cmd_path)
        if installed:
            raise CLIError(f"`{cmd}` is not provided by the installed {name} feature "
                           "(upgrade it)")
        raise CLIError(f"`{cmd}` needs a feature that is not installed: "
                       f"{not_installed_message(name)}")

    return run


def _swallow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
