"""The one base of every error a user can fix: :class:`UserError`.

A leaf module (it imports nothing), so any layer may raise a subclass. The CLI catches
``UserError`` alone and prints it as one line, ``nodeagent: <message>``, exit status 1; anything
else reaching the CLI is a bug and keeps its traceback. Messages are one line naming what was
wrong and where (the file, flag, socket or field).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix, described in one line."""


class ConfigError(UserError):
    """A bad option or file given to the agent."""
