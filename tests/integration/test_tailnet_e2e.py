"""A whole tailnet on our software: ``nodeagent control serve`` in the root namespace, three
``nodeagent up --login-server`` agents in three namespaces (a bridge in a hub namespace joins
them; a veth brings the root namespace onto it), real WireGuard between them.

Underlay 198.18.2.0/24 (benchmark range, only on these links); tailnet addresses from control.
The tests share one tailnet (module fixture) and cover issues 5 and 6's acceptance: registration
with one reusable key, pings, policy pushes enforced within 2 s, connection-rejection diagnostics
on both sides and over c2n, node deletion, control restart, agents going offline.

They run in any order, or alone: a test that changes the tailnet (the policy, an agent or the
control server stopped, a node deleted) puts it back in ``finally``, or works on a node of its own.
An autouse fixture checks the baseline (control up, the open policy, three running agents that
see each other online and ping each other, the conn-reject attribute in effect) after every test
— a test that does not restore it fails in teardown — and repairs it before the next one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests import minitailnet
from tests.agentutil import localapi, nodeagent_cmd, public_tempdir
from tests.dataplane import connect, listening
from tests.minitailnet import MiniAgent, wait
from tests.netns import create_netns, netns_available, remove_netns, tun_available
from tests.procutil import stop
from tests.wgnet import ping, run_in

_missing = netns_available() or tun_available()
pytestmark = [pytest.mark.integration]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

HAS_CONNREJECT = importlib.util.find_spec("nodeagent_connreject") is not None
HUB_IP = "198.18.2.254"

POLICY_OPEN = """{
  // everyone may reach everyone, except n2's port 22
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["n1:*", "n3:*"]},
    {"action": "accept", "src": ["*"], "dst": ["n2:0-21", "n2:23-65535"]},
  ],
  "nodeAttrs": [{"target": ["*"], "attr": ["debug-conn-reject"]}],
}
"""
POLICY_CLOSED_N1 = POLICY_OPEN.replace('"dst": ["n1:*", "n3:*"]', '"dst": ["n3:*"]')
POLICY_NO_ATTR = POLICY_OPEN.replace('"nodeAttrs": [{"target": ["*"], "attr": '
                                     '["debug-conn-reject"]}],', "")


@dataclass
class Agent(MiniAgent):
    ip4: str = ""

    def api(self, path: str, method: str = "GET") -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent {self.name} exited with {self.proc.returncode}; the "
                                 f"end of its log:\n{self.log_tail()}")
        st, body = asyncio.run(localapi(self.sock, method, f"/localapi/v0/{path}"))
        assert st == 200, (path, st, body)
        return body


@dataclass
class Tailnet:
    dir: str
    url: str
    control: subprocess.Popen[Any]
    agents: dict[str, Agent]
    key: str
    policy: str
    hub: str  # the namespace holding the bridge
    policy_text: str = POLICY_OPEN  # what was last set

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*nodeagent_cmd(), "control", *args, "--state-dir",
                               os.path.join(self.dir, "control")],
                              capture_output=True, text=True, timeout=30)

    def set_policy(self, text: str) -> None:
        with open(self.policy, "w") as f:
            f.write(text)
        r = self.ctl("policy", "set", self.policy)
        assert r.returncode == 0, r.stderr
        self.policy_text = text


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, f"{argv}: {r.stderr}"


def attach_netns(hub: str, i: int) -> str:
    """A new namespace on the hub's bridge with underlay address 198.18.2.``i``."""
    ns = create_netns(f"nan{i}")
    try:
        _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"b{i}", "netns", hub, ns=ns)
        _ip("addr", "add", f"198.18.2.{i}/24", "dev", "eth0", ns=ns)
        _ip("link", "set", "eth0", "up", ns=ns)
        _ip("link", "set", f"b{i}", "master", "br0", "up", ns=hub)
    except BaseException:
        remove_netns(ns)
        raise
    return ns


