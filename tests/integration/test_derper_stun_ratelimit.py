"""The derper's STUN reply rate limit on real loopback sockets.

- a burst of 1000 requests from one source (127.0.0.3) gets at most burst + rate * elapsed
  answers, the rest are counted as ``rate_limited``, and every answer is within the size rule;
- while that source keeps flooding, normal clients from 127.0.0.1 still get their answer: our
  ``stun_query`` and ``stunc``, Tailscale's ``stunc`` (``shared/tools/tailscale``), and when
  installed stund's ``stun`` (Debian stun-client), stuntman's ``stunclient`` and coturn's
  ``turnutils_stunclient``;
- the ``derper`` command with ``--stun-rate-limit``/``--stun-rate-burst`` shows the refusals in
  ``/debug/varz`` and logs them once, not per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from nodeagent.stun import codec as C
from nodeagent.stun.client import stun_query

pytestmark = pytest.mark.feature("derper")

ENV = {**os.environ, "NO_PROXY": "*"}  # the installed nodeagent_derper, never a checkout path
FLOODER = "127.0.0.3"  # any 127/8 address is loopback on Linux: a second source IP
RATE, BURST = 10.0, 20
TAILSCALE_STUNC = Path(__file__).resolve().parents[3] / "shared/tools/tailscale/stunc"


async def poll(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Yield to the event loop until ``cond()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.append(data)


@dataclass
class Stun:
    registry: CollectorRegistry
    port: int
    transports: list[asyncio.DatagramTransport] = field(default_factory=list)

    def count(self, disposition: str) -> int:
        v = self.registry.get_sample_value("stun_requests_total", {"disposition": disposition})
        return int(v or 0)

    def handled(self) -> int:
        return self.count("success") + self.count("rate_limited")


@pytest_asyncio.fixture
async def stun() -> AsyncIterator[Stun]:
    from nodeagent_derper.metrics import DerperMetrics
    from nodeagent_derper.stun_ratelimit import StunRateLimits
    from nodeagent_derper.stun_server import start_stun

    reg = CollectorRegistry()
    # A global budget too, sized so that the one flooder (refused by its own bucket) cannot
    # exhaust it for everyone else.
    limits = StunRateLimits(rate=RATE, burst=BURST, global_rate=50.0)
    trs = await start_stun("127.0.0.1", 0, DerperMetrics(reg), limits=limits)
    s = Stun(reg, trs[0].get_extra_info("sockname")[1], trs)
    try:
        yield s
    finally:
        for t in trs:
            t.close()


async def flood_burst(stun: Stun, n: int, collector: Collector,
                      tr: asyncio.DatagramTransport) -> tuple[list[bytes], float]:
    """Send ``n`` Tailscale requests from the flooder in chunks small enough for the socket
    buffers, each chunk waited for by the server's counters; return (requests, elapsed)."""
    reqs = [C.build_binding_request(C.new_txid()) for _ in range(n)]
    base = stun.handled()
    t0 = time.monotonic()
    for i in range(0, n, 50):
        for r in reqs[i:i + 50]:
            tr.sendto(r)
        want = base + min(i + 50, n)

        def read_all(want: int = want) -> bool:
            return stun.handled() >= want

        await poll(read_all, "the server to read the flood")
    return reqs, time.monotonic() - t0


@pytest.mark.asyncio
async def test_burst_from_one_source_is_capped_and_counted(stun: Stun) -> None:
    loop = asyncio.get_running_loop()
    tr, col = await loop.create_datagram_endpoint(
        Collector, local_addr=(FLOODER, 0), remote_addr=("127.0.0.1", stun.port))
    try:
        reqs, elapsed = await flood_burst(stun, 1000, col, tr)
        answered = stun.count("success")
        assert BURST <= answered <= BURST + RATE * elapsed + 1, (answered, elapsed)
        assert stun.count("rate_limited") == 1000 - answered
        await poll(lambda: len(col.replies) == answered, "the answers to arrive")
        by_txid = {r[8:20]: r for r in reqs}
        for reply in col.replies:
            txid, host, _ = C.parse_binding_response(reply)
            assert host == FLOODER
            assert len(reply) <= len(by_txid[txid]) + C.mapped_address_attr_len(host)
    finally:
        tr.close()


@pytest_asyncio.fixture
async def flooded(stun: Stun) -> AsyncIterator[Stun]:
    """``stun`` with the flooder's bucket drained and the flood still going on."""
    loop = asyncio.get_running_loop()
    tr, col = await loop.create_datagram_endpoint(
        Collector, local_addr=(FLOODER, 0), remote_addr=("127.0.0.1", stun.port))
    await flood_burst(stun, 200, col, tr)
    assert stun.count("rate_limited") > 0

    async def keep_flooding() -> None:
        req = C.build_binding_request(C.new_txid())
        while True:
            for _ in range(20):
                tr.sendto(req)
            await asyncio.sleep(0.01)  # pacing: ~2000 requests/s, not synchronisation

    task = asyncio.create_task(keep_flooding())
    try:
        yield stun
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        tr.close()


