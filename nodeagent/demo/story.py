"""The demo's scenario: build the tailnet, then show a ping, a permitted connection, a refused
one that fails at once, and where to read why — on both nodes (``debug rejects --explain``),
over c2n, and the policy's own answer from control (``control explain``); with ``--web``, the
live page of the laptop's rejections until Ctrl-C.

Owns what the demo prints. Each build step prints one progress line; each part of the story a
heading, the command a person would type (``$ ...``) and its output. Everything made is removed
at the end, on Ctrl-C or SIGTERM, and on any error (``Lab.close``).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from nodeagent.demo.lab import (
    CONTROL_PORT,
    DERP_PORT,
    HUB_IP,
    REGION_CODE,
    REGION_ID,
    STUN_PORT,
    DemoError,
    Lab,
    nodeagent_argv,
    nodeagent_shown,
    wait_until,
)
from nodeagent.demo.leftovers import Record, clean_dead_runs

CLIENT, SERVER = "laptop", "server"
ALLOWED_PORT, BLOCKED_PORT = 8080, 22
FAST = 1.0  # seconds: a refused connect() slower than this did not fail fast

POLICY_HEAD = f"""// The demo tailnet's policy (HuJSON: JSON with comments and trailing commas).
{{
  "acls": [
    // {CLIENT} may open port {ALLOWED_PORT} on {SERVER}, and nothing else there: port
    // {BLOCKED_PORT} is refused. (ICMP needs no port: pings to {SERVER} pass too.)
    {{"action": "accept", "src": ["{CLIENT}"], "dst": ["{SERVER}:{ALLOWED_PORT}"]}},
    // {SERVER} may reach {CLIENT} on every port.
    {{"action": "accept", "src": ["{SERVER}"], "dst": ["{CLIENT}:*"]}},
  ],
  // Every node records the connections it refuses or sees refused: `nodeagent debug rejects`.
  "nodeAttrs": [{{"target": ["*"], "attr": ["debug-conn-reject"]}}],
"""


def policy_text(cert_name: str | None) -> str:
    """The demo policy; with ``cert_name``, a DERP map of the one relay on the hub."""
    if cert_name is None:
        return POLICY_HEAD + "}\n"
    node = {"Name": f"{REGION_ID}a", "RegionID": REGION_ID, "HostName": HUB_IP, "IPv4": HUB_IP,
            "IPv6": "none", "DERPPort": DERP_PORT, "STUNPort": STUN_PORT,
            "CertName": cert_name}
    dm = {"Regions": {str(REGION_ID): {"RegionID": REGION_ID, "RegionCode": REGION_CODE,
                                       "RegionName": "nodeagent demo", "Nodes": [node]}},
          "omitDefaultRegions": True}
    return (POLICY_HEAD + "  // One DERP region: the relay on the hub (its self-signed certificate "
            "pinned by CertName).\n  \"derpMap\": " + json.dumps(dm) + ",\n}\n")


def features() -> set[str]:
    from nodeagent.ipnext.feature import discover

    return {inst.feature.name for inst in discover()}


class Story:
    def __init__(self, lab: Lab, write: Callable[[str], None],
                 begin: Callable[[str], None]) -> None:
        self.lab = lab
        self.write = write  # a whole line
        self.begin = begin  # the start of a line that write() ends
        self.na = nodeagent_shown()
        self.ips: dict[str, str] = {}
        self.step = 0

    # --- output ------------------------------------------------------------------------------

    def progress(self, what: str, fn: Callable[[], Any]) -> Any:
        self.step += 1
        t0 = time.monotonic()
        self.begin(f"[{self.step}] {what} ... ")
        try:
            v = fn()
        except BaseException:
            self.write("failed")
            raise
        self.write(f"ok ({time.monotonic() - t0:.1f}s)")
        return v

    def heading(self, text: str) -> None:
        self.write("")
        self.write(f"== {text} ==")

    def sock(self, name: str) -> str:
        return self.lab.agent_paths(name)[0]

    def cli(self, name: str, *args: str, show: bool = True) -> str:
        """``nodeagent ARGS --socket <name's socket>``; printed and its output shown."""
        shown = f"{self.na} {' '.join(args)} --socket {self.sock(name)}"
        r = self.lab.run(self.lab.ns(name), [*nodeagent_argv(), *args, "--socket",
                                             self.sock(name)], timeout=60)
        out = (r.stdout + r.stderr).rstrip()
        if show:
            self.write(f"$ {shown}")
            for ln in out.splitlines():
                self.write(f"  {ln}")
        return out

    # --- building ----------------------------------------------------------------------------

    def build(self, derp: bool) -> None:
        lab = self.lab
        self.progress(f"network namespaces {lab.ns('{hub,' + CLIENT + ',' + SERVER + '}')}"
                      + ("" if derp else " (the hub forwards: direct path)"),
                      lambda: lab.build([CLIENT, SERVER], forward=not derp))
        cert_name = None
        if derp:
            _, cert_name = self.progress(
                f"DERP relay (feature derper) on {HUB_IP}:{DERP_PORT}, STUN :{STUN_PORT}; no "
                f"route between {CLIENT} and {SERVER}: they meet only through it",
                lab.start_derper)
        elif "derper" in features():
            self.write("--direct: no relay, the agents talk directly")
        else:
            self.write("feature derper is not installed: no relay, the agents talk directly "
                       "(pip install ./features/derper for the relayed story)")
        policy = policy_text(cert_name)
        self.progress(f"coordination server on http://{HUB_IP}:{CONTROL_PORT} (SQLite in "
                      f"{lab.dir / 'control' / 'state'})", lambda: lab.start_control(policy))
        key = self.progress("reusable auth key",
                            lambda: lab.admin(lambda c: c.create_authkey(reusable=True))["key"])
        url = f"http://{HUB_IP}:{CONTROL_PORT}"
        for name in (CLIENT, SERVER):
            self.progress(f"agent {name} (nodeagent up --tun na0 in {lab.ns(name)})",
                          lambda name=name: self._agent(name, url, key))
        self.progress(f"{CLIENT} and {SERVER} see each other"
                      + (f" (home DERP region {REGION_CODE})" if derp else ""),
                      lambda: self._meet(derp))
        self.progress(f"TCP service on {SERVER} ports {ALLOWED_PORT} and {BLOCKED_PORT}",
                      lambda: lab.start_tcp_server(SERVER, [ALLOWED_PORT, BLOCKED_PORT]))

    def _agent(self, name: str, url: str, key: str) -> None:
        from nodeagent.localapi.client import LocalAPIClient, LocalAPIError

        p = self.lab.start_agent(name, url, key)
        client = LocalAPIClient(self.sock(name), timeout=5)

        def running() -> bool:
            try:
                st = client.get("status")
            except (LocalAPIError, OSError):
                return False
            ips = (st.get("Self") or {}).get("TailscaleIPs") or []
            if st.get("BackendState") == "Running" and ips:
                self.ips[name] = ips[0]
                return True
            return False

        wait_until(running, 90, f"agent {name} to log in", p.check)

    def status(self, name: str) -> dict[str, Any]:
        from nodeagent.localapi.client import LocalAPIClient

        return LocalAPIClient(self.sock(name), timeout=5).get("status")

    def _meet(self, derp: bool) -> None:
        def met() -> bool:
            for me, other in ((CLIENT, SERVER), (SERVER, CLIENT)):
                peers = [p for p in (self.status(me).get("Peer") or {}).values()
                         if p.get("HostName") == other]
                if not peers or not peers[0].get("Online"):
                    return False
                if derp and peers[0].get("Relay") != REGION_CODE:
                    return False
            return True

        procs = [p for p in self.lab.procs if p.name in (CLIENT, SERVER)]
        wait_until(met, 60, f"{CLIENT} and {SERVER} to see each other",
                   lambda: [p.check() for p in procs] and None)

    # --- the story ---------------------------------------------------------------------------

    def tell(self, derp: bool, has_connreject: bool) -> dict[str, Any]:
        lab, srv_ip = self.lab, self.ips[SERVER]
        result: dict[str, Any] = {}
        self.heading(f"1. ping over the tailnet: {CLIENT} → {SERVER} ({srv_ip})")
        via = "DERP" if derp else "a direct path"
        self.write(f"# disco pings through the agent show the path: {via}")
        args = ["ping", "-c", "2", "--until-direct", "false", SERVER]
        wait_until(lambda: "pong from" in self.cli(CLIENT, *args, show=False), 60,
                   f"a pong from {SERVER}")
        self.cli(CLIENT, *args)
        r = lab.run(lab.ns(CLIENT), ["ping", "-c", "2", "-W", "2", srv_ip], timeout=30)
        if r.returncode != 127 and (r.stdout or r.returncode == 0):
            self.write(f"$ ip netns exec {lab.ns(CLIENT)} ping -c 2 {srv_ip}")
            for ln in r.stdout.rstrip().splitlines():
                if ln.strip() and "statistics" not in ln and not ln.startswith("rtt"):
                    self.write(f"  {ln}")
        self.cli(CLIENT, "status")

        self.heading(f"2. a permitted connection: {CLIENT} → {SERVER}:{ALLOWED_PORT}")
        outcome, took, said = self._connect(srv_ip, ALLOWED_PORT)
        result["allowed"] = (outcome, took)
        if outcome == "connected":
            self.write(f"permitted: connected in {took * 1000:.1f} ms; {SERVER} said {said!r}")
        else:
            self.write(f"permitted: FAILED ({outcome} after {took * 1000:.0f} ms)")

        self.heading(f"3. a blocked connection: {CLIENT} → {SERVER}:{BLOCKED_PORT} "
                     "(a service listens there; the policy refuses it)")
        outcome, took, _ = self._connect(srv_ip, BLOCKED_PORT)
        result["blocked"] = (outcome, took)
        if outcome == "refused" and took < FAST:
            self.write(f"blocked: connect() refused after {took * 1000:.1f} ms — {SERVER}'s "
                       "agent dropped the SYN (policy) and answered with a TSMP reject, so "
                       f"{CLIENT}'s agent failed the connect() at once instead of letting it "
                       "retry for a minute or more")
        else:
            self.write(f"blocked: connect() gave {outcome!r} after {took * 1000:.0f} ms "
                       "(expected a refusal within a second)")

        if not has_connreject:
            from nodeagent.ipnext.known import not_installed_message

            self.heading("4. why? nodeagent debug rejects")
            self.write(f"no rejection diagnostics: {not_installed_message('connreject')}")
            return result
        self.heading(f"4. why? nodeagent debug rejects --explain on {CLIENT} (the refused side)")
        self._wait_rejects(CLIENT, "Outgoing")
        result["client_rejects"] = self.cli(CLIENT, "debug", "rejects", "--explain")
        self.heading(f"5. ... and on {SERVER} (the refusing side)")
        self._wait_rejects(SERVER, "Incoming")
        result["server_rejects"] = self.cli(SERVER, "debug", "rejects", "--explain")
        self.heading(f"6. the same from the coordination server: a c2n request to {SERVER}")
        status, _, body = self.hub_cli("control", "c2n", SERVER, "GET",
                                       "/debug/rejects").partition("\n")
        self.write(f"  {status}")
        try:
            lines = json_lines(json.loads(body))
        except ValueError:
            lines = body.rstrip().splitlines()
        for ln in lines:
            self.write(f"  {ln}")
        result["c2n"] = status
        self.heading(f"7. the policy's answer, from the coordination server: its lines on "
                     f"{CLIENT} → {SERVER}:{BLOCKED_PORT} and the entry that would allow it")
        self.write(f"# policy.hujson is {lab.dir / 'control' / 'policy.hujson'}")
        out = self.hub_cli("control", "explain", CLIENT, f"{SERVER}:{BLOCKED_PORT}")
        for ln in out.splitlines():
            self.write(f"  {ln}")
        result["explain"] = out
        return result

    def hub_cli(self, *args: str) -> str:
        """``nodeagent ARGS --state-dir <control's>`` inside the hub; the command printed, its
        output returned."""
        lab = self.lab
        state = lab.dir / "control" / "state"
        self.write(f"$ ip netns exec {lab.hub} {self.na} {' '.join(args)} --state-dir {state}")
        r = lab.run(lab.hub, [*nodeagent_argv(), *args, "--state-dir", str(state)])
        return (r.stdout + r.stderr).rstrip()

    def _connect(self, ip: str, port: int) -> tuple[str, float, str]:
        from nodeagent.tundev.netconf import call_in_netns

        def attempt() -> tuple[str, float, str]:
            t0 = time.monotonic()
            try:
                with socket.create_connection((ip, port), timeout=10) as s:
                    took = time.monotonic() - t0
                    s.settimeout(5)
                    said = s.recv(200).decode(errors="replace").strip()
                    return "connected", took, said
            except ConnectionRefusedError:
                return "refused", time.monotonic() - t0, ""
            except TimeoutError:
                return "timeout", time.monotonic() - t0, ""
            except OSError as e:
                return e.strerror or str(e), time.monotonic() - t0, ""

        return call_in_netns(self.lab.ns(CLIENT), attempt, timeout=30)

    def _wait_rejects(self, name: str, direction: str) -> None:
        from nodeagent.localapi.client import LocalAPIClient, LocalAPIError

        client = LocalAPIClient(self.sock(name), timeout=5)

        def recorded() -> bool:
            try:
                return bool(client.get("debug-rejects").get(direction))
            except (LocalAPIError, OSError):
                return False

        try:
            wait_until(recorded, 10, f"{name} to record the refusal")
        except DemoError:
            pass  # the table printed next says what there is

    def explore(self) -> None:
        lab, na = self.lab, self.nodeagent_in
        self.heading("explore")
        for name in (CLIENT, SERVER):
            self.write(f"{name}:  {na(name)} status --socket {self.sock(name)}")
        self.write(f"watch:   {na(CLIENT)} debug rejects --watch --explain --socket "
                   f"{self.sock(CLIENT)}")
        self.write(f"connect: ip netns exec {lab.ns(CLIENT)} bash -c 'echo > "
                   f"/dev/tcp/{self.ips[SERVER]}/{BLOCKED_PORT}'")
        self.write(f"ping:    {na(CLIENT)} ping {SERVER} --socket {self.sock(CLIENT)}")
        state = lab.dir / "control" / "state"
        self.write(f"control: ip netns exec {lab.hub} {self.na} control nodes --state-dir "
                   f"{state}")
        self.write(f"policy:  {lab.dir / 'control' / 'policy.hujson'} (edit it, then: ip netns "
                   f"exec {lab.hub} {self.na} control policy set FILE --state-dir {state})")
        self.write(f"logs:    {lab.dir}/*.log")

    def nodeagent_in(self, name: str) -> str:
        return f"ip netns exec {self.lab.ns(name)} {self.na}"

    def live(self) -> str:
        """Start ``nodeagent web`` for the laptop; print where to open it. Returns the URL."""
        self.heading(f"live view: {CLIENT}'s rejections in a browser")
        _, url = self.lab.start_web(CLIENT)
        self.write(f"$ {self.na} web --port {urlsplit(url).port} --socket {self.sock(CLIENT)}")
        self.write(f"open {url} in a browser on this machine; connect again ('connect:' above) "
                   "and watch the row count up")
        return url


def json_lines(doc: Any) -> list[str]:
    """JSON of ``doc``, short: one line per top-level key, one per item of a list value."""
    if not isinstance(doc, dict) or not doc:
        return [json.dumps(doc)]
    out = ["{"]
    for i, (k, v) in enumerate(doc.items()):
        end = "," if i < len(doc) - 1 else ""
        if isinstance(v, list) and v:
            out.append(f"  {json.dumps(k)}: [")
            out += [f"    {json.dumps(x)}" + ("," if j < len(v) - 1 else "")
                    for j, x in enumerate(v)]
            out.append(f"  ]{end}")
        else:
            out.append(f"  {json.dumps(k)}: {json.dumps(v)}{end}")
    return [*out, "}"]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(keep: bool, write: Callable[[str], None], begin: Callable[[str], None], *,
        direct: bool = False, web: bool = False) -> int:
    """The whole demo; returns the exit status (0: the story went as told). ``write`` prints a
    line, ``begin`` the start of a progress line. ``web`` (with connreject) serves the live page
    and keeps running until Ctrl-C."""
    gone = clean_dead_runs()
    if gone:
        write(f"removed what an earlier demo run left: {', '.join(gone)}")
    installed = features()
    derp = "derper" in installed and not direct
    has_connreject = "connreject" in installed
    # Ctrl-C, SIGTERM and SIGHUP all end the run through the cleanup below (installed even
    # where SIGINT came in ignored, as in a background job: --keep waits for it).
    old = {s: signal.signal(s, _raise_interrupt)
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    rec = Record.create()
    lab = None
    try:
        lab = Lab(rec)
        write(f"nodeagent demo: a tailnet of two nodes on this machine (run {rec.pid}, temp dir "
              f"{lab.dir})")
        if web and not has_connreject:
            from nodeagent.ipnext.known import not_installed_message

            write(f"--web: no live view: {not_installed_message('connreject')}")
            web = False
        story = Story(lab, write, begin)
        story.build(derp)
        result = story.tell(derp, has_connreject)
        ok = (result["allowed"][0] == "connected" and result["blocked"][0] == "refused"
              and result["blocked"][1] < FAST)
        story.explore()
        if web:
            story.live()
            keep = True
        if keep:
            try:  # a Ctrl-C right after the line below still ends the run as asked (status 0)
                write("")
                write("running until Ctrl-C (everything above is removed then)")
                while True:
                    signal.pause()
            except KeyboardInterrupt:
                write("")
        return 0 if ok else 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        if lab is not None:
            lab.close()
        else:
            rec.remove_all()
        write("removed the demo's namespaces, processes and temp files")
        for s, h in old.items():
            signal.signal(s, h)
