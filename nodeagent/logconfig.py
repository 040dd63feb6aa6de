"""Logging set-up of the command-line programs (``nodeagent``, ``derper``).

Owns the log line format. On a terminal or in a file each line starts with a timestamp; when
stderr is a journald stream (systemd sets ``JOURNAL_STREAM`` to its device and inode), journald
stamps the lines itself, so a line is ``<priority>name: message`` instead: no second timestamp,
and the ``<N>`` prefix (syslog priority, sd-daemon(3)) gives each line its level in the journal.
"""

from __future__ import annotations

import logging
import os
import sys

JOURNAL_STREAM_ENV = "JOURNAL_STREAM"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# logging level -> syslog priority (debug 7, info 6, warning 4, error 3, critical 2)
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def stderr_is_journal() -> bool:
    """Whether stderr is the journald stream systemd connected (``JOURNAL_STREAM=dev:inode``)."""
    want = os.environ.get(JOURNAL_STREAM_ENV, "")
    if not want:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def syslog_priority(levelno: int) -> int:
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<priority>name: message``; a traceback's lines follow with the same priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


def configure_logging(level_env: str, default: str = "INFO") -> None:
    """Log to stderr at the level named by ``$level_env``; a name that is not a level logs a
    one-line warning and keeps ``default``."""
    raw = os.environ.get(level_env, "").strip()
    level = raw.upper() or default
    bad = level not in LEVELS
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=default if bad else level, handlers=[handler])
    if bad:
        logging.getLogger("nodeagent").warning("%s=%s is not a log level (one of %s); using %s",
                                               level_env, raw, ", ".join(LEVELS), default)