def start_control(d: str, port: int) -> subprocess.Popen[Any]:
    with open(os.path.join(d, "control.log"), "a") as logf:
        proc = subprocess.Popen([*nodeagent_cmd(), "control", "serve", "--listen",
                                 f"{HUB_IP}:{port}", "--state-dir", os.path.join(d, "control"),
                                 "--keepalive", "1"],
                                stdout=logf, stderr=subprocess.STDOUT)
    url_file = os.path.join(d, "control", "control-url")
    deadline = time.monotonic() + 20
    while True:
        r = subprocess.run([*nodeagent_cmd(), "control", "nodes", "--state-dir",
                            os.path.join(d, "control")], capture_output=True, text=True)
        if r.returncode == 0 and os.path.exists(url_file):
            return proc
        assert proc.poll() is None, open(os.path.join(d, "control.log")).read()
        assert time.monotonic() < deadline, "control did not come up"
        time.sleep(0.1)


def start_agent(t: Tailnet, a: Agent) -> None:
    minitailnet.start_agent(a, t.url, t.key, timeout=20)


def peer_names(a: Agent) -> set[str]:
    """The host names of the peers in the agent's netmap."""
    st = a.api("status")
    return {p["HostName"] for p in (st.get("Peer") or {}).values()}


def running(proc: subprocess.Popen[Any] | None) -> bool:
    return proc is not None and proc.poll() is None


def control_health(a: Agent) -> str:
    return " ".join(h for h in a.api("status").get("Health") or [] if "control" in h)


def off_baseline(t: Tailnet) -> str | None:
    """What differs from the state every test starts from and leaves behind, or ``None``."""
    if not running(t.control):
        return "the control server is not running"
    if t.policy_text != POLICY_OPEN:
        return "the policy is not POLICY_OPEN"
    for a in t.agents.values():
        if not running(a.proc):
            return f"agent {a.name} is not running"
        try:
            st = a.api("status")
            peers = {p["HostName"]: p["Online"] for p in (st.get("Peer") or {}).values()}
            rejects_on = a.api("debug-rejects")["Enabled"] if HAS_CONNREJECT else True
        except Exception as e:  # a restarting agent may not answer yet
            return f"agent {a.name}: {e!r}"
        want = {b.name: True for b in t.agents.values() if b is not a}
        if st["BackendState"] != "Running" or st["Self"]["TailscaleIPs"][:1] != [a.ip4]:
            return f"agent {a.name}: {st['BackendState']} as {st['Self']['TailscaleIPs']}"
        if any("control" in h for h in st.get("Health") or []):
            return f"agent {a.name} is not connected to control: {st['Health']}"
        if peers != want:
            return f"agent {a.name} sees peers (name: online) {peers}, not {want}"
        if not rejects_on:
            return f"agent {a.name}: conn-reject diagnostics are off"
    for a in t.agents.values():  # working paths: no test pays for (or relies on) a cold start
        for b in t.agents.values():
            if b is not a and ping(a.ns, b.ip4, 1).returncode != 0:
                return f"no ping reply from {b.name} to {a.name}"
    return None


def wait_baseline(t: Tailnet, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (off := off_baseline(t)) is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"the tailnet is not back to its baseline after {timeout}s: "
                                 f"{off}")
        time.sleep(0.1)


def ensure_control(t: Tailnet) -> None:
    if not running(t.control):
        t.control = start_control(t.dir, t.port)


def ensure_agent(t: Tailnet, a: Agent) -> None:
    if not running(a.proc):
        start_agent(t, a)


def offline_at_control(t: Tailnet, name: str) -> bool:
    r = t.ctl("nodes", "--json")
    return any(n["HostName"] == name and not n["Online"] for n in json.loads(r.stdout))


@contextlib.contextmanager
def extra_agent(t: Tailnet, name: str, i: int) -> Iterator[Agent]:
    """A fourth agent of the test's own, in a namespace of its own; gone afterwards."""
    ns = attach_netns(t.hub, i)
    a = Agent(name, ns, tempfile.mkdtemp(prefix=f"{name}-", dir=t.dir))
    try:
        start_agent(t, a)
        yield a
    finally:
        stop(a.proc)
        remove_netns(ns)


