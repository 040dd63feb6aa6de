"""The derper's resource limits against a real ``derper`` process on loopback.

Nothing of a closed connection stays behind (RSS flat over 25 000 visits), silent sockets do not
lock other clients out (the open-file limit is raised, requests have a deadline), one source IP
cannot hold more than ``--max-pending-per-ip`` connections that have not logged in, and when the
open-file limit is hit anyway, accept errors are logged once per interval and service recovers
by itself.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import time

import pytest
from nacl.public import PrivateKey

from nodeagent.netguard import raise_nofile_limit
from tests import derpload as D

pytestmark = pytest.mark.feature("derper")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=("127.0.0.4", 0))
    try:
        conn.request("GET", "/debug/varz")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not served")


def test_closed_connections_leave_nothing_behind() -> None:
    port = D.free_port()
    proc = D.start_derper(port)
    try:
        assert asyncio.run(D.churn(port, 1000, login=False)) == 0
        start = D.rss_kib(proc.pid)
        assert asyncio.run(D.churn(port, 20_000, login=False)) == 0
        after_upgrades = D.rss_kib(proc.pid)
        keys = [bytes(PrivateKey.generate()) for _ in range(5000)]
        assert asyncio.run(D.churn(port, 5000, login=True, keys=keys)) == 0
        end = D.rss_kib(proc.pid)
        print(f"derper RSS after 1 000 visits {start} KiB; +{after_upgrades - start} KiB after "
              f"20 000 upgrade-and-close, +{end - after_upgrades} KiB after 5 000 "
              f"login-and-close (distinct keys)")
        # Before the fix: ≈125 MB for the upgrades alone. A few MB is allocator noise.
        assert end - start < 8 * 1024, (start, after_upgrades, end)
        assert D.open_fds(proc.pid) < 64
    finally:
        D.stop_process(proc)


def test_idle_sockets_do_not_lock_out_clients() -> None:
    hard = raise_nofile_limit()
    if hard <= 4096:
        pytest.skip(f"hard RLIMIT_NOFILE is {hard}: no room above 1024 for the derper to take")
    port = D.free_port()
    # The common default soft limit of 1024, with room above it that the derper must take.
    proc = D.start_derper(port, "--max-pending-per-ip", "0", nofile=(1024, 4096),
                          env=_env(NODEAGENT_HTTP_REQUEST_TIMEOUT="3"))
    proc_limits = ""
    try:
        with open(f"/proc/{proc.pid}/limits") as f:
            proc_limits = next(line for line in f if line.startswith("Max open files"))
        silent = D.silent_sockets(port, 1100)
        try:
            took = D.login_within(port, 10, source="127.0.0.2")
            print(f"login with 1 100 silent sockets open: {took:.2f} s; {proc_limits.strip()}")
            closed = D.closed_by_peer(silent, 15)
            assert closed == len(silent), f"{closed} of {len(silent)} silent sockets closed"
        finally:
            D.close_all(silent)
    finally:
        D.stop_process(proc)
    soft = int(proc_limits.split()[3])
    assert soft > 1024


def test_soft_limit_is_raised_to_hard() -> None:
    port = D.free_port()
    proc = D.start_derper(port, nofile=(1024, 4096))
    try:
        with open(f"/proc/{proc.pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        D.stop_process(proc)


def test_pending_connections_per_source_ip_are_bounded() -> None:
    port = D.free_port()
    proc = D.start_derper(port, "--max-pending-per-ip", "20")
    socks = []
    try:
        socks = D.silent_sockets(port, 30)
        # The ten over the limit are closed at once (well before any request deadline).
        assert D.closed_by_peer(socks, 5) == 10
        # The same source cannot start an eleventh...
        with pytest.raises((OSError, asyncio.IncompleteReadError, TimeoutError)):
            D.login_within(port, 5)
        # ...another source can, and logged-in clients do not count against their source.
        assert asyncio.run(D.churn(port, 1, login=True)) == 1
        assert D.login_within(port, 5, source="127.0.0.2") < 5

        async def hold_logged_in(n: int) -> int:
            conns = []
            try:
                for _ in range(n):
                    r, w = await asyncio.open_connection("127.0.0.1", port,
                                                         local_addr=("127.0.0.3", 0))
                    conns.append(w)
                    w.write(D.UPGRADE_REQUEST)
                    server_pub = await D._read_upgrade(r)
                    w.write(D.F.encode_client_info(bytes(PrivateKey.generate()), server_pub,
                                                   {"version": 2}))
                    head = await r.readexactly(5)
                    await r.readexactly(int.from_bytes(head[1:], "big"))
                return len(conns)
            finally:
                for w in conns:
                    w.close()

        assert asyncio.run(asyncio.wait_for(hold_logged_in(40), 20)) == 40
        assert _metric(port, "derper_rejected_unauthenticated_connections") >= 11
    finally:
        D.close_all(socks)
        D.stop_process(proc)


def test_accept_errors_are_throttled_and_service_recovers() -> None:
    port = D.free_port()
    # A hard limit the derper cannot raise: accept must hit EMFILE.
    proc = D.start_derper(port, "--max-pending-per-ip", "0", nofile=(64, 64),
                          env=_env(NODEAGENT_HTTP_REQUEST_TIMEOUT="2"))
    silent: list[socket.socket] = []
    try:
        silent = D.silent_sockets(port, 120)
        t0 = time.monotonic()
        took = D.login_within(port, 30, source="127.0.0.2")
        print(f"login after 120 silent sockets against a 64-fd derper: {took:.2f} s")
        # Wait until the derper has worked through the backlog, then look at its log.
        assert D.closed_by_peer(silent, 30) == len(silent)
        assert time.monotonic() - t0 < 60
    finally:
        D.close_all(silent)
        D.stop_process(proc)
    err = D.stderr_text(proc)
    accept_lines = [line for line in err.splitlines() if "accept" in line]
    assert accept_lines, err[-2000:]
    assert len(accept_lines) <= 2, accept_lines
