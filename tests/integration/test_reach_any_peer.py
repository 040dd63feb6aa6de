"""End-to-end tests of issue "Reach any peer", items 6 and 7, in simulated networks.

Each test builds its own :class:`tests.natlab.NatLab`: a public segment holding ``nodeagent
control serve`` and TLS derpers with STUN (self-signed certificates, DERP map nodes
``InsecureForTests`` with their ``IPv4``/``DERPPort``/``STUNPort``), and home routers with a LAN
namespace behind each running ``nodeagent up``. The lab (processes, namespaces, nft tables, temp
dir) is torn down whatever happens.

Item 6 — the agent's path layer:

- direct UDP between the routers dropped: ping and a 10 MB TCP transfer work via DERP, status
  shows ``Relay``;
- easy NAT on both routers: the path upgrades to direct within 5 s of the first traffic, status
  shows ``CurAddr``, ``nodeagent ping`` says ``via IP:port``;
- hard NAT on one side: netcheck reports ``MappingVariesByDestIP: true`` (two regions), traffic
  works via DERP and stays there;
- failover: a TCP transfer running on the direct path goes on via DERP within 7 s of the path
  being blocked and completes intact; unblocked, the path returns to direct;
- an ACL-refused port between the NATed agents gives the connreject events on both sides;
- two regions with different latency: each agent makes the nearer its home.

Item 7 — real Tailscale on the other end: the relayed path through Tailscale's ``derper`` exactly
as through ours, and Tailscale's ``tailscale`` CLI (``--socket``, run in the agent's LAN
namespace) with ``ping``, ``netcheck``, ``debug derp`` and ``status`` against our LocalAPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.agentutil import metric
from tests.dataplane import connect, listening
from tests.derptls import TAILSCALE_CLI
from tests.natlab import (
    Agent,
    Control,
    NatLab,
    Router,
    natlab_missing,
    tailscale_derper_missing,
    wait_until,
)
from tests.netns import call_in_netns, in_netns
from tests.wgnet import ping as icmp

_missing = natlab_missing(tun=True)
pytestmark = [pytest.mark.integration, pytest.mark.feature("derper")]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

WG_PORT = 41641  # the agents' WireGuard port (easy NAT keeps it on the WAN side)
BLOB = 10 << 20
ALLOWED_PORT, REFUSED_PORT = 5001, 5000


def tailscale_cli_missing() -> str | None:
    if not os.access(TAILSCALE_CLI, os.X_OK):
        return f"Tailscale's CLI binary is missing: {TAILSCALE_CLI}"
    return None


# --- the tailnet in a lab ----------------------------------------------------------------------


@dataclass
class Net:
    lab: NatLab
    ctl: Control
    homes: dict[str, Router]
    agents: dict[str, Agent]
    ips: dict[str, str] = field(default_factory=dict)  # name → first Tailscale IP

    def status(self, name: str) -> dict[str, Any]:
        return self.agents[name].api("status")

    def peer(self, name: str, other: str) -> dict[str, Any]:
        """``other``'s entry in ``name``'s status."""
        for p in (self.status(name).get("Peer") or {}).values():
            if p["HostName"] == other:
                return p
        raise AssertionError(f"{name} has no peer {other}")

    def metrics(self, name: str) -> str:
        return str(self.agents[name].api("metrics"))

    def wan(self, name: str) -> str:
        """The direct address a peer sees for ``name`` behind easy NAT."""
        return f"{self.homes[name].wan_ip}:{WG_PORT}"

    def diagnostics(self) -> str:
        """Logs, status and metrics of every agent, for an assertion message."""
        out = []
        for n, ag in self.agents.items():
            try:
                st = json.dumps(self.status(n).get("Peer"), indent=1)
                mx = "\n".join(ln for ln in self.metrics(n).splitlines()
                               if ln.startswith(("nodeagent_magicsock", "nodeagent_derp_home")))
            except Exception as e:  # an agent that died still has a log
                st, mx = repr(e), ""
            out.append(f"--- {n} peers ---\n{st}\n--- {n} metrics ---\n{mx}\n"
                       f"--- {n} log ---\n{ag.log()[-3000:]}")
        return "\n".join(out)


Regions = tuple[tuple[str, float | None], ...]


def build(lab: NatLab, nats: dict[str, str], *, regions: Regions = (("r1", None),),
          policy: Callable[[NatLab], str] | None = None, derper: str = "ours",
          ports: tuple[int, int] = (443, 3478), block_udp: bool = False) -> Net:
    """Regions (code, added latency) with a derper each (``ours`` or ``tailscale``, on
    ``ports``: DERP, STUN), a home per ``nats`` entry (name → NAT mode), control with
    ``policy(lab)`` (default: all open, the running derpers), an agent per home; returns once
    every agent runs, sees the others and knows their endpoints."""
    for code, latency in regions:
        r = lab.add_region(code, latency_ms=latency)
        start = lab.start_tailscale_derper if derper == "tailscale" else lab.start_derper
        start(r, port=ports[0], stun_port=ports[1])
    homes = {n: lab.add_home(n, nat=m) for n, m in nats.items()}
    if block_udp:
        lab.block_direct_udp()
    ctl = lab.start_control(policy(lab) if policy is not None else None)
    key = ctl.authkey()
    agents = {n: lab.start_agent(h, ctl, auth_key=key, port=WG_PORT) for n, h in homes.items()}
    net = Net(lab, ctl, homes, agents)
    for n, ag in agents.items():
        net.ips[n] = ag.wait_running(30)["Self"]["TailscaleIPs"][0]
    for n in agents:
        for other in agents:
            if other != n:
                # the peer's advertised endpoints have reached us (its first netcheck is done)
                wait_until(lambda n=n, o=other: net.peer(n, o).get("Addrs"), 30,
                           f"{n} knows {other}'s endpoints")
    return net


def unresolvable_hostnames(lab: NatLab) -> str:
    """The open policy with the running derpers, each node's ``HostName`` a name that does not
    resolve (``derp-<code>.natlab.invalid``) and ``IPv6`` ``"none"``: only its ``IPv4`` field
    says where it is. (IPv6 disabled, nothing asks DNS: the lab has no resolver, whose lookups
    would take 0-5 s each; the unit tests cover a forced IPv4 beside a hanging lookup.)"""
    dm = lab.derp_map()
    for r in dm["Regions"].values():
        for n in r["Nodes"]:
            n["HostName"] = f"derp-{r['RegionCode']}.natlab.invalid"
            n["IPv6"] = "none"
    return json.dumps({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                       "derpMap": dm}, indent=2) + "\n"


def wait_for(net: Net, cond: Any, timeout: float, what: str) -> Any:
    try:
        return wait_until(cond, timeout, what)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{net.diagnostics()}") from None


class Pinger:
    """A background ``ping -D`` from ``ns``: traffic that keeps the path active, and the wall
    clock time of every echo reply (``replies``)."""

    def __init__(self, ns: str, ip: str, interval: float = 0.2, seconds: float = 90) -> None:
        self.replies: list[float] = []
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-D", "-n", "-i", str(interval), "-W", "1",
             "-w", str(int(seconds)), ip],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from ", line)
            if m:
                self.replies.append(float(m.group(1)))

    def first_reply_after(self, t: float) -> float | None:
        return next((r for r in self.replies if r > t), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self.thread.join(5)


@contextmanager
def pinging(ns: str, ip: str, interval: float = 0.2, seconds: float = 90) -> Iterator[Pinger]:
    pinger = Pinger(ns, ip, interval, seconds)
    try:
        yield pinger
    finally:
        pinger.stop()


def wait_ping(net: Net, src: str, dst: str, timeout: float = 20.0) -> None:
    ns, ip = net.agents[src].ns, net.ips[dst]
    wait_for(net, lambda: icmp(ns, ip, 1).returncode == 0, timeout, f"ICMP {src} → {dst}")


# --- TCP transfers through the tailnet ---------------------------------------------------------


class Sink:
    """A TCP server in a namespace: reads one connection to EOF, counting bytes as they come
    (``progress``: (monotonic time, total) after each read), and answers the SHA-256."""

    def __init__(self, ns: str, addr: str, port: int) -> None:
        with in_netns(ns):
            self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((addr, port))
        self.srv.listen(4)
        self.srv.settimeout(60)
        self.received = 0
        self.last_rx = 0.0
        self.digest = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
            with conn:
                conn.settimeout(90)
                h = hashlib.sha256()
                while chunk := conn.recv(1 << 16):
                    h.update(chunk)
                    self.received += len(chunk)
                    self.last_rx = time.monotonic()
                self.digest = h.digest()
                conn.sendall(self.digest)
        except BaseException as e:  # reported by the test
            self.error = e

    def close(self) -> None:
        self.srv.close()
        self.thread.join(5)


def send_paced(addr: str, port: int, blob: bytes, rate: float) -> bytes:
    """(In a namespace thread) send ``blob`` at about ``rate`` bytes/s (0: as fast as it goes),
    half-close, return the SHA-256 the sink answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(90)
        s.connect((addr, port))
        t0 = time.monotonic()
        step = 1 << 16
        for off in range(0, len(blob), step):
            s.sendall(blob[off:off + step])
            if rate:
                ahead = t0 + (off + step) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(64):
            out += chunk
        return out


