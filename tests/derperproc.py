"""``derper`` as a subprocess for the CLI tests (tests/integration/test_derper_cli.py,
test_derper_usability.py): the command and environment, a one-shot run, the one-line error
check, waiting for its HTTP side, and a ``--dev`` derper on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

ENV = {**os.environ, "NO_PROXY": "*"}  # the installed nodeagent_derper, never a checkout path
DERPER = [sys.executable, "-m", "nodeagent_derper.cli"]


def run_derper(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DERPER, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def popen_dev_derper(port: int, stun_port: int, *, stdout: Any = subprocess.DEVNULL,
                     stderr: Any = subprocess.PIPE,
                     env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``derper --dev`` on 127.0.0.1:``port`` with STUN on ``stun_port`` (0: none)."""
    return subprocess.Popen([*DERPER, "--dev", "-a", f"127.0.0.1:{port}", "--stun-port",
                             str(stun_port)], stdout=stdout, stderr=stderr, text=True,
                            env=ENV if env is None else env)


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("derper: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def wait_http(url: str, proc: subprocess.Popen[str] | None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"derper exited early: {err}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling for readiness with a deadline
