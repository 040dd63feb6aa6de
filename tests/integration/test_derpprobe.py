"""derpprobe against a fleet of our derper processes on loopback (TLS with one shared self-signed
certificate for 127.0.0.1, STUN on each): ``--once`` all green, the mesh probe through a meshed
two-node region (and failing for two nodes that are not meshed), ``nodeagent derpprobe
--derp-map local`` from an agent's netmap, and the service: a killed node turns red on
``/metrics`` and on the status page within one interval while the others stay green; the page is
rendered by headless Chromium (DOM dump checked, screenshot kept).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from tests.derptls import free_port
from tests.procutil import stop

pytestmark = [pytest.mark.feature("derper"), pytest.mark.timeout(180)]

DERPER = [sys.executable, "-m", "nodeagent_derper.cli"]
PROBE = [sys.executable, "-m", "nodeagent_derper.derpprobe.cli"]
MESH_KEY = "7a" * 32
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INTERVAL = 2.0
TIMEOUT = 2.0
ENV = {**os.environ, "NO_PROXY": "*"}


@dataclass
class Derper:
    name: str
    region: int
    port: int
    stun_port: int
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def node(self) -> dict[str, Any]:
        return {"Name": self.name, "RegionID": self.region, "HostName": "127.0.0.1",
                "IPv4": "127.0.0.1", "DERPPort": self.port, "STUNPort": self.stun_port,
                "InsecureForTests": True}


@dataclass
class Fleet:
    tmp: str
    derpers: dict[str, Derper]
    meshed: bool
    map_path: str = ""
    wire: dict[str, Any] = field(default_factory=dict)

    @property
    def map_url(self) -> str:
        return f"file://{self.map_path}"

    def write_map(self, name: str, regions: dict[int, list[str]]) -> str:
        wire = {"Regions": {str(rid): {"RegionID": rid, "RegionCode": f"r{rid}",
                                       "RegionName": f"test {rid}",
                                       "Nodes": [{**self.derpers[n].node(), "RegionID": rid}
                                                 for n in names]}
                            for rid, names in regions.items()}}
        path = os.path.join(self.tmp, name)
        Path(path).write_text(json.dumps(wire, indent=1))
        return path


def derper_has_mesh() -> bool:
    r = subprocess.run([*DERPER, "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    return "--mesh-with" in r.stdout


def start_derper(name: str, region: int, tmp: str, certdir: str, extra: list[str],
                 env: dict[str, str], port: int = 0) -> Derper:
    port, stun = port or free_port(), free_port(socket.SOCK_DGRAM)
    log = tempfile.TemporaryFile()
    argv = [*DERPER, "-a", f"127.0.0.1:{port}", "--certmode", "manual", "--certdir", certdir,
            "--hostname", "127.0.0.1", "--http-port", "-1", "--stun-port", str(stun),
            "-c", os.path.join(tmp, f"{name}.key"), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env)
    return Derper(name, region, port, stun, proc, log)


def wait_serving(d: Derper, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while "derper serving" not in d.log_text():
        if d.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"derper {d.name} did not start: {d.log_text()[-2000:]}")
        time.sleep(0.05)  # polling the log with a deadline


def mesh_ok(map_path: str) -> bool:
    from nodeagent_derper.derpprobe.mapload import load_derp_map
    from nodeagent_derper.derpprobe.probes import MESH, run_round

    dm = load_derp_map(f"file://{map_path}", socket_path="")
    results = asyncio.run(run_round(dm, timeout=TIMEOUT))
    mesh = [r for r in results if r.probe == MESH]
    return bool(mesh) and all(r.ok for r in mesh)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Four derpers: 901a + 901b meshed in region 901 (when the derper has ``--mesh-with``;
    else 901b is alone in region 904), 902a, and 903a, the one the service test kills."""
    from nodeagent_derper.certs import ensure_self_signed_for_ip

    tmp = tempfile.mkdtemp(prefix="na-derpprobe-")
    certdir = os.path.join(tmp, "certs")
    ensure_self_signed_for_ip(certdir, "127.0.0.1")
    env = {**ENV, "SSL_CERT_FILE": os.path.join(certdir, "127.0.0.1.crt")}
    psk = os.path.join(tmp, "mesh.psk")
    Path(psk).write_text(MESH_KEY + "\n")
    meshed = derper_has_mesh()
    derpers: dict[str, Derper] = {}
    try:
        if meshed:
            ports = [free_port(), free_port()]
            mesh_with = ",".join(f"https://127.0.0.1:{p}/derp" for p in ports)
            for name, p in zip(("901a", "901b"), ports, strict=True):
                derpers[name] = start_derper(name, 901, tmp, certdir, [
                    "--mesh-psk-file", psk, "--mesh-with", mesh_with], env, port=p)
        else:
            derpers["901a"] = start_derper("901a", 901, tmp, certdir, [], env)
            derpers["901b"] = start_derper("901b", 904, tmp, certdir, [], env)
        derpers["902a"] = start_derper("902a", 902, tmp, certdir, [], env)
        derpers["903a"] = start_derper("903a", 903, tmp, certdir, [], env)
        for d in derpers.values():
            wait_serving(d)
        f = Fleet(tmp, derpers, meshed)
        regions = {901: ["901a", "901b"], 902: ["902a"], 903: ["903a"]} if meshed else \
            {901: ["901a"], 902: ["902a"], 903: ["903a"], 904: ["901b"]}
        f.map_path = f.write_map("map.json", regions)
        f.wire = json.loads(Path(f.map_path).read_text())
        if meshed:
            mesh_map = f.write_map("mesh-only.json", {901: ["901a", "901b"]})
            deadline = time.monotonic() + 30
            while not mesh_ok(mesh_map):
                assert time.monotonic() < deadline, "the 901 mesh did not come up in 30 s"
                time.sleep(0.2)
        yield f
    finally:
        for d in derpers.values():
            stop(d.proc)
            d.log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def run_probe(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROBE, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def table_rows(out: str) -> dict[tuple[str, str], str]:
    """(node, probe) → status from the ``--once`` table."""
    rows = {}
    for line in out.splitlines()[1:]:
        m = re.match(r"(\d+)\s+(\S+)\s+(mesh to \S+|\S+)\s+(ok|FAIL|skip)\b", line)
        if m:
            rows[(m.group(2), m.group(3))] = m.group(4)
    return rows


# --- --once -------------------------------------------------------------------------------------


def test_once_all_green(fleet: Fleet) -> None:
    r = run_probe("--once", "--derp-map", fleet.map_url, "--timeout", "5s")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    for name in fleet.derpers:
        for probe in ("login", "tls", "stun", "packet"):
            assert rows.get((name, probe)) == "ok", (name, probe, r.stdout)
    if fleet.meshed:
        assert rows[("901a", "mesh to 901b")] == "ok" and rows[("901b", "mesh to 901a")] == "ok"
    assert "certificate valid for 36" in r.stdout  # the self-signed certificate: ten years
    assert re.search(r"\d+ probes of 4 nodes: \d+ ok, 0 failed", r.stdout), r.stdout


def test_mesh_probe_through_a_meshed_region(fleet: Fleet) -> None:
    if not fleet.meshed:
        pytest.skip("the derper has no --mesh-with yet: the mesh probe's positive case awaits "
                    "the mesh")
    path = fleet.write_map("mesh.json", {901: ["901a", "901b"]})
    r = run_probe("--once", "--derp-map", f"file://{path}")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if " mesh to " in ln]
    assert len(lines) == 2 and all(re.search(r"\bok\s+\d+\.\d ms", ln) for ln in lines), lines