def transfer(net: Net, src: str, dst: str, port: int, size: int = BLOB) -> float:
    """``size`` random bytes over TCP from ``src`` to ``dst``'s Tailscale IP; asserts the
    digest both ends agree on; returns the seconds it took."""
    blob = os.urandom(size)
    sink = Sink(net.agents[dst].ns, net.ips[dst], port)
    try:
        t0 = time.monotonic()
        digest = call_in_netns(net.agents[src].ns, send_paced, net.ips[dst], port, blob, 0,
                               timeout=120)
        took = time.monotonic() - t0
    finally:
        sink.close()
    assert sink.error is None, sink.error
    assert sink.received == size
    assert digest == sink.digest == hashlib.sha256(blob).digest()
    return took


# --- output checks ------------------------------------------------------------------------------


def pong_lines(out: str, name: str, ip: str) -> list[str]:
    """The ``via ...`` part of each ``pong from NAME (IP) via VIA in LATENCY`` line. Latency is
    ours ``12ms`` or Tailscale's Go duration rounded to ms (``0s`` under half a millisecond)."""
    pat = re.compile(rf"^pong from {re.escape(name)} \({re.escape(ip)}\) via (\S+) "
                     r"in (\d+ms|\d+(\.\d+)?s)$")
    return [m.group(1) for ln in out.splitlines() if (m := pat.match(ln))]


