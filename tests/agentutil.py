"""Test helpers to run agents: in-process (for LocalAPI tests) and as real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.procutil import stop


def public_tempdir(prefix: str = "na-") -> str:
    """A temp dir other uids can traverse (pytest's tmp_path is 0700 under /tmp/pytest-of-root)."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


async def localapi(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.request(method, f"http://local-tailscaled.sock{path}",
                             data=None if body is None else json.dumps(body)) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


def metric(text: str, name: str) -> float:
    """The sum of every sample in a Prometheus text ``text`` whose line starts with ``name``
    (so a bare name adds up all its label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for_socket(path: str, proc: subprocess.Popen[Any] | None = None,
                    timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"agent exited with {proc.returncode}: {out}")
        time.sleep(0.02)
    raise TimeoutError(f"socket {path} did not appear within {timeout}s")


def nodeagent_cmd() -> list[str]:
    exe = shutil.which("nodeagent")
    return [exe] if exe else [sys.executable, "-m", "nodeagent.cli.main"]


@contextmanager
def agent_process(args: list[str], sock: str, **kw: Any) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([*nodeagent_cmd(), "up", "--socket", sock, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def run_cli(*args: str, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*nodeagent_cmd(), *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def state_file(state_dir: str) -> Path:
    return Path(state_dir) / "nodeagent.state"