def test_mesh_probe_fails_between_nodes_that_are_not_meshed(fleet: Fleet) -> None:
    path = fleet.write_map("unmeshed.json", {950: ["901a", "902a"]})
    r = run_probe("--once", "--derp-map", f"file://{path}", "--timeout", "1s")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    assert rows[("901a", "mesh to 902a")] == "FAIL" and rows[("902a", "mesh to 901a")] == "FAIL"
    assert rows[("901a", "login")] == "ok" and rows[("902a", "packet")] == "ok"
    assert "packet to 902a did not arrive within 1s" in r.stdout
    assert "2 failed" in r.stdout.splitlines()[-1]


def test_once_against_tailscales_derper(tmp_path: Path) -> None:
    from tests.derptls import TAILSCALE_DERPER, tailscale_derper

    if not TAILSCALE_DERPER.exists():
        pytest.skip(f"Tailscale's derper is not at {TAILSCALE_DERPER}")
    with tailscale_derper() as (port, stun):
        node = {"Name": "ts", "RegionID": 910, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                "DERPPort": port, "STUNPort": stun, "InsecureForTests": True}
        path = tmp_path / "map.json"
        path.write_text(json.dumps({"Regions": {"910": {"RegionID": 910, "Nodes": [node]}}}))
        r = run_probe("--once", "--derp-map", f"file://{path}")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    assert rows == {("ts", p): "ok" for p in ("login", "stun", "packet", "tls")}
    assert r.stdout.splitlines()[-1] == "4 probes of 1 node: 4 ok, 0 failed, 0 skipped"


