"""Idle sockets cannot lock anyone out of the LocalAPI or the control server (real processes).

A connection that has not sent a whole request within the request deadline is closed, one
non-root uid cannot hold more than ``MAX_CONNS_PER_UID`` LocalAPI connections (root's CLI keeps
working while ``nobody`` hoards sockets), and both servers raise their open-file limit at start.
The derper's side of the same story is in ``test_derper_limits.py``.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.localapi.server import MAX_CONNS_PER_UID
from tests.agentutil import agent_process, nodeagent_cmd, public_tempdir, run_cli
from tests.derpload import close_all, closed_by_peer, free_port
from tests.procutil import stop

_ENV = {**os.environ, "NODEAGENT_HTTP_REQUEST_TIMEOUT": "2"}


def _nofile(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return soft, hard


@pytest.fixture
def agent_sock() -> Iterator[tuple[str, int]]:
    d = public_tempdir()
    sock = os.path.join(d, "na.sock")
    try:
        with agent_process(["--state-dir", os.path.join(d, "state")], sock, env=_ENV,
                           preexec_fn=lambda: _set_nofile(1024, 4096)) as proc:
            yield sock, proc.pid
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


def _set_nofile(soft: int, hard: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _unix_conns(path: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        out.append(s)
        s.connect(path)
    return out


def test_localapi_closes_connections_without_a_whole_request(agent_sock: tuple[str, int]
                                                             ) -> None:
    sock, pid = agent_sock
    assert _nofile(pid) == ("4096", "4096")
    silent = _unix_conns(sock, 5)
    partial = _unix_conns(sock, 1)
    partial[0].sendall(b"GET /localapi/v0/status HTTP/1.1\r\nHost: local-tailscaled.sock\r\n")
    try:
        t0 = time.monotonic()
        assert closed_by_peer(silent + partial, 15) == 6
        assert time.monotonic() - t0 < 10
    finally:
        close_all(silent + partial)


_HOARDER = textwrap.dedent("""
    import os, pwd, resource, select, socket, sys, time
    path, n = sys.argv[1], int(sys.argv[2])
    pw = pwd.getpwnam("nobody")
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(pw.pw_uid)
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError:
            s.close()
            continue
        socks.append(s)
    time.sleep(0.5)  # refusals are immediate; give them a moment to arrive
    alive = 0
    for s in socks:
        p = select.poll()
        p.register(s, select.POLLIN | select.POLLHUP)
        if not p.poll(0):
            alive += 1
        else:
            try:
                alive += bool(s.recv(1, socket.MSG_PEEK))
            except OSError:
                pass
    print(alive, flush=True)
    sys.stdin.read()
""")


def test_one_uid_cannot_starve_root(agent_sock: tuple[str, int]) -> None:
    sock, _ = agent_sock
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")
    hoarder = subprocess.Popen([sys.executable, "-c", _HOARDER, sock, "1200"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hoarder.stdout is not None
        alive = int(hoarder.stdout.readline())
        assert alive == MAX_CONNS_PER_UID
        t0 = time.monotonic()
        r = run_cli("status", "--socket", sock, "--json", timeout=20)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < 10
    finally:
        stop(hoarder, signal.SIGKILL)


def test_control_server_closes_idle_connections_and_raises_fd_limit(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([*nodeagent_cmd(), "control", "serve", "--listen",
                             f"127.0.0.1:{port}", "--state-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_ENV,
                            preexec_fn=lambda: _set_nofile(1024, 4096))
    silent: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "control-url").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "control did not start"
            time.sleep(0.05)
        assert _nofile(proc.pid) == ("4096", "4096")
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            silent.append(s)
        silent[0].sendall(b"POST /machine/register HTTP/1.1\r\nHost: x\r\n")
        assert closed_by_peer(silent, 15) == 20
    finally:
        close_all(silent)
        stop(proc)
