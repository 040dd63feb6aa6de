"""The demo's network and processes: namespaces wired with ``ip``, and the control server, the
derper and the agents started inside them.

Owns the topology. A hub namespace holds the services on ``198.18.77.1`` (a loopback address:
control on port 8080, the derper's DERP on 443 and STUN on 3478). Each agent's namespace has one
veth to the hub (``198.18.78.0/24``, ``198.18.79.0/24``, ...) and a default route through it.
With a derper, the hub does not forward between the veths: the agents reach the services but
never each other, so every packet between them goes through the DERP relay. Without one, the hub
forwards and the agents talk directly. Every name the run makes starts with
``nademo-<pid>-`` and is written to the run's :class:`~nodeagent.demo.leftovers.Record` before
it exists. ``nodeagent web`` (``--web``) is the one process outside the namespaces: it serves
the laptop's page on the host's loopback and reaches the agent through its socket file; the
record lists its pid as soon as it has one (and it gets SIGTERM if the demo dies first).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nodeagent.demo.leftovers import PREFIX, Record, remove_namespace
from nodeagent.errors import UserError

T = TypeVar("T")

HUB_IP = "198.18.77.1"
CONTROL_PORT = 8080
DERP_PORT = 443
STUN_PORT = 3478
REGION_ID = 900
REGION_CODE = "demo"
WEB_PORT = 8088  # nodeagent web's own default; another free port when it is taken
TUN_DEV = "/dev/net/tun"
_PR_SET_PDEATHSIG = 1
_WEB_URL = re.compile(r"serving (http://\S+)")


class DemoError(UserError):
    """The demo could not go on; one line saying which step and why."""


def nodeagent_argv() -> list[str]:
    """How the demo runs ``nodeagent`` itself: this interpreter, this installation."""
    return [sys.executable, "-m", "nodeagent.cli.main"]


def nodeagent_shown() -> str:
    """How to write ``nodeagent`` in a command printed for the user to type."""
    found = shutil.which("nodeagent")
    beside = os.path.join(os.path.dirname(sys.executable), "nodeagent")
    if found and os.path.realpath(found) == os.path.realpath(beside):
        return "nodeagent"
    if os.access(beside, os.X_OK):
        return beside
    return found or "nodeagent"


def missing_requirement() -> str | None:
    """What keeps the demo from running here (one line), or None."""
    if os.geteuid() != 0:
        return ("demo needs root: it creates network namespaces and TUN devices "
                "(run it with sudo, or as root)")
    if shutil.which("ip") is None:
        return "demo needs the 'ip' tool from iproute2 (apt-get install iproute2)"
    if not os.path.exists("/proc/self/ns/net"):
        return "demo needs network namespaces: this kernel has none (/proc/self/ns/net)"
    if (why := tun_unusable()) is not None:
        return f"demo needs TUN devices: {why}"
    return None


def tun_unusable() -> str | None:
    """Why this process cannot open TUN devices (one line naming the device file), or None.
    Checked without creating a device (``tests/netns.py`` asks this too)."""
    if not os.path.exists(TUN_DEV):
        return f"{TUN_DEV} does not exist"
    try:
        os.close(os.open(TUN_DEV, os.O_RDWR))
    except OSError as e:
        return f"cannot open {TUN_DEV}: {e.strerror}"
    return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def wait_until(cond: Callable[[], T], timeout: float, what: str,
               check: Callable[[], None] | None = None) -> T:
    """Poll ``cond`` every 0.1 s until it returns something true; ``check`` may raise first
    (a process that died). DemoError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Proc:
    name: str
    ns: str | None  # None: the root namespace
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 600) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        return (lines[-1] if lines else "")[-n:]

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise DemoError(f"{self.name} exited with status {self.popen.returncode}: "
                            f"{self.tail()} (log {self.log})")


