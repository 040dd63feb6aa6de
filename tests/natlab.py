"""natlab: a simulated internet of namespaces for NAT-traversal and DERP tests (issue "Reach any
peer", item 6).

The harness owns the network and the processes it starts, nothing else:

- a **public segment**: a hub namespace holding bridge ``br0``; every public member (the control
  server's namespace, each derper "region" namespace, each home router's WAN leg) has one veth
  port on it. Addresses come from TEST-NET-3, ``203.0.113.0/24``: control ``.2``, region *i*
  ``.10+i``, router *i*'s WAN ``.100+i``.
- **homes**: a router namespace (``wan0`` on the public segment, ``lan0`` to its LAN, IP
  forwarding on) and a LAN namespace behind it (``eth0``, default route via the router): the
  agent's host. LAN *i* is ``192.168.i.0/24`` unless given: router ``.1``, host ``.2``.
- **NAT modes** per router, as one nftables table ``ip natlab`` replaced atomically with
  ``nft -f``: ``none`` (routed, no NAT; the public members get a route to the LAN),
  ``easy`` (``masquerade``: endpoint-independent mapping that keeps the source port when it is
  free) and ``hard`` (``masquerade fully-random``: a new random port per destination). In every
  mode the router drops unsolicited inbound packets to itself *before* conntrack confirms them
  (as a home router's firewall does), so a peer's early probe leaves no entry that would steal
  the port of the LAN host's later mapping; with NAT it also forwards nothing unsolicited from
  the WAN.
- **blocks**: ``block_direct_udp()`` drops UDP between home addresses in the hub's bridge
  (``table bridge natlab``): the routers still create their mappings, the "internet" drops the
  datagrams; DERP (TCP) and STUN to the regions pass. ``block_port(proto, port)`` drops one
  TCP/UDP port between the homes at the routers (LAN side of the NAT, so the port is the LAN
  host's own).
- **latency** per region: ``tc qdisc ... netem delay`` on the region's ``eth0`` (its outgoing
  packets, so the round-trip time grows by that much). A kernel without ``sch_netem`` gets a
  userspace delay line instead: the region's link then runs through one more namespace whose
  process (``python -m tests.natlab delay-line``) forwards Ethernet frames between two veths
  with ``AF_PACKET`` sockets (``PACKET_VNET_HDR``, so offloaded TCP/UDP segments pass intact)
  and delays the region's outgoing ones. There a region must be created with ``latency_ms``
  (0 is fine) to have its latency changed later.
- **processes**: a TLS derper per region (``derper --certmode manual --hostname <IP>``, a
  self-signed certificate made beforehand so its ``sha256-raw:`` name is known; or Tailscale's
  real ``derper`` the same way with ``start_tailscale_derper``), ``nodeagent
  control serve`` with a policy whose ``derpMap`` holds the running regions, and ``nodeagent up``
  agents in the LAN namespaces. Logs go to ``<lab.dir>/<name>.log``.

Everything is torn down by ``NatLab.close()`` (also the ``with`` exit), whatever failed: processes
get SIGTERM, then SIGKILL after a bounded wait, namespaces are removed (with their veths, bridge,
nft tables and qdiscs), and the temp dir goes. ``tests.netns`` removes namespaces a crashed run
left registered at interpreter exit. All names are unique per run.

Example::

    from tests.natlab import NatLab, natlab_missing, stun

    with NatLab() as lab:
        r1 = lab.add_region("r1", latency_ms=40)
        derper = lab.start_derper(r1)                 # pid, port, region_json()
        a = lab.add_home("a", nat="easy")
        b = lab.add_home("b", nat="hard")
        ctl = lab.start_control()                     # derpMap = the running derpers
        agent = lab.start_agent(a, ctl)               # `nodeagent up` in a's LAN namespace
        sock = lab.udp_socket(b.lan, 41641)           # a UDP socket living in b's LAN
        (ip, port), rtt = stun(sock, derper.stun_addr)
        lab.block_direct_udp()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.stun.codec import StunError, build_binding_request, new_txid, parse_binding_response
from tests.agentutil import localapi, nodeagent_cmd, public_tempdir
from tests.netns import (
    call_in_netns,
    create_netns,
    make_netns,
    netns_available,
    popen_in_netns,
    remove_netns,
    run_in_netns,
    tun_available,
    veth_pair,
)
from tests.procutil import stop

NAT_MODES: tuple[str, ...] = ("none", "easy", "hard")
PUBLIC_NET = ipaddress.ip_network("203.0.113.0/24")
CONTROL_IP = "203.0.113.2"
TABLE = "natlab"
BRIDGE = "br0"
FIRST_REGION_ID = 900
DERP_PORT = 443
STUN_PORT = 3478
CONTROL_PORT = 80
REPO_ROOT = Path(__file__).resolve().parents[1]
_PREFIX = "nl"  # namespace names: nl<role><pid>-<random>


class NatlabError(RuntimeError):
    """The harness could not build or drive the network; the message says which step."""


# --- availability ------------------------------------------------------------------------------


def _nft(ns: str, ruleset: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = run_in_netns(ns, ["nft", "-f", "-"], input=ruleset, timeout=30)
    if check and r.returncode != 0:
        raise NatlabError(f"nft -f in {ns}: {r.stderr.strip()}\n--- ruleset ---\n{ruleset}")
    return r


@functools.cache
def nft_available() -> str | None:
    """``None`` if nftables NAT and bridge filtering work in a namespace, else why not."""
    if (why := netns_available()) is not None:
        return why
    if shutil.which("nft") is None:
        return "the nftables 'nft' tool is not installed (apt-get install nftables)"
    probe = _ruleset("ip", {"s": ["192.0.2.0/24"]}, [(
        "c", "type nat hook postrouting priority srcnat;", ["masquerade fully-random"])])
    probe += _ruleset("bridge", {"s": []}, [(
        "f", "type filter hook forward priority filter;", ["ip saddr @s meta l4proto udp drop"])])
    with make_netns(f"{_PREFIX}probe") as ns:
        r = _nft(ns, probe, check=False)
    if r.returncode != 0:
        return f"nft cannot load a NAT ruleset here: {r.stderr.strip()}"
    return None


@functools.cache
def netem_available() -> str | None:
    """``None`` if ``tc qdisc ... netem`` works (the kernel has sch_netem), else why not."""
    if (why := netns_available()) is not None:
        return why
    if shutil.which("tc") is None:
        return "the iproute2 'tc' tool is not installed"
    with make_netns(f"{_PREFIX}probe") as ns:
        veth_pair(ns, ns, name_a="pa", name_b="pb")
        r = run_in_netns(ns, ["tc", "qdisc", "add", "dev", "pa", "root", "netem", "delay", "1ms"])
    if r.returncode != 0:
        return f"tc netem does not work here: {r.stderr.strip()}"
    return None


def derper_available() -> str | None:
    if importlib.util.find_spec("nodeagent_derper") is None:
        return "feature derper is not installed in this environment"
    return None


def tailscale_derper_missing() -> str | None:
    """``None`` if Tailscale's ``derper`` binary can run here, else why not."""
    from tests.derptls import TAILSCALE_DERPER

    if not os.access(TAILSCALE_DERPER, os.X_OK):
        return f"Tailscale's derper binary is missing: {TAILSCALE_DERPER}"
    return None