@pytest.fixture(scope="module")
def tailnet() -> Iterator[Tailnet]:
    d = public_tempdir("na-tailnet-")
    made: list[str] = []
    root_if = "nar" + secrets.token_hex(3)
    control = None
    agents: dict[str, Agent] = {}
    try:
        hub = create_netns("nahub")
        made.append(hub)
        _ip("link", "add", "br0", "type", "bridge", ns=hub)
        _ip("link", "set", "br0", "up", ns=hub)
        _ip("link", "add", root_if, "type", "veth", "peer", "name", "broot", "netns", hub)
        _ip("addr", "add", f"{HUB_IP}/24", "dev", root_if)
        _ip("link", "set", root_if, "up")
        _ip("link", "set", "broot", "master", "br0", "up", ns=hub)
        for i in (1, 2, 3):
            ns = attach_netns(hub, i)
            made.append(ns)
            ad = os.path.join(d, f"n{i}")
            os.makedirs(ad)
            agents[f"n{i}"] = Agent(f"n{i}", ns, ad)
        port = 18000 + secrets.randbelow(2000)
        policy = os.path.join(d, "policy.hujson")
        with open(policy, "w") as f:
            f.write(POLICY_OPEN)
        os.makedirs(os.path.join(d, "control"))
        control = start_control(d, port)
        t = Tailnet(d, f"http://{HUB_IP}:{port}", control, agents, "", policy, hub)
        t.set_policy(POLICY_OPEN)
        r = t.ctl("authkey", "create", "--reusable")
        assert r.returncode == 0, r.stderr
        t.key = r.stdout.strip().splitlines()[-1]
        for a in agents.values():
            start_agent(t, a)
        for a in agents.values():
            wait(lambda a=a: len(peer_names(a)) == 2, 20, f"{a.name} sees two peers")
            a.ip4 = a.api("status")["Self"]["TailscaleIPs"][0]
        wait_baseline(t, 60.0)
        yield t
    finally:
        for a in agents.values():
            stop(a.proc)
        stop(t.control if "t" in locals() else control)
        for ns in made:
            remove_netns(ns)
        subprocess.run(["ip", "link", "del", root_if], capture_output=True)
        subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture(autouse=True)
def baseline(tailnet: Tailnet) -> Iterator[None]:
    """Repair what an earlier failure may have left, then start from the baseline; afterwards
    the test must have restored it (an error in teardown names what it left changed)."""
    ensure_control(tailnet)
    if tailnet.policy_text != POLICY_OPEN:
        tailnet.set_policy(POLICY_OPEN)
    for a in tailnet.agents.values():
        ensure_agent(tailnet, a)
    wait_baseline(tailnet)
    yield
    try:
        wait_baseline(tailnet)  # time to converge; nothing here repairs
    except AssertionError as e:
        raise AssertionError(f"the test left the tailnet changed: {e}") from None


def test_all_register_and_ping(tailnet: Tailnet) -> None:
    ag = tailnet.agents
    assert len({a.ip4 for a in ag.values()}) == 3
    for a in ag.values():
        st = a.api("status")
        assert st["BackendState"] == "Running"
        for b in ag.values():
            if b is not a:
                deadline = time.monotonic() + 15
                while ping(a.ns, b.ip4, 1).returncode != 0:
                    assert time.monotonic() < deadline, f"{a.name} cannot ping {b.name}"


