"""Coordination server + ControlClients in one process on 127.0.0.1, and the control CLI.

Covers registration with one reusable key, netmap contents and deltas, policy propagation,
deletion, restart with stable addresses, offline marking, ephemeral nodes and c2n.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from nodeagent.control.admin import AdminClient, AdminClientError
from nodeagent.control.client import ControlClient, ControlFatalError
from nodeagent.control.server import AdminError, ControlServer, ServerConfig
from nodeagent.keys import KeyPair
from nodeagent.tailcfg import NetworkMap
from tests.agentutil import nodeagent_cmd
from tests.procutil import stop

NAMES = ("alpha", "beta", "gamma")


class Node:
    """A ControlClient plus the netmaps it received, with a way to wait for a condition."""

    def __init__(self, url: str, name: str, **kw: object) -> None:
        self.name = name
        self.mk, self.nk = KeyPair.generate(), KeyPair.generate()
        self.state: dict[str, object] = {}
        self.client = self._new_client(url, **kw)
        self.nm: NetworkMap | None = None
        self.count = 0
        self.cond = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None
        self.c2n_calls: list[tuple[str, str, bytes]] = []

    def _new_client(self, url: str, **kw: object) -> ControlClient:
        return ControlClient(url, self.mk, self.nk, hostname=self.name, state=self.state,
                             backoff_min=0.05, backoff_max=0.5, **kw)  # type: ignore[arg-type]

    async def _on_netmap(self, nm: NetworkMap) -> None:
        async with self.cond:
            self.nm, self.count = nm, self.count + 1
            self.cond.notify_all()

    async def _c2n(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str],
                                                                         bytes]:
        self.c2n_calls.append((method, path, body))
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"node": self.name, "path": path}).encode()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.client.run(self._on_netmap, self._c2n))

    async def stop(self) -> None:
        await self.client.close()
        if self.task is not None and not self.task.done():
            await asyncio.wait_for(self.task, 10)

    async def until(self, pred: Callable[[NetworkMap], bool], timeout: float = 5.0) -> NetworkMap:
        async with self.cond:
            await asyncio.wait_for(
                self.cond.wait_for(lambda: self.nm is not None and pred(self.nm)), timeout)
        assert self.nm is not None
        return self.nm


def peer_names(nm: NetworkMap) -> set[str]:
    return {p.HostName for p in nm.Peers}


@pytest_asyncio.fixture
async def tailnet(tmp_path: Path) -> AsyncIterator[tuple[ControlServer, list[Node], str]]:
    srv = ControlServer(ServerConfig(state_dir=tmp_path, keepalive=0.5, c2n_timeout=2.0,
                                     ephemeral_grace=0.2))
    url = await srv.start("127.0.0.1", 0)
    key, _ = srv.create_authkey(reusable=True)
    nodes = [Node(url, n) for n in NAMES]
    holder = {"srv": srv}
    try:
        for n in nodes:
            await n.client.register(key)
            n.start()
        for n in nodes:
            await n.until(lambda nm, n=n: peer_names(nm) == set(NAMES) - {n.name}
                          and all(p.Online for p in nm.Peers))
        yield srv, nodes, key
    finally:
        for n in nodes:
            await n.stop()
        await holder["srv"].stop()


@pytest.mark.asyncio
async def test_three_nodes_see_each_other(tailnet: tuple[ControlServer, list[Node], str]) -> None:
    _, nodes, _ = tailnet
    addrs = {n.name: n.nm.SelfNode.Addresses for n in nodes if n.nm}
    assert len({a[0] for a in addrs.values()}) == 3
    for n in nodes:
        nm = n.nm
        assert nm is not None
        assert nm.SelfNode.Key == "nodekey:" + n.nk.public.hex()
        assert nm.SelfNode.Addresses[0].startswith("100.64.") and nm.SelfNode.KeyExpiry > 0
        assert nm.PacketFilter == [{"SrcIPs": ["*"], "DstPorts": [
            {"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
        for p in nm.Peers:
            assert p.AllowedIPs == addrs[p.HostName] == p.Addresses
            assert p.Key.startswith("nodekey:") and p.LastSeen > 0
    # Endpoint changes arrive at the others as a delta.
    nodes[0].client.update_endpoints(["192.0.2.7:41641"])
    nodes[0].client.set_home_derp(900)
    for n in nodes[1:]:
        await n.until(lambda nm: any(p.Endpoints == ["192.0.2.7:41641"] and p.HomeDERP == 900
                                     for p in nm.Peers))


@pytest.mark.asyncio
async def test_policy_change_propagates(tailnet: tuple[ControlServer, list[Node], str]) -> None:
    srv, (a, b, c), _ = tailnet
    admin = AdminClient(srv.url, srv.admin_token)
    policy = """{
      // only beta may reach alpha on ssh; gamma gets the conn-reject diagnostics
      "acls": [{"action": "accept", "src": ["beta"], "dst": ["alpha:22"], "proto": "tcp"}],
      "nodeAttrs": [{"target": ["gamma"], "attr": ["debug-conn-reject"]}],
    }"""
    t0 = time.monotonic()
    await asyncio.to_thread(admin.set_policy, policy)
    b_ips = [x.split("/")[0] for x in b.nm.SelfNode.Addresses]  # type: ignore[union-attr]
    nm_a = await a.until(lambda nm: nm.PacketFilter and nm.PacketFilter[0]["SrcIPs"] == b_ips,
                         timeout=2.0)
    nm_c = await c.until(lambda nm: "debug-conn-reject" in nm.SelfNode.CapMap, timeout=2.0)
    await b.until(lambda nm: nm.PacketFilter == [], timeout=2.0)
    assert time.monotonic() - t0 < 2.0
    assert nm_a.PacketFilter[0]["IPProto"] == [6]
    assert nm_c.SelfNode.CapMap == {"debug-conn-reject": []} and nm_c.PacketFilter == []
    # A bad policy is refused with line:column and the running one stays.
    with pytest.raises(AdminClientError, match=r"^2:\d+: "):
        await asyncio.to_thread(admin.set_policy, '{"acls": [\n {"action": "drop"}]}')
    assert "beta" in (await asyncio.to_thread(admin.get_policy))


@pytest.mark.asyncio
async def test_delete_node(tailnet: tuple[ControlServer, list[Node], str]) -> None:
    srv, (a, b, c), _ = tailnet
    admin = AdminClient(srv.url, srv.admin_token)
    out = await asyncio.to_thread(admin.delete, "gamma")
    assert out["Name"] == "gamma"
    for n in (a, b):
        await n.until(lambda nm, n=n: peer_names(nm) == set(NAMES) - {n.name, "gamma"})
    assert c.task is not None
    with pytest.raises(ControlFatalError, match="deleted"):
        await asyncio.wait_for(c.task, 5)
    assert [x["Name"] for x in await asyncio.to_thread(admin.nodes)] == ["alpha", "beta"]


@pytest.mark.asyncio
async def test_restart_keeps_addresses(tailnet: tuple[ControlServer, list[Node], str],
                                       tmp_path: Path) -> None:
    srv, nodes, _ = tailnet
    before = {n.name: n.nm.SelfNode.Addresses for n in nodes if n.nm}
    port = int(srv.url.rsplit(":", 1)[1])
    await srv.stop()
    for n in nodes:
        await n.until(lambda nm: True)  # still holds the old map
    srv2 = ControlServer(ServerConfig(state_dir=tmp_path, keepalive=0.5))
    await srv2.start("127.0.0.1", port)
    try:
        counts = {n.name: n.count for n in nodes}
        for n in nodes:
            nm = await n.until(lambda nm, n=n: n.count > counts[n.name]
                               and all(p.Online for p in nm.Peers) and len(nm.Peers) == 2,
                               timeout=10)
            assert nm.SelfNode.Addresses == before[n.name]
    finally:
        for n in nodes:
            await n.stop()
        await srv2.stop()


@pytest.mark.asyncio
async def test_disconnect_marks_offline_and_c2n(
        tailnet: tuple[ControlServer, list[Node], str]) -> None:
    srv, (a, b, c), _ = tailnet
    admin = AdminClient(srv.url, srv.admin_token)
    status, headers, body = await asyncio.to_thread(admin.c2n, "beta", "GET", "/debug/rejects")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"node": "beta", "path": "/debug/rejects"}
    assert b.c2n_calls == [("GET", "/debug/rejects", b"")]
    await c.stop()
    for n in (a, b):
        await n.until(lambda nm: any(p.HostName == "gamma" and p.Online is False
                                     for p in nm.Peers))
    rows = {x["Name"]: x for x in await asyncio.to_thread(admin.nodes)}
    assert rows["gamma"]["Online"] is False and rows["alpha"]["Online"] is True
    t0 = time.monotonic()
    with pytest.raises(AdminClientError, match="node gamma is offline"):
        await asyncio.to_thread(admin.c2n, "gamma", "GET", "/debug/rejects")
    assert time.monotonic() - t0 < 1.0


@pytest.mark.asyncio
async def test_c2n_timeout_is_clear(tailnet: tuple[ControlServer, list[Node], str]) -> None:
    srv, (a, _, _), _ = tailnet
    gate = asyncio.Event()

    async def slow(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        await gate.wait()
        return 200, {}, b""

    await a.stop()  # reconnect alpha with a handler that never answers in time
    a.client = a._new_client(srv.url)
    a.task = asyncio.get_running_loop().create_task(a.client.run(a._on_netmap, slow))
    await a.until(lambda nm: True)
    await _until_online(srv, "alpha")
    with pytest.raises(AdminError, match=r"did not answer within 0\.3s"):
        await srv.c2n("alpha", "GET", "/x", timeout=0.3)
    gate.set()


async def _until_online(srv: ControlServer, name: str) -> None:
    rec = srv.find_node(name)
    for _ in range(200):
        if rec.id in srv.sessions:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name} never came online")


@pytest.mark.asyncio
async def test_bad_auth_key_and_single_use(tailnet: tuple[ControlServer, list[Node], str]) -> None:
    srv, _, _ = tailnet
    n = Node(srv.url, "delta")
    try:
        with pytest.raises(ControlFatalError) as ei:
            await n.client.register("nakey-not-a-real-key")
        assert str(ei.value) == "control server refused registration: invalid auth key"
        once, _ = srv.create_authkey()
        await n.client.register(once)
        await n.client.register(once)  # the same node again: no new key use needed
        m = Node(srv.url, "epsilon")
        with pytest.raises(ControlFatalError, match="already used"):
            await m.client.register(once)
        await m.client.close()
    finally:
        await n.client.close()
    assert len(srv.store.list_nodes()) == 4


@pytest.mark.asyncio
async def test_ephemeral_node_removed_after_going_offline(
        tailnet: tuple[ControlServer, list[Node], str]) -> None:
    srv, (a, _, _), _ = tailnet
    key, _ = srv.create_authkey(ephemeral=True)
    e = Node(srv.url, "eph")
    await e.client.register(key)
    e.start()
    await a.until(lambda nm: any(p.HostName == "eph" and p.Online for p in nm.Peers))
    await e.stop()
    await a.until(lambda nm: "eph" not in peer_names(nm), timeout=5)


# --- the CLI against a real server process -------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*nodeagent_cmd(), "control", *args], capture_output=True, text=True,
                          timeout=30)


def test_cli_serve_and_admin(tmp_path: Path) -> None:
    state = tmp_path / "ctl"
    pol = tmp_path / "policy.hujson"
    pol.write_text('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],}\n')
    proc = subprocess.Popen([*nodeagent_cmd(), "control", "serve", "--listen", "127.0.0.1:0",
                             "--state-dir", str(state), "--policy", str(pol)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 15
        while not (state / "control-url").exists():
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        assert oct((state / "admin-token").stat().st_mode & 0o777) == "0o600"
        r = _cli("authkey", "create", "--reusable", "--state-dir", str(state))
        assert r.returncode == 0 and r.stdout.startswith("nakey-"), r.stderr
        r = _cli("authkey", "create", "--tag", "tag:nope", "--state-dir", str(state))
        assert r.returncode == 1
        assert r.stderr.strip() == ("nodeagent: 'tag:nope' is not declared in the policy's "
                                    "tagOwners")
        r = _cli("nodes", "--json", "--state-dir", str(state))
        assert r.returncode == 0 and json.loads(r.stdout) == []
        bad = tmp_path / "bad.hujson"
        bad.write_text('{\n  "acls": [\n    {"action": "accept", "src": ["*"], '
                       '"dst": ["*:99999"]}]}\n')
        r = _cli("policy", "set", str(bad), "--state-dir", str(state))
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        assert r.stderr.startswith(f"nodeagent: {bad}:3:48: bad port '99999'"), r.stderr
        token = (state / "admin-token").read_text().strip()
        url = (state / "control-url").read_text().strip()
        r = _cli("c2n", "nobody", "GET", "/debug/rejects", "--control", url,
                 "--admin-token", token)
        assert (r.returncode, r.stderr.strip()) == (1, "nodeagent: no node 'nobody'")
        r = _cli("nodes", "--control", url, "--admin-token", "wrong")
        assert r.stderr.strip() == "nodeagent: admin token missing or wrong"
        # SIGHUP with a broken policy file keeps the server and its policy.
        pol.write_text("{ broken")
        proc.send_signal(signal.SIGHUP)
        _wait_line(lines, "policy not reloaded, keeping the running one")
        r = _cli("policy", "get", "--state-dir", str(state))
        assert r.returncode == 0 and '"acls"' in r.stdout
        assert proc.poll() is None
        pol.write_text('{"acls": [], "nodeAttrs": [{"target": ["*"], "attr": ["x"]}]}')
        proc.send_signal(signal.SIGHUP)
        _wait_line(lines, "policy reloaded")
        assert "nodeAttrs" in _cli("policy", "get", "--state-dir", str(state)).stdout
    finally:
        stop(proc)
        reader.join(5)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    assert proc.returncode == 0


def _wait_line(lines: list[str], needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(needle in ln for ln in lines):
        assert time.monotonic() < deadline, f"no log line with {needle!r}: {lines}"
        time.sleep(0.02)


def test_cli_errors_without_server(tmp_path: Path) -> None:
    r = _cli("nodes", "--state-dir", str(tmp_path))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot find a control server" in r.stderr
    pol = tmp_path / "p.hujson"
    pol.write_text('{"acls": [{"action": "accept", "src": ["tag:x"], "dst": ["*:*"]}]}')
    r = _cli("serve", "--state-dir", str(tmp_path / "s"), "--policy", str(pol),
             "--listen", "127.0.0.1:0")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"nodeagent: bad policy: {pol}:1:40: 'tag:x' is not declared "
                                "in tagOwners")
    assert not os.path.exists(tmp_path / "s" / "control-url")