async def run_tool(*argv: str, timeout: float = 30.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=ENV)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENTS = ["stun_query", "stunc", "tailscale-stunc", "stun", "stunclient", "turnutils_stunclient"]


@pytest.mark.asyncio
@pytest.mark.parametrize("client", CLIENTS)
async def test_normal_client_answered_while_another_source_floods(flooded: Stun,
                                                                  client: str) -> None:
    port = str(flooded.port)
    refused_before = flooded.count("rate_limited")
    if client == "stun_query":
        lport = _free_udp_port()
        (ip, mport), _ = await stun_query("127.0.0.1", flooded.port, 5.0,
                                          local_addr=("127.0.0.1", lport))
        assert (ip, mport) == ("127.0.0.1", lport)
    elif client == "stunc":
        rc, out = await run_tool(sys.executable, "-m", "nodeagent_derper.stunc", "127.0.0.1",
                                 port)
        assert rc == 0 and re.search(r"^mapped 127\.0\.0\.1:\d+$", out, re.M), out
    elif client == "tailscale-stunc":
        if not os.access(TAILSCALE_STUNC, os.X_OK):
            pytest.skip(f"Tailscale's stunc is not at {TAILSCALE_STUNC}")
        rc, out = await run_tool(str(TAILSCALE_STUNC), "127.0.0.1", port)
        assert rc == 0 and re.search(r"^stun addr: 127\.0\.0\.1:\d+$", out, re.M), out
    elif client == "stun":
        if shutil.which("stun") is None:
            pytest.skip("stund's stun client is not installed (Debian package stun-client)")
        src = _free_udp_port()
        _, out = await run_tool("stun", f"127.0.0.1:{port}", "1", "-v", "-p", str(src))
        m = re.search(r"mappedAddr=([0-9.]+):(\d+)", out)
        assert m and (m.group(1), int(m.group(2))) == ("127.0.0.1", src), out
    elif client == "stunclient":
        if shutil.which("stunclient") is None:
            pytest.skip("stuntman's stunclient is not installed (Debian stuntman-client)")
        rc, out = await run_tool("stunclient", "127.0.0.1", port)
        assert rc == 0 and re.search(r"Mapped address: 127\.0\.0\.1:\d+", out), out
    else:
        if shutil.which("turnutils_stunclient") is None:
            pytest.skip("coturn's turnutils_stunclient is not installed (Debian package coturn)")
        rc, out = await run_tool("turnutils_stunclient", "-p", port, "127.0.0.1")
        assert rc == 0 and re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", out), out
    await poll(lambda: flooded.count("rate_limited") > refused_before,
               "the ongoing flood to be refused")


# --- the derper command ----------------------------------------------------------------------


def _free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _varz_value(base: str, disposition: str) -> float:
    with urllib.request.urlopen(base + "/debug/varz", timeout=5) as r:
        text = r.read().decode()
    prefix = 'stun_requests_total{disposition="' + disposition + '"} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def test_derper_flags_metrics_and_one_log_line() -> None:
    port, stun_port = _free_tcp_port(), _free_udp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeagent_derper.cli", "--dev", "-a", f"127.0.0.1:{port}",
         "--stun-port", str(stun_port), "-stun-rate-limit=1", "--stun-rate-burst", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:  # readiness poll with a deadline
            assert proc.poll() is None, "derper exited early"
            try:
                _varz_value(base, "success")
                break
            except OSError:
                assert time.monotonic() < deadline, "derper did not come up"
                time.sleep(0.05)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(5)
            t0 = time.monotonic()
            for _ in range(100):
                s.sendto(C.build_binding_request(C.new_txid()), ("127.0.0.1", stun_port))
            deadline = t0 + 20
            while _varz_value(base, "success") + _varz_value(base, "rate_limited") < 100:
                assert time.monotonic() < deadline, "derper did not count the requests"
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            answered = _varz_value(base, "success")
            assert 3 <= answered <= 3 + 1 * elapsed + 1, (answered, elapsed)  # burst 3, 1/s
            assert _varz_value(base, "rate_limited") == 100 - answered
            for _ in range(int(answered)):
                assert len(s.recv(100)) == 32
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if "rate limit refused" in ln]
    assert len(lines) == 1, err  # one summary, not one line per refused packet
    assert "latest from 127.0.0.1" in lines[0]