def tailscale(net: Net, name: str, *args: str, timeout: float = 60
              ) -> subprocess.CompletedProcess[str]:
    """Tailscale's CLI pointed at ``name``'s LocalAPI, run in its LAN namespace."""
    ag = net.agents[name]
    return net.lab.run(ag.ns, [str(TAILSCALE_CLI), f"--socket={ag.sock}", *args],
                       capture_output=True, text=True, timeout=timeout)


def netcheck_json(net: Net, name: str) -> dict[str, Any]:
    r = net.agents[name].cli("netcheck", "--format", "json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def direct_tx(net: Net, name: str) -> float:
    return metric(net.metrics(name), 'nodeagent_magicsock_tx_packets_total{path="direct"}')


def derp_tx(net: Net, name: str) -> float:
    return metric(net.metrics(name), 'nodeagent_magicsock_tx_packets_total{path="derp"}')


def derp_rx(net: Net, name: str) -> float:
    return metric(net.metrics(name), "nodeagent_magicsock_rx_derp_packets_total")


# --- item 6: the path layer in simulated networks ----------------------------------------------


def test_direct_udp_blocked_everything_goes_via_derp() -> None:
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "easy"}, block_udp=True)
        wait_ping(net, "a", "b")
        assert icmp(net.agents["b"].ns, net.ips["a"], 3).returncode == 0
        took = transfer(net, "a", "b", 5000)

        for me, other in (("a", "b"), ("b", "a")):
            p = net.peer(me, other)
            assert (p["Relay"], p["CurAddr"], p["Active"]) == ("r1", "", True), p
            assert direct_tx(net, me) == 0, net.diagnostics()
            assert derp_tx(net, me) > 0
            assert metric(net.metrics(me), "nodeagent_magicsock_path_switches_total") == 0
        assert net.peer("a", "b")["TxBytes"] > BLOB
        r = net.agents["a"].cli("ping", "-c", "2", "--until-direct", "false", "b")
        assert r.returncode == 0, r.stderr
        assert pong_lines(r.stdout, "b", net.ips["b"]) == ["DERP(r1)", "DERP(r1)"], r.stdout
        r = net.agents["a"].cli("ping", "-c", "2", "b")  # waits in vain for a direct pong
        assert r.returncode == 1 and "direct connection not established" in r.stderr
        print(f"10 MB via DERP in {took:.1f}s")


