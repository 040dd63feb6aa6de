"""A small tailnet of real processes for LocalAPI compatibility tests: ``nodeagent control
serve`` and two ``nodeagent up --login-server`` agents (``n1``, ``n2``) in two network
namespaces joined by a veth pair. Control listens on n1's side of the link; both agents reach it.

``mini_tailnet()`` is a context manager yielding a :class:`MiniTailnet` whose agents are logged in
and see each other; everything (processes, namespaces, temp dir) is removed on exit. Use it from a
module-scoped fixture: one tailnet per test module.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.agentutil import nodeagent_cmd, public_tempdir
from tests.netns import create_netns, popen_in_netns, remove_netns, run_in_netns, veth_pair
from tests.procutil import stop

TAILSCALE_CLI = Path(__file__).resolve().parents[2] / "shared/tools/tailscale/tailscale"
LINK = "198.18.7"  # underlay /24 of the veth link (only inside the two namespaces)


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``cond`` (the demo's loop: ``nodeagent.demo.lab.wait_until``) until it returns
    something true; AssertionError after ``timeout`` s naming ``what``."""
    from nodeagent.demo.lab import DemoError, wait_until

    try:
        return wait_until(cond, timeout, what)
    except DemoError as e:
        raise AssertionError(str(e)) from None


def _answers(sock: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(sock)
            return True
        except OSError:
            return False


@dataclass
class MiniAgent:
    name: str
    ns: str
    dir: str
    proc: subprocess.Popen[Any] | None = None

    @property
    def sock(self) -> str:
        return os.path.join(self.dir, "na.sock")

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "agent.log")) as f:
            return f.read()[-3000:]
        return ""

    def nodeagent(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Our CLI against this agent."""
        return subprocess.run([*nodeagent_cmd(), *args, "--socket", self.sock],
                              capture_output=True, text=True, timeout=timeout)

    def tailscale(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Tailscale's real CLI against this agent's LocalAPI socket."""
        return subprocess.run([str(TAILSCALE_CLI), f"--socket={self.sock}", *args],
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict[str, Any]:
        r = self.nodeagent("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)  # type: ignore[no-any-return]


@dataclass
class MiniTailnet:
    dir: str
    url: str
    agents: dict[str, MiniAgent] = field(default_factory=dict)
    control: subprocess.Popen[Any] | None = None
    key: str = ""
    ns: str = ""  # the namespace control listens in (n1's)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``nodeagent control ...`` (admin commands) from inside control's namespace."""
        return run_in_netns(self.ns, [*nodeagent_cmd(), "control", *args, "--state-dir",
                                      os.path.join(self.dir, "control")], timeout=30)


def start_agent(a: MiniAgent, url: str, key: str, timeout: float = 30) -> None:
    """``nodeagent up`` for ``a`` in its namespace, logging in to ``url`` with ``key``; returns
    once its LocalAPI answers (``a.proc`` is set first, so the caller's cleanup stops it)."""
    with open(os.path.join(a.dir, "agent.log"), "a") as logf:
        a.proc = popen_in_netns(a.ns, [*nodeagent_cmd(), "up", "--socket", a.sock,
                                       "--state-dir", os.path.join(a.dir, "state"), "--tun",
                                       "na0", "--hostname", a.name, "--login-server", url,
                                       "--auth-key", key],
                                stdout=logf, stderr=subprocess.STDOUT)
    proc = a.proc
    try:
        wait(lambda: proc.poll() is not None or _answers(a.sock), timeout, f"{a.name} LocalAPI")
        assert proc.poll() is None, f"agent {a.name} exited with {proc.returncode}"
    except AssertionError as e:
        raise AssertionError(f"{e}; the end of its log:\n{a.log_tail()}") from None


def _sees_peers(a: MiniAgent, n: int) -> bool:
    st = a.status()
    return st["BackendState"] == "Running" and len(st.get("Peer") or {}) == n and all(
        p["Online"] for p in st["Peer"].values())


@contextlib.contextmanager
def mini_tailnet() -> Iterator[MiniTailnet]:
    d = public_tempdir("na-mini-")
    made: list[str] = []
    t = MiniTailnet(d, "")
    try:
        for name in ("n1", "n2"):
            made.append(create_netns(f"nam{name}"))
        veth_pair(made[0], made[1], f"{LINK}.1/24", f"{LINK}.2/24")
        port = 20000 + secrets.randbelow(5000)
        t.url = f"http://{LINK}.1:{port}"
        t.ns = made[0]
        cdir = os.path.join(d, "control")
        os.makedirs(cdir)
        with open(os.path.join(d, "control.log"), "a") as logf:
            t.control = popen_in_netns(made[0], [*nodeagent_cmd(), "control", "serve",
                                                 "--listen", f"{LINK}.1:{port}",
                                                 "--state-dir", cdir, "--keepalive", "1"],
                                       stdout=logf, stderr=subprocess.STDOUT)
        control = t.control
        wait(lambda: control.poll() is not None
             or os.path.exists(os.path.join(cdir, "control-url")), 30, "control server")
        assert control.poll() is None, open(os.path.join(d, "control.log")).read()[-3000:]
        r = wait(lambda: (x := t.ctl("authkey", "create", "--reusable")).returncode == 0 and x,
                 30, "an auth key")
        t.key = r.stdout.strip().splitlines()[-1]
        for name, ns in zip(("n1", "n2"), made, strict=True):
            ad = os.path.join(d, name)
            os.makedirs(ad)
            t.agents[name] = MiniAgent(name, ns, ad)
            start_agent(t.agents[name], t.url, t.key)
        for a in t.agents.values():
            try:
                wait(lambda a=a: _sees_peers(a, 1), 40, f"{a.name} running with its peer online")
            except AssertionError as e:
                raise AssertionError(f"{e}; the end of its log:\n{a.log_tail()}") from None
        yield t
    finally:
        for a in t.agents.values():
            stop(a.proc)
        stop(t.control)
        for ns in made:
            remove_netns(ns)
        subprocess.run(["rm", "-rf", d], check=False)
