"""The one base of every error a user can fix: :class:`UserError`.

A leaf module (it imports nothing), so any layer may raise a subclass. The CLI catches
``UserError`` alone and prints it as one line, ``nodeagent: <message>``, exit status 1; anything
else reaching the CLI is a bug and keeps its traceback. Messages are one line naming what was
wrong and where (the file, flag, socket or field). :func:`run_command` is that catch, shared by
the command-line programs (``nodeagent``, ``derpprobe``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix, described in one line."""


class ConfigError(UserError):
    """A bad option or file given to the agent."""


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command-line program's ``body`` and return its exit status: a :class:`UserError`
    prints as one line ``prog: <message>`` (status 1), Ctrl-C is 130, and a reader that went
    away (``prog ... | head``) ends it quietly with 0."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # What is still buffered for stdout would fail again at exit: send it nowhere.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
