"""The files in ``examples/`` do what the README says they do.

- ``examples/policy.hujson`` parses, compiles per node (tags, autogroups, ports, ICMP, the
  ``debug-conn-reject`` attribute, the DERP map) and is accepted by ``nodeagent control serve
  --policy``;
- ``examples/static-netmap-a.json`` / ``-b.json``, with the two nodes' keys filled in for the
  ``@KEY_A@`` / ``@KEY_B@`` placeholders (as the README's ``sed`` does), load and bring up two
  agents in two namespaces on the README's addresses that ping each other over WireGuard.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from nodeagent.agent import load_netmap_file
from nodeagent.control.policy import PolicyNode, parse_policy
from nodeagent.ipn.state import StateStore
from nodeagent.keys import NODE_PREFIX
from tests.agentutil import nodeagent_cmd, public_tempdir
from tests.netns import make_netns, netns_available, popen_in_netns, tun_available, veth_pair
from tests.procutil import stop
from tests.wgnet import wait_ping

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
POLICY = EXAMPLES / "policy.hujson"


def test_example_policy_compiles() -> None:
    pol = parse_policy(POLICY.read_text())
    laptop = PolicyNode(1, "laptop", "laptop", "admin", (), ("100.64.0.1",))
    server = PolicyNode(2, "web", "web", "admin", ("tag:server",), ("100.64.0.2",))
    out = pol.compile([laptop, server])
    rules, caps = out[server.id]
    ports = sorted((d["Ports"]["First"], d["Ports"]["Last"]) for r in rules
                   if r["SrcIPs"] == ["100.64.0.1"] for d in r["DstPorts"])
    assert ports == [(22, 22), (80, 80), (443, 443)]
    assert "debug-conn-reject" in caps
    rules, caps = out[laptop.id]
    assert {"SrcIPs": ["100.64.0.2"], "DstPorts": [{"IP": "100.64.0.1", "Ports": {
        "First": 0, "Last": 65535}}], "IPProto": [1]} in rules  # servers: ICMP only
    assert "debug-conn-reject" in caps
    assert pol.derp_map is not None and 900 in pol.derp_map.Regions


@pytest.mark.integration
def test_example_policy_accepted_by_control_server() -> None:
    d = public_tempdir("na-expolicy-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*nodeagent_cmd(), "control", "serve", "--listen",
                             f"127.0.0.1:{port}", "--state-dir", d, "--policy", str(POLICY)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(d, "admin-token")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "control serve did not start"
            time.sleep(0.1)
        r = subprocess.run([*nodeagent_cmd(), "control", "policy", "get", "--state-dir", d],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout == POLICY.read_text()
    finally:
        stop(proc)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(d, ignore_errors=True)


def _netmap_for(template: Path, keys: dict[str, str], out: Path) -> str:
    text = template.read_text()
    for name, key in keys.items():
        text = text.replace(f"@KEY_{name.upper()}@", key)
    out.write_text(text)
    load_netmap_file(str(out))  # loads, filter included
    return str(out)


@pytest.mark.integration
def test_static_netmap_example_brings_up_two_agents_that_ping() -> None:
    missing = netns_available() or tun_available()
    if missing:
        pytest.skip(missing)
    d = Path(public_tempdir("na-exnetmap-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        keys = {}
        for n in ("a", "b"):
            st = StateStore(str(d / n)).load_or_create()
            keys[n] = st.node_key.public_text(NODE_PREFIX)
        with make_netns("naexa") as ns_a, make_netns("naexb") as ns_b:
            # The README's plumbing: one veth, a = 10.99.0.1, b = 10.99.0.2.
            veth_pair(ns_a, ns_b, "10.99.0.1/24", "10.99.0.2/24", name_a="eth0",
                      name_b="eth0")
            for n, ns, port in (("a", ns_a, 41641), ("b", ns_b, 41642)):
                nm = _netmap_for(EXAMPLES / f"static-netmap-{n}.json", keys, d / f"{n}.json")
                log = open(d / f"{n}.log", "wb")
                with log:
                    procs.append(popen_in_netns(ns, [
                        *nodeagent_cmd(), "up", "--socket", str(d / f"{n}.sock"),
                        "--state-dir", str(d / n), "--tun", "na0", "--port", str(port),
                        "--netmap-file", nm], stdout=log, stderr=subprocess.STDOUT))
            for n in ("a", "b"):
                deadline = time.monotonic() + 30
                while not (d / f"{n}.sock").exists():
                    assert all(p.poll() is None for p in procs), (d / f"{n}.log").read_text()
                    assert time.monotonic() < deadline, f"agent {n} did not start"
                    time.sleep(0.1)
            try:
                wait_ping(ns_a, "100.64.0.2", 30)
                wait_ping(ns_b, "100.64.0.1", 30)
            except AssertionError as e:
                logs = "\n".join((d / f"{n}.log").read_text()[-2000:] for n in ("a", "b"))
                raise AssertionError(f"{e}\n{logs}") from None
    finally:
        for p in procs:
            stop(p)
        shutil.rmtree(d, ignore_errors=True)