@pytest.mark.skipif(not HAS_CONNREJECT, reason="feature connreject is not installed")
def test_rejects_recorded_both_sides_and_over_c2n(tailnet: Tailnet) -> None:
    n1, n2 = tailnet.agents["n1"], tailnet.agents["n2"]

    def outgoing_to_n2_22() -> list[dict[str, Any]]:
        r = n1.nodeagent("debug", "rejects", "--json")
        assert r.returncode == 0, r.stderr
        return [e for e in json.loads(r.stdout)["Outgoing"] if e["Dst"] == f"{n2.ip4}:22"]

    before = sum(e["Count"] for e in outgoing_to_n2_22())  # whatever an earlier test left
    for _ in range(3):
        outcome, took = run_in(n1.ns, connect, n2.ip4, 22, 5.0)
        assert outcome == "refused" and took < 1.0
    (ev,) = outgoing_to_n2_22()
    assert (ev["Reason"], ev["Source"], ev["Count"]) == ("acl", "tsmp_recv", before + 3)
    body = n2.api("debug-rejects")
    (inc,) = [e for e in body["Incoming"] if e["Src"].startswith(n1.ip4 + ":")]
    assert (inc["Reason"], inc["Source"]) == ("acl", "tsmp_sent")
    r = tailnet.ctl("c2n", "n2", "GET", "/debug/rejects")
    assert r.returncode == 0 and "status 200" in r.stdout, r.stdout + r.stderr
    c2n_body = json.loads(r.stdout.split("\n", 1)[1])
    assert c2n_body == n2.api("debug-rejects")
    table = n1.nodeagent("debug", "rejects")
    assert "refused by the tailnet policy on n2" in table.stdout


def test_policy_change_enforced_within_two_seconds(tailnet: Tailnet) -> None:
    n1, n3 = tailnet.agents["n1"], tailnet.agents["n3"]

    def outcome(timeout: float = 1.0) -> str:
        return str(run_in(n3.ns, connect, n1.ip4, 7000, timeout)[0])

    # A port with a listener: "refused" can only come from the policy, not from n1's kernel.
    with listening(n1.ns, n1.ip4, 7000):
        assert outcome(5.0) == "connected"  # the first packet may wait for a path
        try:
            t0 = time.monotonic()
            tailnet.set_policy(POLICY_CLOSED_N1)
            while outcome() != "refused":
                assert time.monotonic() - t0 < 2.0, "policy not enforced within 2 s"
        finally:
            tailnet.set_policy(POLICY_OPEN)
            wait(lambda: outcome() == "connected", 10, "n1 open to n3 again")


@pytest.mark.skipif(not HAS_CONNREJECT, reason="feature connreject is not installed")
def test_removing_attribute_disables_within_two_seconds(tailnet: Tailnet) -> None:
    n1 = tailnet.agents["n1"]
    try:
        t0 = time.monotonic()
        tailnet.set_policy(POLICY_NO_ATTR)
        wait(lambda: n1.api("debug-rejects") == {"Enabled": False, "Outgoing": [],
                                                 "Incoming": []}, 2.0, "Enabled false")
        assert time.monotonic() - t0 < 2.0
    finally:
        tailnet.set_policy(POLICY_OPEN)
        for a in tailnet.agents.values():
            wait(lambda a=a: a.api("debug-rejects")["Enabled"] is True, 5.0,
                 f"{a.name}: Enabled again")


def test_stopped_agent_reported_and_marked_offline(tailnet: Tailnet) -> None:
    n1, n3 = tailnet.agents["n1"], tailnet.agents["n3"]

    def reports() -> int:  # pendopen reports of n1 about n3:7000 so far
        return sum(e["Count"] for e in n1.api("debug-rejects")["Outgoing"]
                   if e["Source"] == "pendopen_timeout" and e["Dst"] == f"{n3.ip4}:7000"
                   and e["Reason"] in ("peer-unreachable", "timeout"))

    before = reports() if HAS_CONNREJECT else 0
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        stop(n3.proc, signal.SIGKILL)
        wait(lambda: offline_at_control(tailnet, "n3"), 10, "n3 offline at control")
        t0 = time.monotonic()
        fut = pool.submit(run_in, n1.ns, connect, n3.ip4, 7000, 6.5)
        if HAS_CONNREJECT:
            wait(lambda: reports() > before, 6.0, "pendopen report within 6 s")
            assert time.monotonic() - t0 < 6.0
        assert fut.result(timeout=15)[0] == "timeout"
    finally:
        pool.shutdown()
        ensure_agent(tailnet, n3)
        wait_baseline(tailnet)


