"""The derper's STUN server against real third-party clients, and our client against coturn.

- coturn's ``turnutils_stunclient`` and stund's ``stun`` (Debian stun-client, an RFC 3489 client)
  get the right mapped address from our server on 127.0.0.1 (and ::1 for our own client);
- our ``stun_query`` / ``stunc`` read coturn's ``turnserver`` (STUN only, loopback port);
- junk is ignored and counted by reason.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from nodeagent.stun import codec as C
from nodeagent.stun.client import StunTimeout, stun_query
from tests.procutil import stop

pytestmark = pytest.mark.feature("derper")

ENV = dict(os.environ)  # the installed nodeagent_derper, never a checkout path


def free_udp_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self) -> None:
        from nodeagent_derper.metrics import DerperMetrics

        self.registry = CollectorRegistry()
        self.metrics = DerperMetrics(self.registry)
        self.transports: list[asyncio.DatagramTransport] = []
        self.port = 0
        self.answered: list[tuple[str, int]] = []

    def count(self, disposition: str) -> float:
        v = self.registry.get_sample_value("stun_requests_total", {"disposition": disposition})
        return v or 0.0


@pytest_asyncio.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    from nodeagent_derper import stun_server

    srv = Server()
    real = stun_server.build_response_for

    def recording(kind: str, txid: bytes, host: str, port: int) -> bytes:
        srv.answered.append((host, port))  # the source address the server really saw
        return real(kind, txid, host, port)

    monkeypatch.setattr(stun_server, "build_response_for", recording)
    srv.transports = await stun_server.start_stun("", 0, srv.metrics)
    srv.port = srv.transports[0].get_extra_info("sockname")[1]
    try:
        yield srv
    finally:
        for t in srv.transports:
            t.close()


async def run_tool(*argv: str, timeout: float = 20.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=ENV)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.asyncio
async def test_our_client_against_our_server_v4_and_v6(server: Server) -> None:
    lport = free_udp_port()
    (ip, port), rtt = await stun_query("127.0.0.1", server.port, 3.0,
                                       local_addr=("127.0.0.1", lport))
    assert (ip, port) == ("127.0.0.1", lport) and 0 < rtt < 3.0
    if len(server.transports) > 1:  # the host has IPv6
        lport6 = free_udp_port("::1")
        (ip6, port6), _ = await stun_query("::1", server.port, 3.0, local_addr=("::1", lport6))
        assert (ip6, port6) == ("::1", lport6)
        assert server.registry.get_sample_value("stun_addrfamily_total", {"family": "ipv6"}) == 1
    assert server.count("success") == len(server.transports)
    assert server.registry.get_sample_value("stun_binding_requests_by_client_total",
                                            {"kind": "tailnode"}) == len(server.transports)


@pytest.mark.asyncio
async def test_junk_is_ignored_and_counted(server: Server) -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            got.put_nowait(data)

    tr, _ = await loop.create_datagram_endpoint(P, remote_addr=("127.0.0.1", server.port))
    try:
        txid = C.new_txid()
        good = C.build_binding_request(txid)
        for junk in (b"hello", good[:-1] + bytes([good[-1] ^ 0xFF]),
                     C.build_binding_response(txid, "1.2.3.4", 1), bytes(64)):
            tr.sendto(junk)
        tr.sendto(good)  # answered; replies come in order on loopback, so junk got none
        reply = await asyncio.wait_for(got.get(), 5.0)
        assert C.parse_binding_response(reply)[0] == txid
        assert got.empty()
    finally:
        tr.close()
    assert server.count("not_stun") == 2
    assert server.count("bad_fingerprint") == 1
    assert server.count("not_binding") == 1
    assert server.count("success") == 1


@pytest.mark.asyncio
async def test_coturn_stunclient_reads_our_server(server: Server) -> None:
    if shutil.which("turnutils_stunclient") is None:
        pytest.skip("coturn's turnutils_stunclient is not installed (Debian package coturn)")
    rc, out = await run_tool("turnutils_stunclient", "-p", str(server.port), "127.0.0.1")
    assert rc == 0, out
    m = re.search(r"UDP reflexive addr: ([0-9.]+):(\d+)", out)
    assert m, out
    assert (m.group(1), int(m.group(2))) in server.answered
    assert server.answered[0][0] == "127.0.0.1"


@pytest.mark.asyncio
async def test_stund_stun_client_reads_our_server(server: Server) -> None:
    if shutil.which("stun") is None:
        pytest.skip("stund's stun client is not installed (Debian package stun-client)")
    src = free_udp_port()
    # Test 1 of RFC 3489 only: a plain binding request from a chosen source port.
    _, out = await run_tool("stun", f"127.0.0.1:{server.port}", "1", "-v", "-p", str(src))
    m = re.search(r"mappedAddr=([0-9.]+):(\d+)", out)
    assert m, out
    assert (m.group(1), int(m.group(2))) == ("127.0.0.1", src)
    assert server.registry.get_sample_value("stun_binding_requests_by_client_total",
                                            {"kind": "rfc3489"}) >= 1


def _wait_turnserver(port: int, proc: subprocess.Popen[bytes], log: str) -> None:
    async def poll() -> None:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"turnserver exited with {proc.returncode}")
            try:
                await stun_query("127.0.0.1", port, 0.5)
                return
            except (StunTimeout, OSError):
                continue

    # Readiness, not a timing assertion: a loaded CI machine may take a while to start it.
    try:
        asyncio.run(asyncio.wait_for(poll(), 45.0))
    except TimeoutError:
        try:
            with open(log) as f:
                tail = f.read()[-2000:]
        except OSError as e:
            tail = f"(no log: {e})"
        raise AssertionError(f"turnserver on UDP {port} did not answer STUN in 45 s; "
                             f"its log ends:\n{tail}") from None


def test_stunc_reads_coturn_turnserver(tmp_path: os.PathLike[str]) -> None:
    if shutil.which("turnserver") is None:
        pytest.skip("coturn's turnserver is not installed (Debian package coturn)")
    port = free_udp_port()
    proc = subprocess.Popen(
        ["turnserver", "-n", "--listening-ip=127.0.0.1", f"--listening-port={port}",
         # UDP only: the port was checked free for UDP, and a TCP listener on it can collide
         # with an ephemeral port another test's connection holds.
         "--no-tcp", "--no-tls", "--no-dtls", "--stun-only", "--no-cli",
         f"--db={tmp_path}/turndb",
         f"--pidfile={tmp_path}/turnserver.pid", f"--log-file={tmp_path}/turn.log",
         "--simple-log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_turnserver(port, proc, f"{tmp_path}/turn.log")
        lport = free_udp_port()
        (ip, mport), _ = asyncio.run(stun_query("127.0.0.1", port, 3.0,
                                                local_addr=("127.0.0.1", lport)))
        assert (ip, mport) == ("127.0.0.1", lport)
        r = subprocess.run([sys.executable, "-m", "nodeagent_derper.stunc", "127.0.0.1",
                            str(port)], capture_output=True, text=True, timeout=30, env=ENV)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert re.fullmatch(r"mapped 127\.0\.0\.1:\d+", lines[0]), r.stdout
        assert re.fullmatch(r"rtt \d+\.\d{3} ms", lines[1]), r.stdout
    finally:
        stop(proc)


def test_stunc_errors_are_one_line() -> None:
    port = free_udp_port()  # nothing listens: ICMP port unreachable or a timeout
    r = subprocess.run([sys.executable, "-m", "nodeagent_derper.stunc", "127.0.0.1", str(port),
                        "--timeout", "1"], capture_output=True, text=True, timeout=30, env=ENV)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("stunc: ")
    r = subprocess.run([sys.executable, "-m", "nodeagent_derper.stunc", "127.0.0.1", "70000"],
                       capture_output=True, text=True, timeout=30, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "nodeagent_derper.stunc", "no.such.host.invalid"],
                       capture_output=True, text=True, timeout=30, env=ENV)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