def test_easy_nat_both_sides_upgrades_to_direct_within_5s() -> None:
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "easy"})
        for me in ("a", "b"):
            assert direct_tx(net, me) == 0  # no traffic yet: nothing discovered
        t0 = time.monotonic()
        with pinging(net.agents["a"].ns, net.ips["b"]):
            wait_for(net, lambda: net.peer("a", "b")["CurAddr"] == net.wan("b")
                     and net.peer("b", "a")["CurAddr"] == net.wan("a"), 5.0,
                     "direct paths both ways within 5 s of the first ping")
            took = time.monotonic() - t0
            wait_for(net, lambda: net.peer("a", "b")["Active"], 5.0, "a active with b")
        r = net.agents["a"].cli("ping", "b")
        assert r.returncode == 0, r.stdout + r.stderr
        assert pong_lines(r.stdout, "b", net.ips["b"])[-1:] == [net.wan("b")], r.stdout
        direct0, derp0 = direct_tx(net, "b"), derp_tx(net, "b")
        assert transfer(net, "b", "a", 5000, 1 << 20) > 0
        # the 1 MB went direct only: a trusted path gets no DERP copies
        assert direct_tx(net, "b") - direct0 > 500 and derp_tx(net, "b") == derp0
        print(f"direct after {took:.2f}s")


def test_hard_nat_on_one_side_stays_on_derp() -> None:
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "hard"}, regions=(("r1", None), ("r2", None)))
        rep_b, rep_a = netcheck_json(net, "b"), netcheck_json(net, "a")
        assert rep_b["MappingVariesByDestIP"] is True, rep_b
        assert rep_b["GlobalV4"].split(":")[0] == net.homes["b"].wan_ip
        assert rep_a["MappingVariesByDestIP"] is False, rep_a
        assert rep_a["GlobalV4"].split(":")[0] == net.homes["a"].wan_ip
        if tailscale_cli_missing() is None:  # Tailscale's netcheck, from b's LAN host
            r = tailscale(net, "b", "netcheck")
            assert "\t* MappingVariesByDestIP: true\n" in r.stdout, r.stdout + r.stderr
        # b's agent found it too: with a fixed --port it also advertises WAN IP:that port
        # (magicsock.md §3), beside the STUN-mapped address and its LAN address
        wait_for(net, lambda: net.wan("b") in (net.status("b")["Self"]["Addrs"] or []), 10,
                 "b advertising its WAN address with its own port")

        wait_ping(net, "a", "b")
        with pinging(net.agents["b"].ns, net.ips["a"]):
            time.sleep(8)  # discovery rounds every 5 s: none may find a direct path
            assert transfer(net, "a", "b", 5000, 1 << 20) > 0
            for me, other in (("a", "b"), ("b", "a")):
                p = net.peer(me, other)
                assert p["CurAddr"] == "" and p["Relay"] in ("r1", "r2") and p["Active"], p
                assert direct_tx(net, me) == 0, net.diagnostics()
                # not for want of trying: both sides sent discovery pings and CallMeMaybe
                mx = net.metrics(me)
                assert metric(mx, "nodeagent_magicsock_path_switches_total") == 0
                assert metric(mx, 'nodeagent_magicsock_disco_total{kind="ping_sent"}') > 2
                assert metric(mx, 'nodeagent_magicsock_disco_total{kind="call_me_maybe_sent"}') \
                    + metric(mx, 'nodeagent_magicsock_disco_total{kind="call_me_maybe_received"}') \
                    > 0
        r = net.agents["b"].cli("ping", "-c", "2", "--until-direct", "false", "a")
        assert r.returncode == 0, r.stderr
        vias = pong_lines(r.stdout, "a", net.ips["a"])
        assert len(vias) == 2 and all(v.startswith("DERP(r") for v in vias), r.stdout