@pytest.mark.asyncio
async def test_nodeagent_derpprobe_with_the_local_agents_map(agent: Any, fleet: Fleet) -> None:
    from nodeagent.tailcfg import netmap_from_wire
    from tests.agentutil import nodeagent_cmd

    sock = agent.opts.socket

    async def run(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            *nodeagent_cmd(), "derpprobe", *argv, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=ENV)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        return proc.returncode or 0, out.decode(), err.decode()

    rc, out, err = await run("--once", "--derp-map", "local", "--socket", sock)
    assert rc == 1 and out == "" and err.count("\n") == 1, (rc, out, err)
    assert err.startswith("derpprobe: ") and "has no DERP map yet" in err

    # Every node but 903a (the one the service tests kill), in the fleet map's regions.
    wire = json.loads(json.dumps(fleet.wire))
    del wire["Regions"]["903"]
    agent.backend.set_netmap(netmap_from_wire({"DERPMap": wire}))
    rc, out, err = await run("--once", "--derp-map", "local", "--socket", sock)
    assert rc == 0, out + err
    assert {n for n, _ in table_rows(out)} == set(fleet.derpers) - {"903a"}


# --- the service --------------------------------------------------------------------------------


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    log: IO[bytes]
    killed_after: float = -1.0  # seconds from the kill to the failure on /metrics

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def page(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as r:
            return str(r.read().decode())

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def node_ok(m: dict[str, float], region: int, name: str) -> float | None:
    return m.get(f'derpprobe_node_ok{{node="{name}",region="{region}"}}')


def poll(cond: Any, timeout: float, what: str, svc: Service) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except OSError:
            pass  # not listening yet
        if svc.proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not seen within {timeout}s: {svc.log_text()[-2000:]}")
        time.sleep(0.1)  # polling the service with a deadline


@pytest.fixture(scope="module")
def service(fleet: Fleet) -> Iterator[Service]:
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*PROBE, "--derp-map", fleet.map_url, "--listen",
                             f"127.0.0.1:{port}", "--interval", f"{INTERVAL:g}s", "--timeout",
                             f"{TIMEOUT:g}s"], stdout=subprocess.DEVNULL, stderr=log, env=ENV)
    svc = Service(proc, f"http://127.0.0.1:{port}/", log)
    try:
        poll(lambda: svc.metrics().get("derpprobe_rounds_total", 0) >= 1, 60, "a first round",
             svc)
        yield svc
        assert stop(proc) == 0, svc.log_text()  # SIGTERM ends it cleanly
    finally:
        stop(proc, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def victim_killed(fleet: Fleet, service: Service) -> Service:
    """903a killed once the service saw every node green; returns when /metrics shows it."""
    nodes = [(d.region, n) for n, d in fleet.derpers.items()]
    poll(lambda: all(node_ok(service.metrics(), r, n) == 1.0 for r, n in nodes), 60,
         "every node green", service)
    stop(fleet.derpers["903a"].proc, signal.SIGKILL)
    service.killed_after = poll(lambda: node_ok(service.metrics(), 903, "903a") == 0.0,
                                3 * (INTERVAL + TIMEOUT) + 10, "903a failing", service)
    return service


def test_service_reports_a_killed_node_within_one_interval(fleet: Fleet,
                                                           victim_killed: Service) -> None:
    svc = victim_killed
    print(f"903a reported failing {svc.killed_after:.2f} s after the kill")
    # A round that started just before the kill may still pass; the next one (≤ INTERVAL later,
    # a refused connection fails at once) reports it; + one metrics poll.
    assert svc.killed_after <= INTERVAL + TIMEOUT, svc.killed_after
    m = svc.metrics()
    for name, d in fleet.derpers.items():
        if name != "903a":
            assert node_ok(m, d.region, name) == 1.0, (name, m)
    assert m['derpprobe_probe_ok{node="903a",peer="",probe="login",region="903"}'] == 0.0
    assert m['derpprobe_probe_ok{node="903a",peer="",probe="tls",region="903"}'] == 0.0
    assert m['derpprobe_probe_ok{node="902a",peer="",probe="packet",region="902"}'] == 1.0
    assert m['derpprobe_tls_cert_days_left{node="902a",region="902"}'] > 3000
    assert m['derpprobe_probe_results_total{node="903a",peer="",probe="login",region="903",'
             'result="fail"}'] >= 1
    if fleet.meshed:
        assert m['derpprobe_probe_ok{node="901a",peer="901b",probe="mesh",region="901"}'] == 1.0
    page = svc.page()
    assert re.search(r'<tr id="node-903-903a" class="fail"', page), page
    assert len(re.findall(r'<tr id="node-\d+-\w+" class="ok"', page)) == len(fleet.derpers) - 1


def test_status_page_in_headless_chromium(fleet: Fleet, victim_killed: Service,
                                          tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium): no browser check")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,640"]
    r = subprocess.run([*base, "--dump-dom", victim_killed.url], capture_output=True, text=True,
                       timeout=120)
    dom = r.stdout
    assert r.returncode == 0 and "<table>" in dom, r.stderr[-2000:]
    row = re.search(r'<tr id="node-903-903a"[^>]*>.*?</tr>', dom, re.S)
    assert row is not None, dom
    assert 'class="fail"' in row.group(0) and 'data-failing="login' in row.group(0)
    assert "FAIL" in row.group(0)
    assert "login: TCP connect failed" in row.group(0)  # the last error: the first failing probe
    assert "more failing" in row.group(0)
    for name, d in fleet.derpers.items():
        if name != "903a":
            assert f'<tr id="node-{d.region}-{name}" class="ok"' in dom, (name, dom)
    png = tmp_path / "derpprobe-status.png"
    r = subprocess.run([*base, f"--screenshot={png}", victim_killed.url], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and png.exists() and png.stat().st_size > 5000, r.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"status page screenshot: {png}")


def test_mesh_pairs_with_a_dead_node_are_skipped_not_failed(fleet: Fleet,
                                                            victim_killed: Service) -> None:
    path = fleet.write_map("half-dead.json", {960: ["902a", "903a"]})
    r = run_probe("--once", "--derp-map", f"file://{path}", "--timeout", "2s")
    assert r.returncode == 1, r.stdout + r.stderr
    rows = table_rows(r.stdout)
    assert rows[("903a", "login")] == "FAIL" and rows[("902a", "login")] == "ok"
    assert rows[("902a", "mesh to 903a")] == "skip" and rows[("903a", "mesh to 902a")] == "skip"
    assert "not tried: login to 903a failed" in r.stdout
    assert not [k for k, v in rows.items() if k[0] == "902a" and v == "FAIL"], r.stdout