def test_c2n_debug_rejects_answers_or_names_the_feature(tailnet: Tailnet) -> None:
    r = tailnet.ctl("c2n", "n1", "GET", "/debug/rejects")
    status_line, body = r.stdout.split("\n", 1)
    if HAS_CONNREJECT:
        assert r.returncode == 0, r.stderr
        assert status_line == "status 200" and "Enabled" in json.loads(body)
    else:
        assert r.returncode == 1  # the admin sees the node's answer, and a failing exit status
        assert status_line == "status 404"
        assert "connreject" in body and "pip install" in body


def test_bad_auth_key_is_one_clear_line(tailnet: Tailnet) -> None:
    n3 = tailnet.agents["n3"]  # runs beside n3's agent: its own TUN name and a free UDP port
    registered = json.loads(tailnet.ctl("nodes", "--json").stdout)
    d = public_tempdir("na-badkey-")
    try:
        r = subprocess.run(["ip", "netns", "exec", n3.ns, *nodeagent_cmd(), "up", "--socket",
                            os.path.join(d, "s.sock"), "--state-dir", os.path.join(d, "st"),
                            "--tun", "na9", "--port", "0", "--login-server", tailnet.url,
                            "--auth-key", "nakey-not-a-real-key"],
                           capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["rm", "-rf", d], check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("nodeagent: ")]
    assert len(errors) == 1 and "auth key" in errors[0].lower(), r.stderr
    after = json.loads(tailnet.ctl("nodes", "--json").stdout)
    assert sorted(n["HostName"] for n in after) == sorted(n["HostName"] for n in registered)


def test_agent_restart_keeps_identity_and_address(tailnet: Tailnet) -> None:
    n1, n3 = tailnet.agents["n1"], tailnet.agents["n3"]
    old_ip = n3.ip4
    try:
        stop(n3.proc, signal.SIGKILL)  # a crash: nothing is saved on the way out
        wait(lambda: offline_at_control(tailnet, "n3"), 10, "n3 offline at control")
        start_agent(tailnet, n3)
        wait(lambda: n3.api("status")["BackendState"] == "Running", 20, "n3 running again")
        st = n3.api("status")
        assert st["Self"]["TailscaleIPs"][0] == old_ip
        r = tailnet.ctl("nodes", "--json")
        assert [n["HostName"] for n in json.loads(r.stdout)].count("n3") == 1
        # n1 still holds the session the crashed n3 forgot; WireGuard starts a new handshake
        # after KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s) without a reply. (Run after the
        # stopped-agent test, n1 was already retrying and this took less.)
        deadline = time.monotonic() + 25
        while ping(n1.ns, n3.ip4, 1).returncode != 0:
            assert time.monotonic() < deadline, "n1 cannot reach the restarted n3"
    finally:
        ensure_agent(tailnet, n3)
        wait_baseline(tailnet)


def test_control_restart_keeps_addresses(tailnet: Tailnet) -> None:
    n1, n2 = tailnet.agents["n1"], tailnet.agents["n2"]
    before = {a.name: a.api("status")["Self"]["TailscaleIPs"] for a in (n1, n2)}
    try:
        stop(tailnet.control)
        wait(lambda: control_health(n1) != "", 10, "n1 notices control is gone")
        tailnet.control = start_control(tailnet.dir, tailnet.port)
        wait(lambda: all(control_health(a) == "" for a in (n1, n2)), 20, "agents reconnect")
        for a in (n1, n2):
            assert a.api("status")["Self"]["TailscaleIPs"] == before[a.name]
        deadline = time.monotonic() + 10
        while ping(n1.ns, n2.ip4, 1).returncode != 0:
            assert time.monotonic() < deadline
    finally:
        ensure_control(tailnet)
        wait_baseline(tailnet)


def test_deleted_node_leaves_peers(tailnet: Tailnet) -> None:
    n1 = tailnet.agents["n1"]
    with extra_agent(tailnet, "n4", 4):  # a node of the test's own to delete
        wait(lambda: "n4" in peer_names(n1), 20, "n4 among n1's peers")
        r = tailnet.ctl("delete", "n4")
        assert r.returncode == 0, r.stderr
        wait(lambda: "n4" not in peer_names(n1), 5, "n4 gone from n1's peers")