def test_failover_to_derp_and_back_during_a_transfer() -> None:
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "easy"})
        a, b = net.agents["a"], net.agents["b"]
        with pinging(a.ns, net.ips["b"]) as pinger:
            wait_for(net, lambda: net.peer("a", "b")["CurAddr"] == net.wan("b")
                     and net.peer("b", "a")["CurAddr"] == net.wan("a"), 10, "direct paths")
            blob = os.urandom(BLOB)
            sink = Sink(b.ns, net.ips["b"], 5000)
            result: dict[str, Any] = {}

            def send() -> None:
                try:  # 1 MB/s: the transfer is still running when the path breaks
                    result["digest"] = call_in_netns(a.ns, send_paced, net.ips["b"], 5000, blob,
                                                     1 << 20, timeout=120)
                except BaseException as e:
                    result["error"] = e

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            try:
                wait_for(net, lambda: sink.received > 1 << 20, 20, "the transfer under way")
                assert net.peer("a", "b")["CurAddr"] == net.wan("b")
                derp_a, derp_rx_b = derp_tx(net, "a"), derp_rx(net, "b")
                rx_before = sink.received
                t_block, t_block_wall = time.monotonic(), time.time()
                lab.block_direct_udp()

                # Traffic goes on via DERP within 7 s: an echo reply after the block, and the
                # tailnet's packets on DERP both ways. (Trust in the direct path lasts 6.5 s
                # after its last pong; until then packets go to it alone and are lost.)
                wait_for(net, lambda: derp_tx(net, "a") > derp_a
                         and derp_rx(net, "b") > derp_rx_b, 7.0,
                         "a sending to b via DERP within 7 s of the block")
                t_derp = time.monotonic() - t_block
                wait_for(net, lambda: pinger.first_reply_after(t_block_wall + 0.3), 7.5,
                         "an echo reply after the block")
                reply = pinger.first_reply_after(t_block_wall + 0.3)
                assert reply is not None and reply - t_block_wall < 7.0, reply - t_block_wall
                # The TCP flow resumes at its next retransmission (kernel backoff: 0.2 s
                # doubling, so up to 12.6 s after the loss began when the switch comes late).
                wait_for(net, lambda: sink.received > rx_before + (256 << 10), 15,
                         "the transfer moving again via DERP")
                t_tcp = time.monotonic() - t_block
                p = net.peer("a", "b")
                assert (p["CurAddr"], p["Relay"]) == ("", "r1"), p
                sender.join(120)
                assert not sender.is_alive(), "the transfer did not finish"
            finally:
                sink.close()
                sender.join(5)
            assert "error" not in result, result.get("error")
            assert result["digest"] == sink.digest == hashlib.sha256(blob).digest()
            assert sink.received == BLOB

            t_unblock = time.monotonic()
            lab.unblock_direct_udp()
            wait_for(net, lambda: net.peer("a", "b")["CurAddr"] == net.wan("b")
                     and net.peer("b", "a")["CurAddr"] == net.wan("a"), 15,
                     "back to direct after the unblock")
            back = time.monotonic() - t_unblock
            direct_before = direct_tx(net, "a")
            time.sleep(1)
            assert direct_tx(net, "a") > direct_before  # the pings flow direct again
        print(f"after the block: DERP {t_derp:.1f}s, echo {reply - t_block_wall:.1f}s, TCP "
              f"{t_tcp:.1f}s; direct {back:.1f}s after the unblock")


CONNREJECT_POLICY = """{
  // b's port %(allowed)d is open to everyone; %(refused)d is not (nothing else of b is)
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["a:*"]},
    {"action": "accept", "src": ["*"], "dst": ["b:%(allowed)d"]},
  ],
  "nodeAttrs": [{"target": ["*"], "attr": ["debug-conn-reject"]}],
  "derpMap": %(derp)s,
}
"""


