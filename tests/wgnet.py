"""Test harness: real ``nodeagent up`` processes (and wireguard-go) in network namespaces linked by
veth, configured from static netmap files — the engine before the control plane.

Underlay addresses come from the benchmark range 198.18.0.0/15 (never routed anywhere; traffic
stays on the namespaces' veth); tailnet addresses from 100.64.0.0/10 and fd7a:115c:a1e0::/48.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nodeagent.ipn.state import StateStore
from nodeagent.keys import NODE_PREFIX
from nodeagent.tailcfg import NODE_ATTR_CONN_REJECT
from tests.agentutil import nodeagent_cmd, public_tempdir
from tests.netns import make_netns, popen_in_netns, veth_pair

UNDERLAY = {"a": "198.18.1.1", "b": "198.18.1.2"}
TS4 = {"a": "100.64.0.1", "b": "100.64.0.2"}
TS6 = {"a": "fd7a:115c:a1e0::1", "b": "fd7a:115c:a1e0::2"}
WG_PORT = 41641


@dataclass
class Node:
    name: str
    ns: str
    dir: str
    public_key: str = ""  # "nodekey:hex"
    proc: subprocess.Popen[Any] | None = None
    rules: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sock(self) -> str:
        return os.path.join(self.dir, "na.sock")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.dir, "state")

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "agent.log")) as f:
                return f.read()[-4000:]
        except OSError:
            return ""


def node_entry(name: str, key: str, *, endpoint: bool = True) -> dict[str, Any]:
    return {"HostName": name, "Key": key,
            "Addresses": [f"{TS4[name]}/32", f"{TS6[name]}/128"],
            "AllowedIPs": [f"{TS4[name]}/32", f"{TS6[name]}/128"],
            "Endpoints": [f"{UNDERLAY[name]}:{WG_PORT}"] if endpoint else [], "Online": True}


def write_netmap(node: Node, peer: Node | dict[str, Any], *, conn_reject: bool = True) -> str:
    self_entry = node_entry(node.name, node.public_key)
    if conn_reject:
        self_entry["CapMap"] = {NODE_ATTR_CONN_REJECT: []}
    peer_entry = peer if isinstance(peer, dict) else node_entry(peer.name, peer.public_key)
    path = os.path.join(node.dir, "netmap.json")
    with open(path, "w") as f:
        json.dump({"SelfNode": self_entry, "Peers": [peer_entry], "PacketFilter": node.rules}, f)
    return path


def new_node(name: str, ns: str) -> Node:
    d = public_tempdir(f"na-{name}-")
    node = Node(name, ns, d)
    st = StateStore(node.state_dir).load_or_create()
    node.public_key = st.node_key.public_text(NODE_PREFIX)
    return node


def start_agent(node: Node, netmap: str) -> None:
    logf = open(os.path.join(node.dir, "agent.log"), "w")
    env = dict(os.environ, NODEAGENT_LOG="INFO")
    node.proc = popen_in_netns(node.ns, [*nodeagent_cmd(), "up", "--socket", node.sock,
                                         "--state-dir", node.state_dir, "--tun", "na0",
                                         "--port", str(WG_PORT), "--netmap-file", netmap],
                               stdout=logf, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while not os.path.exists(node.sock):
        if node.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"agent {node.name} did not start:\n{node.log()}")
        time.sleep(0.05)


def stop_agent(node: Node) -> None:
    p = node.proc
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    with make_netns("nwa") as ns_a, make_netns("nwb") as ns_b:
        veth_pair(ns_a, ns_b, f"{UNDERLAY['a']}/24", f"{UNDERLAY['b']}/24")
        yield ns_a, ns_b


@contextlib.contextmanager
def two_agents(rules_a: list[dict[str, Any]], rules_b: list[dict[str, Any]]
               ) -> Iterator[tuple[Node, Node]]:
    with two_namespaces() as (ns_a, ns_b):
        a, b = new_node("a", ns_a), new_node("b", ns_b)
        a.rules, b.rules = rules_a, rules_b
        try:
            start_agent(a, write_netmap(a, b))
            start_agent(b, write_netmap(b, a))
            yield a, b
        finally:
            stop_agent(a)
            stop_agent(b)
            subprocess.run(["rm", "-rf", a.dir, b.dir], check=False)


def ping(ns: str, addr: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2",
                           "-W", "3", addr], capture_output=True, text=True, timeout=30)


def wait_ping(ns: str, addr: str, timeout: float = 15.0) -> None:
    """The first packets may wait for a handshake: retry until one ping round-trips."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = ping(ns, addr, 1)
        if last.returncode == 0:
            return
    raise AssertionError(f"no ping reply from {addr} in {ns}: {last.stdout if last else ''}")