def natlab_missing(*, derper: bool = False, tun: bool = False) -> str | None:
    """``None`` when a lab can be built (and, if asked, derpers and agents started), else the
    reason to skip naming what is missing."""
    return (netns_available() or nft_available() or (derper_available() if derper else None)
            or (tun_available() if tun else None))


# --- small tools -------------------------------------------------------------------------------


def _ip(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NatlabError(f"ip -n {ns} {' '.join(args)}: {r.stderr.strip() or r.returncode}")


def _sysctl(ns: str, *settings: str) -> None:
    r = run_in_netns(ns, ["sysctl", "-q", "-w", *settings], timeout=30)
    if r.returncode != 0:
        raise NatlabError(f"sysctl in {ns}: {r.stderr.strip()}")


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``cond`` (the demo's loop: ``nodeagent.demo.lab.wait_until``) until it returns
    something true (returned); ``TimeoutError`` naming ``what`` after ``timeout`` s."""
    from nodeagent.demo.lab import DemoError
    from nodeagent.demo.lab import wait_until as poll

    try:
        return poll(cond, timeout, what)
    except DemoError as e:
        raise TimeoutError(str(e)) from None


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- things on the network ---------------------------------------------------------------------


@dataclass
class Host:
    """A namespace with one address: a LAN host, or a public member."""

    name: str
    ns: str
    ip: str


@dataclass
class Region:
    """A derper namespace on the public segment (one DERP region)."""

    id: int
    code: str
    ns: str
    ip: str
    latency_ms: float | None = None
    delay_ns: str | None = None  # the delay line's namespace (no netem in the kernel)
    delay_proc: subprocess.Popen[Any] | None = None
    derper: Derper | None = None

    @property
    def host(self) -> Host:
        return Host(self.code, self.ns, self.ip)


@dataclass
class Derper:
    """A running TLS derper with STUN in a region's namespace."""

    region: Region
    proc: subprocess.Popen[Any]
    port: int
    stun_port: int
    dir: Path
    cert_name: str  # "sha256-raw:<hex>" of its self-signed certificate (for CertName pinning)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ip(self) -> str:
        return self.region.ip

    @property
    def stun_addr(self) -> tuple[str, int]:
        return (self.region.ip, self.stun_port)

    @property
    def url(self) -> str:
        return f"https://{self.region.ip}:{self.port}"

    def node_json(self) -> dict[str, Any]:
        r = self.region
        return {"Name": f"{r.id}a", "RegionID": r.id, "HostName": r.ip, "IPv4": r.ip,
                "DERPPort": self.port, "STUNPort": self.stun_port, "InsecureForTests": True}

    def region_json(self) -> dict[str, Any]:
        """The DERP map region in Tailscale's JSON shape (certificate unverified)."""
        r = self.region
        return {"RegionID": r.id, "RegionCode": r.code, "RegionName": f"natlab {r.code}",
                "Nodes": [self.node_json()]}

    def log(self) -> str:
        return _tail(self.dir / "derper.log")


@dataclass
class Router:
    """A home router (``wan0`` public, ``lan0`` toward ``lan``) and the LAN host behind it."""

    name: str
    ns: str
    wan_ip: str
    lan_ip: str
    lan_net: str
    lan: Host
    nat: str = "easy"
    blocked_ports: set[tuple[str, int]] = field(default_factory=set)


@dataclass
class Control:
    """``nodeagent control serve`` in its own public namespace."""

    ns: str
    ip: str
    port: int
    dir: Path
    proc: subprocess.Popen[Any]
    url: str = ""
    admin_token: str = ""

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def policy_path(self) -> Path:
        return self.dir / "policy.hujson"

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``nodeagent control ARGS --state-dir ...`` run inside the control namespace."""
        return run_in_netns(self.ns, [*nodeagent_cmd(), "control", *args, "--state-dir",
                                      str(self.state_dir)], timeout=timeout)

    def authkey(self, *, reusable: bool = True) -> str:
        r = self.ctl("authkey", "create", *(["--reusable"] if reusable else []))
        if r.returncode != 0:
            raise NatlabError(f"authkey create: {r.stderr.strip()}")
        return r.stdout.strip().splitlines()[-1]

    def set_policy(self, text: str) -> None:
        """Write the policy file (what SIGHUP re-reads) and install it now."""
        self.policy_path.write_text(text)
        r = self.ctl("policy", "set", str(self.policy_path))
        if r.returncode != 0:
            raise NatlabError(f"policy set: {r.stderr.strip()}")

    def nodes(self) -> list[dict[str, Any]]:
        r = self.ctl("nodes", "--json")
        if r.returncode != 0:
            raise NatlabError(f"control nodes: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def log(self) -> str:
        return _tail(self.dir / "control.log")


@dataclass
class Agent:
    """``nodeagent up`` in a LAN namespace."""

    name: str
    ns: str
    dir: Path
    proc: subprocess.Popen[Any] | None = None

    @property
    def sock(self) -> str:
        return str(self.dir / "na.sock")

    @property
    def state_dir(self) -> str:
        return str(self.dir / "state")

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        """LocalAPI ``/localapi/v0/<path>``; asserts status 200 and returns the body."""
        st, out = asyncio.run(localapi(self.sock, method, f"/localapi/v0/{path}", body))
        if st != 200:
            raise NatlabError(f"{self.name}: {method} {path}: {st} {out}")
        return out

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*nodeagent_cmd(), *args, "--socket", self.sock],
                              capture_output=True, text=True, timeout=timeout)

    def wait_running(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for ``BackendState == "Running"``; return that status."""
        def running() -> dict[str, Any] | None:
            st = self.api("status")
            return st if st.get("BackendState") == "Running" else None
        try:
            return wait_until(running, timeout, f"{self.name} Running")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- {self.name} log ---\n{self.log()}") from None

    def log(self) -> str:
        return _tail(self.dir / "agent.log")


def _answers(sock: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sock)  # a stale file from a killed agent refuses; a live one accepts
            return True
        except OSError:
            return False


# --- the lab -----------------------------------------------------------------------------------


class NatLab:
    """One simulated internet. Build it with ``add_region``/``add_home``, start processes with
    ``start_derper``/``start_control``/``start_agent``, reshape it with ``set_nat``,
    ``block_direct_udp``, ``block_port``, ``set_latency``; ``close()`` removes all of it."""

    def __init__(self, *, latency: str = "auto", keep_dir: bool = False) -> None:
        """``latency``: how ``latency_ms`` is made: ``auto`` (netem when the kernel has it,
        else the delay line), ``netem`` or ``delayline``. ``keep_dir`` keeps the logs."""
        if latency not in ("auto", "netem", "delayline"):
            raise ValueError(f"latency={latency!r}: want auto, netem or delayline")
        if (why := natlab_missing()) is not None:
            raise NatlabError(why)
        if latency == "auto":
            latency = "netem" if netem_available() is None else "delayline"
        self.latency_backend: str = latency
        self.keep_dir = keep_dir
        self.dir = Path(public_tempdir("na-natlab-"))
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.regions: list[Region] = []
        self.routers: list[Router] = []
        self.controls: list[Control] = []
        self.agents: list[Agent] = []
        self.udp_blocked = False
        self._public: list[Host] = []
        self._routes: set[tuple[str, str, str]] = set()
        self._ports = 0
        self._sockets: list[socket.socket] = []
        self._closed = False
        try:
            self.hub = self._netns("hub")
            _ip(self.hub, "link", "add", BRIDGE, "type", "bridge")
            _ip(self.hub, "link", "set", BRIDGE, "up")
            self._apply_bridge_rules()
        except BaseException:
            self.close()
            raise

    # --- context manager / teardown ----------------------------------------------------------

    def __enter__(self) -> NatLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process (SIGTERM, SIGKILL after 10 s), remove every namespace and the
        temp dir. Idempotent; never raises for a part already gone."""
        if self._closed:
            return
        self._closed = True
        for s in self._sockets:
            s.close()
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGTERM)
        for p in live:
            with contextlib.suppress(Exception):
                stop(p)
        for ns in reversed(self.namespaces):
            remove_netns(ns)
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """After ``close()``: what is still there (namespaces, live processes, a ``natlab``
        nft table in the caller's namespace); empty when the teardown was complete."""
        out: list[str] = []
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=30).stdout.split()
        out += [f"namespace {ns}" for ns in self.namespaces
                if ns in listed or os.path.exists(f"/run/netns/{ns}")]
        out += [f"process {p.pid} ({p.args!r})" for p in self.procs if _pid_alive(p.pid)]
        if shutil.which("nft"):
            tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                    timeout=30).stdout
            out += [f"nft {ln.strip()}" for ln in tables.splitlines()
                    if ln.split()[-1:] == [TABLE]]
        if self.dir.exists() and not self.keep_dir:
            out.append(f"directory {self.dir}")
        return out

    # --- building ----------------------------------------------------------------------------

    def _netns(self, role: str) -> str:
        ns = create_netns(f"{_PREFIX}{role}")
        self.namespaces.append(ns)
        return ns

    def _plug(self, ns: str, dev: str, ip: str) -> None:
        """A veth from ``ns`` (named ``dev``, addressed ``ip``/24) to a port of the bridge."""
        self._ports += 1
        port = f"p{self._ports}"
        veth_pair(ns, self.hub, f"{ip}/{PUBLIC_NET.prefixlen}", name_a=dev, name_b=port)
        _ip(self.hub, "link", "set", port, "master", BRIDGE)

    def add_region(self, code: str | None = None, *, latency_ms: float | None = None) -> Region:
        """A derper namespace ``203.0.113.(10+i)`` on the public segment (region id 900+i-1).
        ``latency_ms``: added round-trip time on its link (``None``: a plain link; without
        netem only a region made with a number can change it later)."""
        i = len(self.regions) + 1
        region = Region(FIRST_REGION_ID + i - 1, code or f"r{i}", self._netns(f"r{i}"),
                        str(PUBLIC_NET[10 + i]), latency_ms)
        self.regions.append(region)
        if latency_ms is not None and self.latency_backend == "delayline":
            region.delay_ns = self._netns(f"d{i}")
            veth_pair(region.ns, region.delay_ns, f"{region.ip}/{PUBLIC_NET.prefixlen}",
                      name_a="eth0", name_b="in0")
            _sysctl(region.delay_ns, "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1")
            self._ports += 1
            port = f"p{self._ports}"
            veth_pair(region.delay_ns, self.hub, name_a="out0", name_b=port)
            _ip(self.hub, "link", "set", port, "master", BRIDGE)
            for dev in ("in0", "out0"):
                _ip(region.delay_ns, "link", "set", dev, "promisc", "on")
            self._start_delay_line(region, latency_ms)
        else:
            self._plug(region.ns, "eth0", region.ip)
            if latency_ms:
                self.set_latency(region, latency_ms)
        self._public.append(region.host)
        self._sync_routes()
        return region

    def add_home(self, name: str | None = None, *, nat: str = "easy",
                 lan_net: str | None = None) -> Router:
        """Router *i* (WAN ``203.0.113.(100+i)``) with LAN ``lan_net`` (default
        ``192.168.i.0/24``; the router is ``.1``, the LAN host ``.2``), NAT mode ``nat``."""
        i = len(self.routers) + 1
        name = name or f"h{i}"
        net = ipaddress.ip_network(lan_net or f"192.168.{i}.0/24")
        r_ns, l_ns = self._netns(f"g{i}"), self._netns(f"l{i}")
        router = Router(name, r_ns, str(PUBLIC_NET[100 + i]), str(net[1]), str(net),
                        Host(f"{name}-lan", l_ns, str(net[2])))
        self._plug(r_ns, "wan0", router.wan_ip)
        veth_pair(l_ns, r_ns, f"{router.lan.ip}/{net.prefixlen}",
                  f"{router.lan_ip}/{net.prefixlen}", name_a="eth0", name_b="lan0")
        _sysctl(r_ns, "net.ipv4.ip_forward=1")
        _ip(l_ns, "route", "add", "default", "via", router.lan_ip)
        self.routers.append(router)
        self._public.append(Host(name, r_ns, router.wan_ip))
        self.set_nat(router, nat)
        return router

    # --- reshaping ---------------------------------------------------------------------------

    def set_nat(self, router: Router, mode: str) -> None:
        """``none``, ``easy`` or ``hard`` from now on (existing conntrack mappings stay)."""
        if mode not in NAT_MODES:
            raise ValueError(f"NAT mode {mode!r}: want one of {', '.join(NAT_MODES)}")
        router.nat = mode
        self._sync_routes()
        for r in self.routers:  # the others' view of this home (its LAN is public or not)
            self._apply_router_rules(r)
        self._apply_bridge_rules()

    def block_direct_udp(self) -> None:
        """Drop UDP between home addresses (WAN, and LAN for ``none`` routers) on the public
        segment. The routers still map outgoing datagrams; TCP and STUN to regions pass."""
        self.udp_blocked = True
        self._apply_bridge_rules()

    def unblock_direct_udp(self) -> None:
        self.udp_blocked = False
        self._apply_bridge_rules()

    def block_port(self, proto: str, port: int) -> None:
        """Drop ``proto`` (``tcp``/``udp``) packets from or to ``port`` between the homes,
        enforced on each router's LAN side of the NAT (the LAN hosts' own port numbers)."""
        if proto not in ("tcp", "udp") or not 0 < port < 65536:
            raise ValueError(f"block_port({proto!r}, {port}): want tcp/udp and 1..65535")
        for r in self.routers:
            r.blocked_ports.add((proto, port))
            self._apply_router_rules(r)

    def unblock_port(self, proto: str, port: int) -> None:
        for r in self.routers:
            r.blocked_ports.discard((proto, port))
            self._apply_router_rules(r)

    def set_latency(self, region: Region, ms: float) -> None:
        """Added round-trip time on ``region``'s link from now on (0 removes it)."""
        if region.delay_ns is not None:
            if region.delay_proc is not None:
                stop(region.delay_proc)
            self._start_delay_line(region, ms)
        elif self.latency_backend == "netem":
            if ms > 0:
                r = run_in_netns(region.ns, ["tc", "qdisc", "replace", "dev", "eth0", "root",
                                             "netem", "delay", f"{ms:g}ms"])
                if r.returncode != 0:
                    raise NatlabError(f"tc netem in {region.ns}: {r.stderr.strip()}")
            else:
                run_in_netns(region.ns, ["tc", "qdisc", "del", "dev", "eth0", "root"])
        else:
            raise NatlabError(f"region {region.code}: no netem here ({netem_available()}); "
                              "create the region with latency_ms=<number> for a delay line")
        region.latency_ms = ms

    def _start_delay_line(self, region: Region, ms: float) -> None:
        assert region.delay_ns is not None
        ready = self.dir / f"delayline-{region.code}.ready"
        ready.unlink(missing_ok=True)
        log = open(self.dir / f"delayline-{region.code}.log", "a")
        with log:
            # in0 faces the region: its frames (the region's outgoing packets) wait `ms`.
            proc = popen_in_netns(region.delay_ns, [
                sys.executable, "-m", "tests.natlab", "delay-line", "in0", "out0", f"{ms:g}", "0",
                str(ready)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        region.delay_proc = proc
        try:
            wait_until(lambda: ready.exists() or proc.poll() is not None, 20, "the delay line")
        except TimeoutError:
            pass
        if not ready.exists():
            raise NatlabError(f"delay line for {region.code} did not start: "
                              f"{_tail(self.dir / f'delayline-{region.code}.log')}")

    def _homes_set(self) -> list[str]:
        return [r.wan_ip for r in self.routers] + [r.lan_net for r in self.routers
                                                    if r.nat == "none"]

    def _apply_bridge_rules(self) -> None:
        rules = []
        if self.udp_blocked:
            rules.append("ip saddr @homes ip daddr @homes meta l4proto udp drop")
        _nft(self.hub, _ruleset("bridge", {"homes": self._homes_set()}, [
            ("forward", "type filter hook forward priority filter; policy accept;", rules)]))

    def _apply_router_rules(self, r: Router) -> None:
        others = [x.wan_ip for x in self.routers if x is not r] + \
                 [x.lan_net for x in self.routers if x is not r and x.nat == "none"]
        post = {"none": [], "easy": ['oifname "wan0" masquerade'],
                "hard": ['oifname "wan0" masquerade fully-random']}[r.nat]
        # Unsolicited inbound packets are dropped before conntrack confirms them: no entry of
        # theirs can later force the LAN host's mapping onto another port.
        inbound = ['iifname "wan0" ct state established,related accept',
                   'iifname "wan0" meta l4proto icmp accept', 'iifname "wan0" drop']
        fwd = []
        for proto, port in sorted(r.blocked_ports):
            for direction in ("saddr", "daddr"):
                for side in ("sport", "dport"):
                    fwd.append(f"ip {direction} @others {proto} {side} {port} drop")
        if r.nat != "none":
            fwd += ['iifname "wan0" ct state established,related accept', 'iifname "wan0" drop']
        _nft(r.ns, _ruleset("ip", {"others": others}, [
            ("postrouting", "type nat hook postrouting priority srcnat; policy accept;", post),
            ("input", "type filter hook input priority filter; policy accept;", inbound),
            ("forward", "type filter hook forward priority filter; policy accept;", fwd)]))

    def _sync_routes(self) -> None:
        """Public members reach the LAN of a ``none`` router through its WAN address."""
        want = {(h.ns, r.lan_net, r.wan_ip) for r in self.routers if r.nat == "none"
                for h in self._public if h.ns != r.ns}
        for ns, net, _ in self._routes - want:
            _ip(ns, "route", "del", net)
        for ns, net, via in want - self._routes:
            _ip(ns, "route", "replace", net, "via", via)
        self._routes = want

    # --- processes ---------------------------------------------------------------------------

    def start_derper(self, region: Region, *, port: int = DERP_PORT, stun_port: int = STUN_PORT,
                     http_port: int = 80, extra: Iterable[str] = ()) -> Derper:
        """A TLS derper (self-signed for the region's IP) with STUN in ``region``; returns once
        it accepts TCP and answers STUN."""
        from nodeagent_derper.certs import cert_paths, ensure_self_signed_for_ip

        d = self.dir / f"derper-{region.code}"
        certdir = d / "certs"
        certdir.mkdir(parents=True)
        cert_name = ensure_self_signed_for_ip(str(certdir), region.ip)
        if cert_name is None:  # pragma: no cover - a fresh dir has no files
            raise NatlabError(f"certificate files already in {cert_paths(str(certdir), region.ip)}")
        log = open(d / "derper.log", "a")
        with log:
            proc = popen_in_netns(region.ns, [
                sys.executable, "-m", "nodeagent_derper.cli", "--certmode", "manual",
                "--hostname", region.ip, "--certdir", str(certdir), "-a",
                f"{region.ip}:{port}", "--stun-port", str(stun_port), "--http-port",
                str(http_port), "-c", str(d / "derper.key"), *extra],
                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        derper = Derper(region, proc, port, stun_port, d, cert_name)

        def up() -> bool:
            if proc.poll() is not None:
                raise NatlabError(f"derper in {region.code} exited {proc.returncode}: "
                                  f"{derper.log()}")
            return call_in_netns(region.ns, _serving, region.ip, port, stun_port)

        try:
            wait_until(up, 20, f"derper {region.code}")
        except TimeoutError as e:
            raise NatlabError(f"{e}: {derper.log()}") from None
        region.derper = derper
        return derper

    def start_tailscale_derper(self, region: Region, *, port: int = DERP_PORT,
                               stun_port: int = STUN_PORT, http_port: int = 80,
                               extra: Iterable[str] = ()) -> Derper:
        """Tailscale's real ``derper`` (``tests.derptls.TAILSCALE_DERPER``) in ``region``, set up
        as ``start_derper`` sets up ours: ``-certmode manual`` with the region's IP as
        ``-hostname`` (it makes itself a self-signed certificate, whose ``sha256-raw:`` name is
        read back), STUN on ``stun_port``; returns once it accepts TCP and answers STUN. The
        DERP map entry is the same (``InsecureForTests``). ``tailscale_derper_missing()`` says
        whether the binary is there."""
        from tests.derptls import TAILSCALE_DERPER

        if (why := tailscale_derper_missing()) is not None:
            raise NatlabError(why)
        d = self.dir / f"tsderper-{region.code}"
        certdir = d / "certs"
        certdir.mkdir(parents=True)
        log = open(d / "derper.log", "a")
        with log:
            proc = popen_in_netns(region.ns, [
                str(TAILSCALE_DERPER), "-a", f"{region.ip}:{port}", "-certmode", "manual",
                "-certdir", str(certdir), "-hostname", region.ip, "-stun-port", str(stun_port),
                "-http-port", str(http_port), "-c", str(d / "derper.key"), *extra],
                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        derper = Derper(region, proc, port, stun_port, d, "")

        def up() -> bool:
            if proc.poll() is not None:
                raise NatlabError(f"Tailscale's derper in {region.code} exited "
                                  f"{proc.returncode}: {derper.log()}")
            return call_in_netns(region.ns, _serving, region.ip, port, stun_port)

        try:
            wait_until(up, 20, f"Tailscale's derper {region.code}")
        except TimeoutError as e:
            raise NatlabError(f"{e}: {derper.log()}") from None
        crt = certdir / f"{region.ip}.crt"
        if crt.exists():
            import hashlib

            der = ssl.PEM_cert_to_DER_cert(crt.read_text())
            derper.cert_name = "sha256-raw:" + hashlib.sha256(der).hexdigest()
        region.derper = derper
        return derper

    def derp_map(self) -> dict[str, Any]:
        """``{"Regions": {"900": region_json, ...}, "omitDefaultRegions": true}`` of the
        running derpers."""
        return {"Regions": {str(r.id): r.derper.region_json() for r in self.regions
                            if r.derper is not None},
                "omitDefaultRegions": True}

    def default_policy(self) -> str:
        """Everyone may reach everyone; ``derpMap`` = the running derpers."""
        return json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                           "derpMap": self.derp_map()}, indent=2) + "\n"

    def start_control(self, policy: str | None = None, *, port: int = CONTROL_PORT,
                      keepalive: float = 1.0) -> Control:
        """``nodeagent control serve`` on ``203.0.113.2:port`` in its own namespace, with
        ``policy`` (default: ``default_policy()``) as its ``--policy`` file; returns once the
        admin API answers. ``Control.url`` and ``Control.admin_token`` are then set."""
        ns = self._netns("c")
        self._plug(ns, "eth0", CONTROL_IP)
        self._public.append(Host("control", ns, CONTROL_IP))
        self._sync_routes()
        d = self.dir / f"control{len(self.controls) + 1}"
        (d / "state").mkdir(parents=True)
        (d / "policy.hujson").write_text(policy if policy is not None else self.default_policy())
        log = open(d / "control.log", "a")
        with log:
            proc = popen_in_netns(ns, [
                *nodeagent_cmd(), "control", "serve", "--listen", f"{CONTROL_IP}:{port}",
                "--state-dir", str(d / "state"), "--policy", str(d / "policy.hujson"),
                "--keepalive", f"{keepalive:g}"], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        ctl = Control(ns, CONTROL_IP, port, d, proc)
        self.controls.append(ctl)

        def up() -> bool:
            if proc.poll() is not None:
                raise NatlabError(f"control exited {proc.returncode}: {ctl.log()}")
            return (ctl.state_dir / "control-url").exists() and ctl.ctl("nodes").returncode == 0

        try:
            wait_until(up, 30, "control serve")
        except TimeoutError as e:
            raise NatlabError(f"{e}: {ctl.log()}") from None
        ctl.url = (ctl.state_dir / "control-url").read_text().strip()
        ctl.admin_token = (ctl.state_dir / "admin-token").read_text().strip()
        return ctl

    def start_agent(self, where: Router | Host, control: Control, name: str | None = None, *,
                    auth_key: str | None = None, tun: str = "na0", port: int | None = None,
                    extra: Iterable[str] = (), env: dict[str, str] | None = None) -> Agent:
        """``nodeagent up --tun`` in ``where``'s LAN namespace (a ``Router`` means its LAN
        host), logged in to ``control`` with ``auth_key`` (default: a new reusable key);
        returns once its LocalAPI answers (``Agent.wait_running()`` waits for the login)."""
        host = where.lan if isinstance(where, Router) else where
        name = name or (where.name if isinstance(where, Router) else host.name)
        d = self.dir / f"agent-{name}"
        d.mkdir(parents=True)
        os.chmod(d, 0o755)
        agent = Agent(name, host.ns, d)
        key = auth_key or control.authkey()
        argv = [*nodeagent_cmd(), "up", "--socket", agent.sock, "--state-dir", agent.state_dir,
                "--tun", tun, "--hostname", name, "--login-server", control.url,
                "--auth-key", key]
        if port is not None:
            argv += ["--port", str(port)]
        log = open(d / "agent.log", "a")
        with log:
            agent.proc = popen_in_netns(host.ns, [*argv, *extra], stdout=log,
                                        stderr=subprocess.STDOUT,
                                        env=None if env is None else {**os.environ, **env})
        self.procs.append(agent.proc)
        self.agents.append(agent)

        def up() -> bool:
            assert agent.proc is not None
            if agent.proc.poll() is not None:
                raise NatlabError(f"agent {name} exited {agent.proc.returncode}: {agent.log()}")
            return _answers(agent.sock)

        wait_until(up, 20, f"agent {name} LocalAPI")
        return agent

    # --- probing from inside ------------------------------------------------------------------

    def udp_socket(self, host: Host | Router | Region, port: int = 0,
                   bind_ip: str = "0.0.0.0") -> socket.socket:
        """A UDP socket living in ``host``'s namespace (a ``Router`` means its LAN host), bound
        to ``bind_ip:port``; usable from any thread; closed with the lab."""
        ns = _ns_of(host)

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((bind_ip, port))
            return s

        s = call_in_netns(ns, make)
        self._sockets.append(s)
        return s

    def run(self, host: Host | Router | Region | str, argv: list[str],
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``run_in_netns`` in ``host``'s namespace (a ``Router`` means its LAN host)."""
        return run_in_netns(host if isinstance(host, str) else _ns_of(host), argv, **kw)

    def router_run(self, router: Router, argv: list[str],
                   **kw: Any) -> subprocess.CompletedProcess[Any]:
        """``run_in_netns`` in the router's own namespace (``nft list ruleset``, ...)."""
        return run_in_netns(router.ns, argv, **kw)


def _ns_of(host: Host | Router | Region) -> str:
    if isinstance(host, Router):
        return host.lan.ns
    return host.ns


def _ruleset(family: str, sets: dict[str, list[str]],
             chains: list[tuple[str, str, list[str]]]) -> str:
    """One ``nft -f`` transaction replacing ``table <family> natlab`` whole."""
    out = [f"table {family} {TABLE} {{}}", f"delete table {family} {TABLE}",
           f"table {family} {TABLE} {{"]
    for name, elems in sets.items():
        uniq = sorted(set(elems))
        el = f" elements = {{ {', '.join(uniq)} }};" if uniq else ""
        out.append(f"  set {name} {{ type ipv4_addr; flags interval; auto-merge;{el} }}")
    for name, head, rules in chains:
        out.append(f"  chain {name} {{")
        out.append(f"    {head}")
        out += [f"    {r}" for r in rules]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def _serving(ip: str, port: int, stun_port: int) -> bool:
    """(In the server's namespace) it accepts TCP on ``port`` and answers STUN."""
    try:
        with socket.create_connection((ip, port), timeout=1):
            pass
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            stun(s, (ip, stun_port), timeout=1)
        return True
    except OSError:
        return False


# --- STUN and HTTP from inside a namespace ------------------------------------------------------


def stun(sock: socket.socket, server: tuple[str, int],
         timeout: float = 3.0) -> tuple[tuple[str, int], float]:
    """One binding request from ``sock`` (blocking; 500 ms doubling retransmits) to
    ``server``; returns ``((mapped_ip, mapped_port), rtt_s)`` measured from the last send.
    Datagrams from elsewhere, and answers to other requests, are skipped. ``TimeoutError``
    when nothing answers in ``timeout`` s."""
    txid = new_txid()
    req = build_binding_request(txid)
    deadline = time.monotonic() + timeout
    rto = 0.5
    old = sock.gettimeout()
    try:
        while (left := deadline - time.monotonic()) > 0:
            sent = time.perf_counter()
            sock.sendto(req, server)
            wait_end = time.monotonic() + min(rto, left)
            rto *= 2
            while (w := wait_end - time.monotonic()) > 0:
                sock.settimeout(w)
                try:
                    data, src = sock.recvfrom(2048)
                except TimeoutError:
                    break
                rtt = time.perf_counter() - sent
                if src[:2] != server:
                    continue
                try:
                    got_txid, ip, port = parse_binding_response(data)
                except StunError:
                    continue
                if got_txid == txid:
                    return (ip, port), rtt
        raise TimeoutError(f"no STUN answer from {server[0]}:{server[1]} in {timeout:g}s")
    finally:
        sock.settimeout(old)


def recv_from(sock: socket.socket, timeout: float) -> tuple[bytes, tuple[str, int]] | None:
    """The next datagram on ``sock`` within ``timeout`` s, or None."""
    old = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        data, src = sock.recvfrom(65535)
        return data, src[:2]
    except TimeoutError:
        return None
    finally:
        sock.settimeout(old)


def http_get(ns: str, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``url`` from inside ``ns`` (HTTPS certificate unverified, no proxies); returns
    ``(status, body)`` (an HTTP error status is returned, not raised)."""
    def get() -> tuple[int, bytes]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))
        try:
            with opener.open(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    return call_in_netns(ns, get, timeout=timeout + 5)


# --- the userspace delay line (kernels without sch_netem) ---------------------------------------

_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_IGNORE_OUTGOING = 23
_PACKET_OUTGOING = 4
_ETH_P_ALL = 3


def _packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing until bound
    s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
    with contextlib.suppress(OSError):
        s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((ifname, _ETH_P_ALL))
    s.setblocking(False)
    return s


async def _delay_line(if_a: str, if_b: str, a_to_b: float, b_to_a: float, ready: str) -> None:
    loop = asyncio.get_running_loop()
    a, b = _packet_socket(if_a), _packet_socket(if_b)

    def direction(src: socket.socket, dst: socket.socket, delay: float) -> None:
        queue: collections.deque[tuple[float, bytes]] = collections.deque()

        def send(frame: bytes) -> None:
            with contextlib.suppress(OSError):  # a full queue drops, as a link would
                dst.send(frame)

        def drain() -> None:
            now = loop.time()
            while queue and queue[0][0] <= now:
                send(queue.popleft()[1])
            if queue:
                loop.call_at(queue[0][0], drain)

        def readable() -> None:
            for _ in range(256):
                try:
                    frame, addr = src.recvfrom(1 << 18)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    return
                if addr[2] == _PACKET_OUTGOING:
                    continue
                if delay <= 0:
                    send(frame)
                    continue
                queue.append((loop.time() + delay, frame))
                if len(queue) == 1:
                    loop.call_at(queue[0][0], drain)

        loop.add_reader(src.fileno(), readable)

    direction(a, b, a_to_b)
    direction(b, a, b_to_a)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_signal_handler(signal.SIGINT, done.set)
    Path(ready).write_text(str(os.getpid()))
    await done.wait()


def delay_line_main(argv: list[str]) -> int:
    """``delay-line IF_A IF_B A_TO_B_MS B_TO_A_MS READY_FILE``: forward every frame between
    the two interfaces, delaying each direction; write READY_FILE once forwarding."""
    if_a, if_b, ab, ba, ready = argv
    asyncio.run(_delay_line(if_a, if_b, float(ab) / 1000, float(ba) / 1000, ready))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["delay-line"]:
        sys.exit(delay_line_main(sys.argv[2:]))
    print("usage: python -m tests.natlab delay-line IF_A IF_B A_TO_B_MS B_TO_A_MS READY_FILE",
          file=sys.stderr)
    sys.exit(2)