@pytest.mark.feature("connreject")
def test_acl_refused_port_between_nated_agents_gives_connreject_both_sides() -> None:
    def policy(lab: NatLab) -> str:
        return CONNREJECT_POLICY % {"allowed": ALLOWED_PORT, "refused": REFUSED_PORT,
                                    "derp": json.dumps(lab.derp_map())}

    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "easy"}, policy=policy)
        a, b = net.agents["a"], net.agents["b"]
        wait_ping(net, "b", "a")
        with listening(b.ns, net.ips["b"], ALLOWED_PORT), \
                listening(b.ns, net.ips["b"], REFUSED_PORT):
            wait_for(net, lambda: a.api("debug-rejects")["Enabled"]
                     and b.api("debug-rejects")["Enabled"], 10, "conn-reject diagnostics on")
            outcome, _ = call_in_netns(a.ns, connect, net.ips["b"], ALLOWED_PORT, 10.0)
            assert outcome == "connected"
            for _ in range(2):
                outcome, took = call_in_netns(a.ns, connect, net.ips["b"], REFUSED_PORT, 10.0)
                assert outcome == "refused" and took < 2.0, (outcome, took)
        dst = f"{net.ips['b']}:{REFUSED_PORT}"
        out = [e for e in a.api("debug-rejects")["Outgoing"] if e["Dst"] == dst]
        assert [(e["Reason"], e["Source"], e["Count"]) for e in out] == [
            ("acl", "tsmp_recv", 2)], out
        inc = [e for e in b.api("debug-rejects")["Incoming"]
               if e["Src"].startswith(net.ips["a"] + ":")]
        assert inc and {(e["Reason"], e["Source"]) for e in inc} == {("acl", "tsmp_sent")}, inc
        assert all(e["Dst"] == dst for e in inc), inc
        table = a.cli("debug", "rejects")
        assert "refused by the tailnet policy on b" in table.stdout, table.stdout


def test_each_agent_picks_the_nearer_region_as_home() -> None:
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "hard"},
                    regions=(("slow", 60.0), ("fast", None)))
        fast = lab.regions[1]
        for n in ("a", "b"):
            wait_for(net, lambda n=n: net.status(n)["Self"]["Relay"] == "fast", 20,
                     f"{n}'s Self.Relay = fast")
            assert metric(net.metrics(n), "nodeagent_derp_home_region") == fast.id
            rep = netcheck_json(net, n)
            assert rep["PreferredDERP"] == fast.id, rep
            lat = rep["RegionLatency"]
            assert lat[str(fast.id)] < lat[str(lab.regions[0].id)], lat
        # and the peers see it as the region to relay through
        assert net.peer("a", "b")["Relay"] == net.peer("b", "a")["Relay"] == "fast"
        if tailscale_cli_missing() is None:  # Tailscale's own netcheck agrees
            r = tailscale(net, "a", "netcheck")
            assert "\t* Nearest DERP: natlab fast\n" in r.stdout, r.stdout + r.stderr
            lines = [ln.split(":")[0].strip() for ln in r.stdout.splitlines()
                     if ln.startswith("\t\t- ")]
            assert lines == ["- fast", "- slow"], r.stdout  # by latency, nearest first


# --- item 7: Tailscale's derper and CLI -------------------------------------------------------


@pytest.mark.parametrize("derper", ["ours", "tailscale"])
def test_relayed_ping_through_each_derper(derper: str) -> None:
    # The map's DERPPort, STUNPort and IPv4 are honoured: the derper listens on 8443 and STUN
    # on 3479 (nothing on 443/3478), and its HostName does not resolve.
    if derper == "tailscale" and (why := tailscale_derper_missing()) is not None:
        pytest.skip(why)
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "easy"}, derper=derper, ports=(8443, 3479),
                    policy=unresolvable_hostnames, block_udp=True)
        region = lab.regions[0]
        wait_ping(net, "a", "b")
        r = icmp(net.agents["b"].ns, net.ips["a"], 5)
        assert r.returncode == 0, r.stdout
        assert transfer(net, "a", "b", 5000, 1 << 20) > 0
        r = net.agents["a"].cli("ping", "-c", "3", "--until-direct", "false", "b")
        assert r.returncode == 0, r.stderr
        assert pong_lines(r.stdout, "b", net.ips["b"]) == ["DERP(r1)"] * 3, r.stdout
        assert net.peer("a", "b")["Relay"] == "r1" and net.peer("a", "b")["CurAddr"] == ""
        for n in ("a", "b"):
            assert direct_tx(net, n) == 0
            assert metric(net.metrics(n), "nodeagent_derp_home_region") == region.id
            assert metric(net.metrics(n), f'nodeagent_derp_connected{{region="{region.id}"}}') \
                == 1
        # the agent's STUN went to the map's STUNPort
        rep = netcheck_json(net, "a")
        assert rep["UDP"] is True and str(region.id) in rep["RegionLatency"], rep
        assert rep["GlobalV4"].split(":")[0] == net.homes["a"].wan_ip, rep
        r = net.agents["a"].cli("debug", "derp", "r1", "--json", timeout=90)
        check = json.loads(r.stdout)
        assert check["Errors"] is None, check
        info = "\n".join(check["Info"])
        assert f"({region.ip} port 8443)" in info and f"{region.ip} port 3479" in info, info
        if tailscale_cli_missing() is None:
            r = tailscale(net, "b", "ping", "-c", "2", "a")
            assert pong_lines(r.stdout, "a", net.ips["a"]) == ["DERP(r1)"] * 2, r.stdout
            assert r.returncode == 1 and "direct connection not established" in r.stderr
            r = tailscale(net, "b", "netcheck")  # Tailscale's own probes, to STUNPort
            assert r.returncode == 0 and "\t* Nearest DERP: natlab r1\n" in r.stdout, r.stdout