class Lab:
    """One run's namespaces, temp dir and processes; ``close()`` removes all of them."""

    def __init__(self, rec: Record) -> None:
        self.rec = rec
        self.pid = os.getpid()
        self.procs: list[Proc] = []
        self.links: dict[str, tuple[str, str]] = {}  # agent name → (hub side, agent side) IPs
        d = tempfile.mkdtemp(prefix=f"{PREFIX}{self.pid}-")
        rec.add_dir(d)
        self.dir = Path(d)
        self.env = dict(os.environ)
        for k in ("no_proxy", "NO_PROXY"):  # the lab's addresses are never behind a proxy
            self.env[k] = ",".join(x for x in (os.environ.get(k), "198.18.0.0/15", HUB_IP) if x)

    # --- names and commands ------------------------------------------------------------------

    def ns(self, role: str) -> str:
        return f"{PREFIX}{self.pid}-{role}"

    @property
    def hub(self) -> str:
        return self.ns("hub")

    def _ip(self, *args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise DemoError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")

    def run(self, ns: str, argv: list[str],
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argv`` inside ``ns``, output captured as text."""
        try:
            return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True,
                                  text=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired:
            raise DemoError(f"{' '.join(argv[:6])} in {ns} took longer than {timeout:g}s") from None

    def start(self, name: str, ns: str | None, argv: list[str], cwd: Path | None = None) -> Proc:
        """``argv`` inside ``ns`` (None: here, in the root namespace, and listed in the record),
        output to ``<name>.log``."""
        log = self.dir / f"{name}.log"
        cmd = argv if ns is None else ["ip", "netns", "exec", ns, *argv]
        with open(log, "ab") as f:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f,
                                     stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        if ns is None:  # removing the namespaces would not stop it
            self.rec.add_process(popen.pid)
        p = Proc(name, ns, popen, log)
        self.procs.append(p)
        return p

    # --- the network -------------------------------------------------------------------------

    def _new_ns(self, role: str) -> str:
        name = self.ns(role)
        self.rec.add_namespace(name)  # written down before it exists
        self._ip("netns", "add", name)
        self._ip("-n", name, "link", "set", "lo", "up")
        return name

    def build(self, agents: list[str], *, forward: bool) -> None:
        """The hub and one namespace per agent; ``forward``: may the agents reach each other
        directly (through the hub)?"""
        hub = self._new_ns("hub")
        self._ip("-n", hub, "addr", "add", f"{HUB_IP}/32", "dev", "lo")
        for i, name in enumerate(agents):
            ns = self._new_ns(name)
            net = f"198.18.{78 + i}"
            hub_ip, agent_ip = f"{net}.1", f"{net}.2"
            self._ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
                     f"to-{name}"[:15], "netns", hub)
            self._ip("-n", ns, "addr", "add", f"{agent_ip}/24", "dev", "eth0")
            self._ip("-n", hub, "addr", "add", f"{hub_ip}/24", "dev", f"to-{name}"[:15])
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", hub, "link", "set", f"to-{name}"[:15], "up")
            self._ip("-n", ns, "route", "add", "default", "via", hub_ip)
            self.links[name] = (hub_ip, agent_ip)
        if forward:
            from nodeagent.tundev.netconf import call_in_netns

            def enable() -> None:
                with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                    f.write("1")

            call_in_netns(hub, enable, timeout=10)

    # --- the processes -----------------------------------------------------------------------

    def start_control(self, policy: str) -> tuple[Proc, Path]:
        d = self.dir / "control"
        (d / "state").mkdir(parents=True)
        (d / "policy.hujson").write_text(policy)
        # Started in its directory with a relative policy path: explanations cite the short
        # "policy.hujson:LINE".
        p = self.start("control", self.hub, [
            *nodeagent_argv(), "control", "serve", "--listen", f"{HUB_IP}:{CONTROL_PORT}",
            "--state-dir", str(d / "state"), "--policy", "policy.hujson"], cwd=d)
        wait_until(lambda: (d / "state" / "control-url").exists()
                   and (d / "state" / "admin-token").exists(), 60,
                   "the control server to start", p.check)
        return p, d / "state"

    def admin(self, fn: Callable[[Any], T]) -> T:
        """``fn(AdminClient)`` from inside the hub (where the control server listens)."""
        from nodeagent.control.admin import AdminClient, AdminClientError
        from nodeagent.tundev.netconf import call_in_netns

        def call() -> T:
            return fn(AdminClient.from_state_dir(self.dir / "control" / "state"))

        try:
            return call_in_netns(self.hub, call, timeout=40)
        except AdminClientError as e:
            raise DemoError(f"control server: {e}") from None

    def start_derper(self) -> tuple[Proc, str]:
        """The derper on ``HUB_IP`` with a self-signed certificate; returns it and the DERP map
        ``CertName`` pinning that certificate (``sha256-raw:<hex>``)."""
        d = self.dir / "derper"
        certs = d / "certs"
        certs.mkdir(parents=True)
        p = self.start("derper", self.hub, [
            *nodeagent_argv(), "derper", "--certmode", "manual", "--hostname", HUB_IP,
            "--certdir", str(certs), "-a", f"{HUB_IP}:{DERP_PORT}", "--stun-port",
            str(STUN_PORT), "--http-port", "-1", "-c", str(d / "derper.key")])
        crt = certs / f"{HUB_IP}.crt"

        def serving() -> bool:
            if not crt.exists():
                return False
            from nodeagent.tundev.netconf import call_in_netns

            def connect() -> bool:
                import socket

                try:
                    with socket.create_connection((HUB_IP, DERP_PORT), timeout=1):
                        return True
                except OSError:
                    return False

            return call_in_netns(self.hub, connect, timeout=10)

        wait_until(serving, 60, "the derper to start", p.check)
        der = ssl.PEM_cert_to_DER_cert(crt.read_text())
        return p, "sha256-raw:" + hashlib.sha256(der).hexdigest()

    def agent_paths(self, name: str) -> tuple[str, str]:
        """(LocalAPI socket, state dir) of agent ``name``."""
        d = self.dir / name
        return str(d / "na.sock"), str(d / "state")

    def start_agent(self, name: str, login_server: str, auth_key: str) -> Proc:
        sock, state = self.agent_paths(name)
        os.makedirs(os.path.dirname(sock), exist_ok=True)
        return self.start(name, self.ns(name), [
            *nodeagent_argv(), "up", "--socket", sock, "--state-dir", state, "--tun", "na0",
            "--hostname", name, "--login-server", login_server, "--auth-key", auth_key])

    def start_tcp_server(self, name: str, ports: list[int]) -> Proc:
        p = self.start(f"tcp-server-{name}", self.ns(name), [
            sys.executable, "-m", "nodeagent.demo.tcpserver", name, *map(str, ports)])
        wait_until(lambda: "listening" in p.tail(), 30, f"the TCP server on {name}", p.check)
        return p

    def start_web(self, name: str) -> tuple[Proc, str]:
        """``nodeagent web`` for agent ``name``, here in the root namespace (its LocalAPI socket
        is a file) on 127.0.0.1, where a browser on this machine reaches it: on
        :data:`WEB_PORT`, or a free port when that is taken. Returns it and its URL."""
        sock = self.agent_paths(name)[0]
        for port in (WEB_PORT, 0):
            p = self.start(f"web-{name}-{port}", None, [
                *nodeagent_argv(), "web", "--listen", "127.0.0.1", "--port", str(port),
                "--socket", sock])

            def started(p: Proc = p) -> tuple[str] | None:
                """(its URL,) once it serves, ("",) when it exited, None meanwhile."""
                with contextlib.suppress(OSError):
                    if m := _WEB_URL.search(p.log.read_text(errors="replace")):
                        return (m.group(1),)
                return ("",) if p.popen.poll() is not None else None

            (got,) = wait_until(started, 30, f"nodeagent web for {name}")
            if got:
                return p, got
            if port == 0 or "cannot listen" not in p.tail():
                p.check()
        raise DemoError(f"nodeagent web for {name} did not start (log {p.log})")

    # --- teardown ----------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop the processes (SIGTERM, SIGKILL after 5 s), remove the namespaces (with their
        links and TUN devices), the temp dir and the state file."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(OSError):
                    p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(0.0, deadline - time.monotonic()))
            if p.popen.poll() is None:
                p.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(5)
        for ns in reversed(self.rec.namespaces):
            remove_namespace(ns)
        return self.rec.remove_all()
