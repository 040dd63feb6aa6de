"""``--tcp-keepalive-time`` / ``--tcp-user-timeout``: the options on the server's accepted
socket, read back with getsockopt on a duplicate of the derper's own descriptor
(``pidfd_getfd``), for our derper and, with the same flags, Tailscale's."""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.derptls import TAILSCALE_DERPER, free_port
from tests.procutil import stop

pytestmark = pytest.mark.feature("derper")

ENV = {**os.environ, "NO_PROXY": "*"}
SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike
_libc = ctypes.CDLL(None, use_errno=True)


def _getfd(pidfd: int, fd: int) -> int:
    return int(_libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))


def server_side_options(pid: int, client: socket.socket) -> dict[str, int] | None:
    """The keep-alive and user-timeout options of ``pid``'s socket connected to ``client``."""
    want = client.getsockname()
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            fd = _getfd(pidfd, int(name))
            if fd < 0:
                continue
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                s = socket.socket(fileno=os.dup(fd))
                try:
                    if s.type != socket.SOCK_STREAM or s.getpeername()[:2] != want[:2]:
                        continue
                    tcp = socket.IPPROTO_TCP
                    return {"keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                            "idle": s.getsockopt(tcp, socket.TCP_KEEPIDLE),
                            "interval": s.getsockopt(tcp, socket.TCP_KEEPINTVL),
                            "count": s.getsockopt(tcp, socket.TCP_KEEPCNT),
                            "user_timeout_ms": s.getsockopt(tcp, socket.TCP_USER_TIMEOUT)}
                except OSError:
                    continue
                finally:
                    s.close()
            finally:
                os.close(fd)
    finally:
        os.close(pidfd)
    return None


def options_of(argv: list[str], port: int) -> dict[str, int]:
    """Start a derper, connect, read the server side's options, stop it."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"{argv[0]} exited: {err}")
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling with a deadline
        with client:
            while True:  # accept() happens asynchronously in the server
                got = server_side_options(proc.pid, client)
                if got is not None:
                    return got
                if time.monotonic() > deadline:
                    raise AssertionError("the server's socket for the connection not found")
                time.sleep(0.05)
    finally:
        stop(proc)
        if proc.stderr:
            proc.stderr.close()


def ours(tmp: Path, port: int, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "nodeagent_derper.cli", "-a", f"127.0.0.1:{port}",
            "--stun=false", "--http-port", "-1", "-c", str(tmp / "ours.key"), *flags]


def tailscales(tmp: Path, port: int, flags: list[str]) -> list[str]:
    return [str(TAILSCALE_DERPER), "-a", f"127.0.0.1:{port}", "-stun=false", "-http-port",
            "-1", "-c", str(tmp / "ts.key"), *flags]


@pytest.fixture(scope="module")
def pidfd_ok() -> None:
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open")
    with subprocess.Popen(["sleep", "30"]) as p:
        try:
            pidfd = os.pidfd_open(p.pid)
            fd = _getfd(pidfd, 0)
            os.close(pidfd)
            if fd < 0:
                pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            os.close(fd)
        finally:
            p.kill()


@pytest.mark.parametrize("flags, expect", [
    ([], {"keepalive": 1, "idle": 600, "interval": 15, "count": 9, "user_timeout_ms": 15000}),
    (["--tcp-keepalive-time=42s", "--tcp-user-timeout=2.5s"],
     {"keepalive": 1, "idle": 42, "interval": 15, "count": 9, "user_timeout_ms": 2500}),
    (["--tcp-keepalive-time=-1s", "--tcp-user-timeout=0"],  # Tailscale's way to switch off
     {"keepalive": 0, "user_timeout_ms": 0}),
], ids=["defaults", "set", "off"])
def test_tcp_options_match_tailscale(pidfd_ok: None, tmp_path: Path, flags: list[str],
                                     expect: dict[str, int]) -> None:
    port = free_port()
    got = options_of(ours(tmp_path, port, flags), port)
    assert {k: got[k] for k in expect} == expect, got
    if TAILSCALE_DERPER.exists():
        port = free_port()
        theirs = options_of(tailscales(tmp_path, port, flags), port)
        if expect["keepalive"]:
            assert theirs == got
        else:  # with keep-alive off the idle/interval/count values are the kernel's
            assert {k: theirs[k] for k in expect} == expect, theirs


def test_tcp_keepalive_zero_disables(pidfd_ok: None, tmp_path: Path) -> None:
    """``0`` switches keep-alive off here (Go's derper would use its 15 s default instead)."""
    port = free_port()
    got = options_of(ours(tmp_path, port, ["--tcp-keepalive-time", "0"]), port)
    assert got["keepalive"] == 0 and got["user_timeout_ms"] == 15000, got
