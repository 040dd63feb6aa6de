"""Test harness: real ``nodeagent up`` processes (and wireguard-go) in network namespaces linked by
veth, configured from static netmap files — the engine before the control plane.

Underlay addresses come from the benchmark range 198.18.0.0/15 (never routed anywhere; traffic
stays on the namespaces' veth); tailnet addresses from 100.64.0.0/10 and fd7a:115c:a1e0::/48.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nodeagent.ipn.state import StateStore
from nodeagent.keys import NODE_PREFIX
from nodeagent.tailcfg import NODE_ATTR_CONN_REJECT
from tests.agentutil import nodeagent_cmd, public_tempdir
from tests.netns import in_netns, make_netns, popen_in_netns, veth_pair
from tests.procutil import stop

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


def start_agent(node: Node, netmap: str, env_extra: dict[str, str] | None = None) -> None:
    logf = open(os.path.join(node.dir, "agent.log"), "w")
    env = dict(os.environ, NODEAGENT_LOG="INFO", **(env_extra or {}))
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
    stop(node.proc)


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    with make_netns("nwa") as ns_a, make_netns("nwb") as ns_b:
        veth_pair(ns_a, ns_b, f"{UNDERLAY['a']}/24", f"{UNDERLAY['b']}/24")
        yield ns_a, ns_b


@contextlib.contextmanager
def two_agents(rules_a: list[dict[str, Any]], rules_b: list[dict[str, Any]], *,
               env_a: dict[str, str] | None = None, env_b: dict[str, str] | None = None
               ) -> Iterator[tuple[Node, Node]]:
    """Two agents in two namespaces; ``env_a``/``env_b`` add to each agent's environment."""
    with two_namespaces() as (ns_a, ns_b):
        a, b = new_node("a", ns_a), new_node("b", ns_b)
        a.rules, b.rules = rules_a, rules_b
        try:
            start_agent(a, write_netmap(a, b), env_a)
            start_agent(b, write_netmap(b, a), env_b)
            yield a, b
        finally:
            stop_agent(a)
            stop_agent(b)
            subprocess.run(["rm", "-rf", a.dir, b.dir], check=False)


def run_in(ns: str, fn: Any, *args: Any) -> Any:
    """Call a blocking function in the current thread switched into ``ns``."""
    with in_netns(ns):
        return fn(*args)


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


# --- wireguard-go (the reference implementation) ------------------------------------------------

# Upstream wireguard-go (modern: TUN and UDP offloads) beside the repository, see shared/tools.
MODERN_WIREGUARD_GO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   "..", "shared", "tools", "wireguard-go")


def wireguard_go_binaries() -> dict[str, str]:
    """The wireguard-go binaries present: ``{"modern": path, "debian": path}``, either may be
    missing (interop tests parametrize over these, the benchmark prefers "modern")."""
    import shutil

    found: dict[str, str] = {}
    modern = os.path.normpath(MODERN_WIREGUARD_GO)
    if os.path.isfile(modern) and os.access(modern, os.X_OK):
        found["modern"] = modern
    debian = shutil.which("wireguard-go")
    if debian is not None:
        found["debian"] = debian
    return found


@dataclass
class WgGo:
    ns: str
    iface: str
    proc: subprocess.Popen[Any]
    public_key: str  # "nodekey:hex", the form a netmap carries

    def show(self, what: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns, "wg", "show", self.iface, what],
                              capture_output=True, text=True, timeout=10).stdout


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


@contextlib.contextmanager
def wireguard_go(ns: str, name: str, tmpdir: str, *, peer_key: str, peer_endpoint: str,
                 peer_allowed: list[str], listen_port: int = WG_PORT,
                 private_key: bytes | None = None, binary: str = "wireguard-go"
                 ) -> Iterator[WgGo]:
    """wireguard-go as node ``name`` (tailnet addresses TS4/TS6[name]) with one peer;
    ``binary`` is the executable (see ``wireguard_go_binaries``)."""
    import secrets

    from nacl.public import PrivateKey

    from nodeagent.keys import parse_public

    iface = "wgg" + secrets.token_hex(4)  # its UAPI socket path is global: the name must be unique
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    proc = popen_in_netns(ns, [binary, iface], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    sock_path = f"/var/run/wireguard/{iface}.sock"
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock_path):  # polling a file another process creates
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("wireguard-go did not start")
            time.sleep(0.02)
        priv = PrivateKey(private_key) if private_key else PrivateKey.generate()
        keyfile = os.path.join(tmpdir, f"{iface}.key")
        with open(keyfile, "w") as f:
            f.write(_b64(bytes(priv)))
        os.chmod(keyfile, 0o600)
        peer_pub = _b64(parse_public(peer_key, NODE_PREFIX))
        cmds = [["wg", "set", iface, "listen-port", str(listen_port), "private-key", keyfile,
                 "peer", peer_pub, "allowed-ips", ",".join(peer_allowed),
                 "endpoint", peer_endpoint],
                ["ip", "addr", "add", f"{TS4[name]}/32", "dev", iface],
                ["ip", "-6", "addr", "add", f"{TS6[name]}/128", "dev", iface, "nodad"],
                ["ip", "link", "set", iface, "mtu", "1280", "up"],
                ["ip", "route", "add", "100.64.0.0/10", "dev", iface],
                ["ip", "-6", "route", "add", "fd7a:115c:a1e0::/48", "dev", iface]]
        for argv in cmds:
            r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                               text=True, timeout=10)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
        yield WgGo(ns, iface, proc, NODE_PREFIX + bytes(priv.public_key).hex())
    finally:
        stop(proc, timeout=5)  # a clean exit lets wireguard-go remove its UAPI socket
        with contextlib.suppress(OSError):
            os.unlink(sock_path)


@contextlib.contextmanager
def agent_and_wireguard_go(rules_a: list[dict[str, Any]], binary: str = "wireguard-go"
                           ) -> Iterator[tuple[Node, WgGo]]:
    """nodeagent as node a in one namespace, wireguard-go (``binary``) as node b in the other."""
    with two_namespaces() as (ns_a, ns_b):
        a = new_node("a", ns_a)
        a.rules = rules_a
        try:
            with wireguard_go(ns_b, "b", a.dir, peer_key=a.public_key,
                              peer_endpoint=f"{UNDERLAY['a']}:{WG_PORT}",
                              peer_allowed=[f"{TS4['a']}/32", f"{TS6['a']}/128"],
                              binary=binary) as wg:
                peer = node_entry("b", wg.public_key)
                start_agent(a, write_netmap(a, peer))
                yield a, wg
        finally:
            stop_agent(a)
            subprocess.run(["rm", "-rf", a.dir], check=False)