def test_tailscale_cli_against_our_localapi() -> None:
    if (why := tailscale_cli_missing()) is not None:
        pytest.skip(why)
    with NatLab() as lab:
        net = build(lab, {"a": "easy", "b": "easy"}, block_udp=True)
        ip_b = net.ips["b"]

        # relayed: every pong via DERP, and no direct connection
        r = tailscale(net, "a", "ping", "-c", "2", "b")
        assert pong_lines(r.stdout, "b", ip_b) == ["DERP(r1)"] * 2, r.stdout + r.stderr
        assert r.returncode == 1 and "direct connection not established" in r.stderr
        r = tailscale(net, "a", "status")
        assert r.returncode == 0, r.stderr
        (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith(ip_b + " ")]
        assert 'active; relay "r1"' in row, r.stdout

        # direct: the pings stop at the first direct pong
        lab.unblock_direct_udp()
        r = tailscale(net, "a", "ping", "b")
        assert r.returncode == 0, r.stdout + r.stderr
        vias = pong_lines(r.stdout, "b", ip_b)
        assert vias and vias[-1] == net.wan("b") and set(vias[:-1]) <= {"DERP(r1)"}, r.stdout
        r = tailscale(net, "a", "status")
        (row,) = [ln for ln in r.stdout.splitlines() if ln.startswith(ip_b + " ")]
        assert f"active; direct {net.wan('b')}" in row, r.stdout
        r = tailscale(net, "a", "ping", ip_b)  # by IP, already direct: one pong
        assert pong_lines(r.stdout, "b", ip_b) == [net.wan("b")], r.stdout
        r = tailscale(net, "a", "status", "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)  # our status, decoded into Tailscale's types and re-encoded
        (pb,) = [p for p in st["Peer"].values() if p["HostName"] == "b"]
        assert (pb["CurAddr"], pb["Relay"], pb["Active"]) == (net.wan("b"), "r1", True), pb
        assert st["Self"]["Relay"] == "r1" and st["BackendState"] == "Running"

        # netcheck: the CLI probes from the LAN host itself, with the agent's DERP map
        r = tailscale(net, "a", "netcheck")
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        assert "\t* UDP: true" in out, out
        assert re.search(rf"\t\* IPv4: yes, {re.escape(net.homes['a'].wan_ip)}:\d+\n", out), out
        assert "\t* Nearest DERP: natlab r1\n" in out, out
        assert re.search(r"\t\t-  r1: [\d.]+(µs|ms) +\(natlab r1\)", out), out
        r = tailscale(net, "a", "netcheck", "--format", "json")
        rep = json.loads(r.stdout)
        assert rep["UDP"] is True and rep["PreferredDERP"] == lab.regions[0].id, rep

        # debug derp: the agent checks the region and the CLI prints its findings
        for arg in ("r1", str(lab.regions[0].id)):
            r = tailscale(net, "a", "debug", "derp", arg)
            assert r.returncode == 0, r.stderr
            rep = json.loads(r.stdout)
            assert rep["Errors"] is None, rep
            assert f'Region {lab.regions[0].id} == "r1"' in rep["Info"][0], rep
            assert any("STUN" in i for i in rep["Info"]), rep
        r = tailscale(net, "a", "debug", "derp", "nowhere")
        rep = json.loads(r.stdout)
        assert rep["Errors"] == ['no such region "nowhere" in DERP map'], rep
