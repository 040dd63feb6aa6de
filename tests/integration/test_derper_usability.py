"""A derper a new user starts twice, or opens in a browser: a busy STUN port fails like a busy TCP
port (one line), and ``/`` in ``--dev`` names where this derper listens, not Tailscale's host."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.derperproc import (
    ENV,
    assert_one_line_error,
    popen_dev_derper,
    run_derper,
    wait_http,
)
from tests.derptls import free_port
from tests.procutil import stop

pytestmark = pytest.mark.feature("derper")


def test_second_derper_on_a_busy_stun_port_fails_and_home_names_the_listener() -> None:
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    proc = popen_dev_derper(port, stun)
    try:
        wait_http(f"http://127.0.0.1:{port}/generate_204", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            page = r.read().decode()
        assert f"Host name: 127.0.0.1:{port}<" in page and "derp.tailscale.com" not in page
        # Same STUN port, another HTTP port: refused, as a second HTTP listener would be.
        r2 = run_derper("--dev", "-a", f"127.0.0.1:{free_port()}", "--stun-port", str(stun))
        assert_one_line_error(r2, 1, f"STUN: cannot listen on UDP 127.0.0.1:{stun}: "
                                     "Address already in use")
        r3 = run_derper("--dev", "-a", f"127.0.0.1:{port}", "--stun-port", "0")
        assert_one_line_error(r3, 1, "Address already in use")
        assert proc.poll() is None  # the first one serves on
    finally:
        assert stop(proc) == 0
        if proc.stderr:
            proc.stderr.close()


def test_derper_logs_under_journald_carry_priority_not_timestamp(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        st = os.fstat(f.fileno())
        env = {**ENV, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "DERPER_LOG": "info"}
        proc = popen_dev_derper(port, 0, stderr=f, env=env)
        try:
            wait_http(f"http://127.0.0.1:{port}/generate_204", proc)
        finally:
            assert stop(proc) == 0
    lines = log.read_text().splitlines()
    assert any(ln.startswith("<6>derper: derper serving http") for ln in lines), lines
    assert all(ln.startswith("<") for ln in lines), lines
