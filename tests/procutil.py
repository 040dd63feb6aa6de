"""Stopping child processes in tests: one signal, a bounded wait, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
         timeout: float = 10.0) -> int | None:
    """Send ``sig`` to ``proc`` if it still runs and wait up to ``timeout`` s for it to exit;
    past that, SIGKILL it and reap it (waiting ``timeout`` s more). Returns the exit status
    (negative: the signal that ended it), ``None`` for ``proc=None``. Quiet for a process that
    has already exited."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode
