"""netcheck against real derpers, the LocalAPI ``derpmap`` / ``debug-netcheck`` endpoints, and
the CLIs: ours (``nodeagent netcheck``) and Tailscale's (``tailscale --socket=… netcheck``,
which runs the probes itself and only asks the agent for ``derpmap``).

Derpers are ``derper --dev``-style (plain HTTP, STUN on a loopback port), two regions in a DERP
map with ``IPv4: 127.0.0.1``, ``STUNPort`` and ``DERPPort`` (``InsecureForTests``, so netcheck's
latency fallback may speak plain HTTP to them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from nodeagent.agent import Agent
from nodeagent.localapi.client import LocalAPIClient
from nodeagent.netcheck.client import UDPStunTransport, https_latency, run_netcheck
from nodeagent.tailcfg import (
    DERPNode,
    DERPRegion,
    derpmap_from_wire,
    derpmap_to_json,
    marshal_json,
    netmap_from_wire,
)
from tests.agentutil import localapi, nodeagent_cmd, public_tempdir, wait_for_socket
from tests.netns import make_netns, popen_in_netns, run_in_netns, skip_unless_netns

pytestmark = pytest.mark.feature("derper")

TAILSCALE = Path(__file__).resolve().parents[3] / "shared/tools/tailscale/tailscale"
ENV = dict(os.environ)  # the installed nodeagent_derper


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Derper:
    def __init__(self, proc: subprocess.Popen[bytes], log: IO[bytes], http_port: int,
                 stun_port: int) -> None:
        self.proc, self.log, self.http_port, self.stun_port = proc, log, http_port, stun_port

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def start_derper(http_port: int, stun_port: int, *extra: str, stun: bool = True,
                 netns: str | None = None) -> Derper:
    """Our derper on 127.0.0.1:``http_port`` (plain HTTP with ``--dev``), STUN on UDP
    ``stun_port`` unless ``stun`` is false; waits for its "serving" log line."""
    argv = [sys.executable, "-m", "nodeagent_derper.cli", "-a", f"127.0.0.1:{http_port}",
            f"--stun={'true' if stun else 'false'}", "--stun-port", str(stun_port), *extra]
    if "--certmode" not in extra:
        argv.append("--dev")
    log = tempfile.TemporaryFile()
    kw: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": log, "env": ENV}
    proc = popen_in_netns(netns, argv, **kw) if netns else subprocess.Popen(argv, **kw)
    d = Derper(proc, log, http_port, stun_port)
    deadline = time.monotonic() + 20
    while "derper serving" not in d.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = d.log_text()
            d.stop()
            raise RuntimeError(f"derper did not start: {text}")
        time.sleep(0.05)
    return d


def derp_map_wire(derpers: list[Derper]) -> dict[str, Any]:
    regions = {}
    for i, (d, (code, name)) in enumerate(zip(derpers, (("one", "Region One"),
                                                        ("two", "Region Two")), strict=False)):
        rid = 901 + i
        regions[str(rid)] = {"RegionID": rid, "RegionCode": code, "RegionName": name, "Nodes": [
            {"Name": f"{rid}a", "RegionID": rid, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
             "STUNPort": d.stun_port, "DERPPort": d.http_port, "InsecureForTests": True}]}
    return {"Regions": regions}


@pytest.fixture
def two_derpers() -> Iterator[list[Derper]]:
    ds = [start_derper(free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM))
          for _ in range(2)]
    try:
        yield ds
    finally:
        for d in ds:
            d.stop()


@pytest.fixture
def two_derpers_without_stun() -> Iterator[list[Derper]]:
    ds = [start_derper(free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM), stun=False)
          for _ in range(2)]
    try:
        yield ds
    finally:
        for d in ds:
            d.stop()


# --- the netcheck itself -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stun_finds_both_regions(two_derpers: list[Derper]) -> None:
    dm = derpmap_from_wire(derp_map_wire(two_derpers))
    transport = UDPStunTransport.open(bind_v4=("127.0.0.1", 0), bind_v6=None)
    try:
        r = await run_netcheck(dm, send_stun=transport)
        port = transport.local_port(4)
    finally:
        transport.close()
    assert r.UDP and r.IPv4 and r.IPv4CanSend
    assert set(r.RegionLatency) == set(r.RegionV4Latency) == {901, 902}
    assert all(0 < d < 1_000_000_000 for d in r.RegionLatency.values())
    assert r.GlobalV4 == f"127.0.0.1:{port}"
    assert list(r.GlobalV4Counters) == [f"127.0.0.1:{port}"]
    assert r.GlobalV4Counters[r.GlobalV4] >= 2  # one per region (more if a retry raced)
    assert r.MappingVariesByDestIP is False  # one socket, two servers, same mapping
    assert r.PreferredDERP in (901, 902)
    assert r.PreferredDERP == min(r.RegionLatency, key=lambda k: (r.RegionLatency[k], k))
    # The default transport: sockets of its own; every set answers, so no 3 s wait.
    t0 = time.monotonic()
    r2 = await run_netcheck(dm)
    assert time.monotonic() - t0 < 2.5
    assert set(r2.RegionLatency) == {901, 902} and r2.UDP
    assert re.fullmatch(r"127\.0\.0\.1:\d+", r2.GlobalV4)


@pytest.mark.asyncio
async def test_http_latency_fallback_without_stun(
        two_derpers_without_stun: list[Derper]) -> None:
    dm = derpmap_from_wire(derp_map_wire(two_derpers_without_stun))
    t0 = time.monotonic()
    r = await run_netcheck(dm)
    took = time.monotonic() - t0
    assert not r.UDP and r.IPv4 and r.GlobalV4 == ""
    assert set(r.RegionLatency) == {901, 902} and r.RegionV4Latency == {}
    assert all(0 < d < 1_000_000_000 for d in r.RegionLatency.values())
    assert r.PreferredDERP in (901, 902)
    assert 2.9 < took < 5.5, took  # the whole 3 s STUN phase, then HTTP within the budget


@pytest.mark.asyncio
async def test_https_latency_checks_certname_pin() -> None:
    certdir = tempfile.mkdtemp(prefix="nc-certs-")
    port = free_port(socket.SOCK_STREAM)
    d = start_derper(port, 0, "--certmode", "manual", "--hostname", "127.0.0.1", "--certdir",
                     certdir, "--http-port=-1", "-c", os.path.join(certdir, "key.json"),
                     stun=False)
    try:
        m = re.search(r"CertName: (sha256-raw:[0-9a-f]{64})", d.log_text())
        assert m, d.log_text()

        def reg(**kw: Any) -> DERPRegion:
            return DERPRegion(RegionID=1, Nodes=[DERPNode(Name="1a", HostName="127.0.0.1",
                                                          DERPPort=port, **kw)])

        pinned = await https_latency(reg(CertName=m.group(1)))
        assert pinned is not None and pinned[1] == 4 and pinned[0] > 0
        assert await https_latency(reg(CertName="sha256-raw:" + "0" * 64)) is None
        assert await https_latency(reg()) is None  # self-signed: verification fails
        assert await https_latency(reg(InsecureForTests=True)) is not None
    finally:
        d.stop()
        subprocess.run(["rm", "-rf", certdir], check=False)


# --- the LocalAPI, in process ------------------------------------------------------------------



async def raw_get(sock: str, method: str, name: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s, \
            s.request(method, f"http://local-tailscaled.sock/localapi/v0/{name}") as r:
        return r.status, await r.text()


async def run_async(*argv: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.asyncio
async def test_localapi_derpmap_and_debug_netcheck(agent: Agent,
                                                   two_derpers: list[Derper]) -> None:
    sock = agent.opts.socket
    assert await raw_get(sock, "GET", "derpmap") == (200, "null\n")
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, body = await raw_get(sock, method, "derpmap")
        assert code == 400 and json.loads(body) == {"error": "want GET"}
    code, e = await localapi(sock, "GET", "/localapi/v0/debug-netcheck")
    assert code == 412 and "no DERP map" in e["error"]
    rc, out, err = await run_async(*nodeagent_cmd(), "netcheck", "--socket", sock)
    assert rc == 1 and out == "" and err.count("\n") == 1 and "no DERP map" in err

    wire = derp_map_wire(two_derpers)
    agent.backend.set_netmap(netmap_from_wire({"DERPMap": wire}))
    code, text = await raw_get(sock, "GET", "derpmap")
    dm = derpmap_from_wire(wire)
    assert code == 200 and text == marshal_json(derpmap_to_json(dm), "\t") + "\n"
    assert text.startswith('{\n\t"Regions": {\n\t\t"901": {\n\t\t\t"RegionID": 901,')
    assert derpmap_from_wire(json.loads(text)) == dm
    code, rep = await localapi(sock, "GET", "/localapi/v0/debug-netcheck")
    assert code == 200 and rep["UDP"] is True
    assert set(rep["RegionLatency"]) == {"901", "902"}
    assert rep["GlobalV4"].startswith("127.0.0.1:") and rep["PreferredDERP"] in (901, 902)

    rc, out, err = await run_async(*nodeagent_cmd(), "netcheck", "--socket", sock, "--verbose")
    assert rc == 0, err
    assert out.startswith("\nReport:\n\t* Time: ") and "\t* UDP: true\n" in out
    assert re.search(r"\n\t\t- one: [0-9.]+(µs|ms) +\(derp901, Region One\)\n", out), out
    assert re.search(r"\n\t\t- two: [0-9.]+(µs|ms) +\(derp902, Region Two\)\n", out), out
    rc, out, err = await run_async(*nodeagent_cmd(), "netcheck", "--socket", sock,
                                   "--format", "json-line")
    assert rc == 0 and out.count("\n") == 1 and "not yet considered a stable" in err
    assert set(json.loads(out)["RegionLatency"]) == {"901", "902"}


@pytest.mark.asyncio
async def test_tailscale_cli_against_the_agent(agent: Agent, two_derpers: list[Derper]) -> None:
    if not TAILSCALE.exists():
        pytest.skip(f"Tailscale's CLI is not available at {TAILSCALE}")
    sock = agent.opts.socket
    wire = derp_map_wire(two_derpers)
    agent.backend.set_netmap(netmap_from_wire({"DERPMap": wire}))
    rc, out, err = await run_async(str(TAILSCALE), f"--socket={sock}", "debug", "derp-map")
    assert rc == 0, err
    assert derpmap_from_wire(json.loads(out)) == derpmap_from_wire(wire)
    rc, out, err = await run_async(str(TAILSCALE), f"--socket={sock}", "netcheck")
    assert rc == 0, err
    assert "Warning: client version" not in err and "No DERP map" not in err
    assert "\t* UDP: true\n" in out and "\t* IPv4: yes, 127.0.0.1:" in out
    assert re.search(r"\t\t- one: [0-9.]+(µs|ms) +\(Region One\)\n", out), out
    assert re.search(r"\t\t- two: [0-9.]+(µs|ms) +\(Region Two\)\n", out), out
    rc, out, err = await run_async(str(TAILSCALE), f"--socket={sock}", "netcheck",
                                   "--format=json")
    assert rc == 0, err
    assert set(json.loads(out)["RegionLatency"]) == {"901", "902"}


# --- an agent process from --netmap-file, in a namespace ----------------------------------------


def test_agent_from_netmap_file_serves_derpmap_and_netcheck() -> None:
    skip_unless_netns(tun=True)
    d = public_tempdir()
    sock = os.path.join(d, "na.sock")
    nm_path = os.path.join(d, "netmap.json")
    with make_netns("nchk") as ns:
        # A fresh namespace: only loopback, so fixed ports are free.
        derpers = [start_derper(3340 + i, 3478 + i, netns=ns) for i in range(2)]
        try:
            wire = derp_map_wire(derpers)
            with open(nm_path, "w") as f:
                json.dump({"SelfNode": {"Addresses": ["100.64.0.1/32"]}, "DERPMap": wire}, f)
            log_path = os.path.join(d, "agent.log")
            argv = [*nodeagent_cmd(), "up", "--socket", sock, "--state-dir",
                    os.path.join(d, "st"), "--tun", "na0", "--port", "0",
                    "--netmap-file", nm_path]
            with open(log_path, "w") as logf:
                proc = popen_in_netns(ns, argv, stdout=subprocess.DEVNULL, stderr=logf)
            try:
                wait_for_socket(sock, proc)
                api = LocalAPIClient(sock)
                deadline = time.monotonic() + 10
                while (got := api.get("derpmap")) is None:
                    assert time.monotonic() < deadline, open(log_path).read()
                    time.sleep(0.05)
                assert derpmap_from_wire(got) == derpmap_from_wire(wire)
                # Our CLI runs outside the namespace: the agent probes from inside it.
                r = subprocess.run([*nodeagent_cmd(), "netcheck", "--socket", sock],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, r.stderr
                out = r.stdout
                assert out.startswith("\nReport:\n") and "\t* UDP: true\n" in out
                assert "\t* IPv4: yes, 127.0.0.1:" in out
                assert "\t* Nearest DERP: Region " in out and "\t* DERP latency:\n" in out
                assert re.search(r"\n\t\t- one: [0-9.]+(µs|ms) +\(Region One\)\n", out), out
                assert re.search(r"\n\t\t- two: [0-9.]+(µs|ms) +\(Region Two\)\n", out), out
                if TAILSCALE.exists():  # the real CLI probes from inside the namespace itself
                    ts = run_in_netns(ns, [str(TAILSCALE), f"--socket={sock}", "netcheck"])
                    assert ts.returncode == 0, ts.stderr
                    assert "\t* UDP: true\n" in ts.stdout
                    assert "- one: " in ts.stdout and "- two: " in ts.stdout
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            for der in derpers:
                der.stop()
    subprocess.run(["rm", "-rf", d], check=False)
