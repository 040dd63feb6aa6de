"""Smoke tests of the natlab network itself (``tests/natlab.py``), not of the agent's NAT
traversal: what a LAN host behind each NAT mode sees over STUN, that direct UDP can be blocked
while DERP and STUN pass, that datagrams punched through two easy NATs arrive (and through two
hard ones do not), that one port can be blocked between the homes, that the TLS derper and the
control server answer from a LAN, that a region's added latency shows in STUN round trips, and
that teardown leaves nothing behind.

Each test builds its own lab (unique names) and removes it, pass or fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from nodeagent.control.policy import parse_policy
from nodeagent.tailcfg import derpmap_from_wire
from nodeagent.version import CAPABILITY_VERSION
from tests.dataplane import connect, send_blob, sink_server
from tests.natlab import (
    NatLab,
    Router,
    http_get,
    natlab_missing,
    netem_available,
    recv_from,
    stun,
    wait_until,
)
from tests.netns import call_in_netns, netns_pids, tun_available

_missing = natlab_missing()
pytestmark = [pytest.mark.integration]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

# Test ports of the LAN hosts.
WG = 41641
FIXED = 40000


@pytest.fixture
def lab() -> Iterator[NatLab]:
    with NatLab() as lab:
        yield lab


def received(sock: socket.socket, payload: bytes, src: tuple[str, int],
             timeout: float) -> bool:
    """Whether ``payload`` from ``src`` arrives on ``sock`` within ``timeout`` s (other
    datagrams are skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = recv_from(sock, left)
        if got is None:
            return False
        if got == (payload, src):
            return True
    return False


def punch(sa: socket.socket, ma: tuple[str, int], sb: socket.socket,
          mb: tuple[str, int], rounds: int = 4) -> tuple[bool, bool]:
    """Both sides send to the other's mapped address each round; returns whether A's datagrams
    reached B and B's reached A."""
    a_to_b = b_to_a = False
    for i in range(rounds):
        sa.sendto(b"a%d" % i, mb)
        sb.sendto(b"b%d" % i, ma)
        a_to_b |= received(sb, b"a%d" % i, ma, 0.3)
        b_to_a |= received(sa, b"b%d" % i, mb, 0.3)
    return a_to_b, b_to_a


def mapped(lab: NatLab, home: Router, port: int, server: tuple[str, int]
           ) -> tuple[socket.socket, tuple[str, int]]:
    s = lab.udp_socket(home, port)
    return s, stun(s, server)[0]


# --- STUN through each NAT mode ------------------------------------------------------------------


@pytest.mark.feature("derper")
def test_stun_sees_the_router_wan_address_per_nat_mode(lab: NatLab) -> None:
    d1 = lab.start_derper(lab.add_region("r1"))
    d2 = lab.start_derper(lab.add_region("r2"))
    a = lab.add_home("a", nat="easy")
    b = lab.add_home("b", nat="hard")

    # easy: the router's WAN address, the local port kept, the same toward every server
    sa = lab.udp_socket(a, FIXED)
    assert stun(sa, d1.stun_addr)[0] == (a.wan_ip, FIXED)
    assert stun(sa, d2.stun_addr)[0] == (a.wan_ip, FIXED)

    # hard: one local socket, two servers, two mapped ports (a random port per destination;
    # a fresh socket on a 1-in-64k collision)
    for attempt in range(3):
        sb = lab.udp_socket(b, FIXED + 1 + attempt)
        (ip1, p1), _ = stun(sb, d1.stun_addr)
        (ip2, p2), _ = stun(sb, d2.stun_addr)
        assert ip1 == ip2 == b.wan_ip
        if p1 != p2:
            break
    else:
        pytest.fail("hard NAT gave the same mapped port toward both servers three times")
    assert stun(sb, d1.stun_addr)[0] == (b.wan_ip, p1)  # stable per destination

    # switching modes: b easy now keeps a fresh socket's port; a routed shows its LAN address
    lab.set_nat(b, "easy")
    assert stun(lab.udp_socket(b, FIXED + 10), d2.stun_addr)[0] == (b.wan_ip, FIXED + 10)
    lab.set_nat(a, "none")
    assert stun(lab.udp_socket(a, FIXED + 11), d1.stun_addr)[0] == (a.lan.ip, FIXED + 11)


# --- blocking direct UDP, hole punching, one blocked port ----------------------------------------


@pytest.mark.feature("derper")
def test_direct_udp_block_keeps_derp_and_stun_then_hole_punch_passes(lab: NatLab) -> None:
    d = lab.start_derper(lab.add_region())
    a, b = lab.add_home("a", nat="easy"), lab.add_home("b", nat="easy")
    sa, ma = mapped(lab, a, WG, d.stun_addr)
    sb, mb = mapped(lab, b, WG, d.stun_addr)
    assert (ma, mb) == ((a.wan_ip, WG), (b.wan_ip, WG))

    lab.block_direct_udp()
    sb.sendto(b"b-opens", ma)  # B's router maps WG toward A; the internet drops the datagram
    sa.sendto(b"a-blocked", mb)
    assert not received(sb, b"a-blocked", ma, 1.0)
    assert not received(sa, b"b-opens", mb, 0.2)
    assert call_in_netns(a.lan.ns, connect, d.ip, d.port, 5.0)[0] == "connected"  # DERP TCP
    assert stun(sa, d.stun_addr)[0] == ma  # STUN to the region

    lab.unblock_direct_udp()
    sa.sendto(b"a-direct", mb)  # through B's mapping opened while blocked
    assert received(sb, b"a-direct", ma, 2.0)
    sb.sendto(b"b-direct", ma)
    assert received(sa, b"b-direct", mb, 2.0)

    # one UDP port blocked between the homes; another port still punches through
    lab.block_port("udp", WG)
    assert punch(sa, ma, sb, mb) == (False, False)
    sa2, ma2 = mapped(lab, a, WG + 1, d.stun_addr)
    sb2, mb2 = mapped(lab, b, WG + 1, d.stun_addr)
    assert punch(sa2, ma2, sb2, mb2) == (True, True)
    assert stun(sa, d.stun_addr)[0] == ma  # the block is between the homes only
    lab.unblock_port("udp", WG)
    assert punch(sa, ma, sb, mb) == (True, True)


@pytest.mark.feature("derper")
@pytest.mark.parametrize(("nat_a", "nat_b", "passes"), [
    ("easy", "easy", True),
    ("easy", "hard", False),
    ("hard", "hard", False),
])
def test_hole_punch_between_stun_mapped_addresses(lab: NatLab, nat_a: str, nat_b: str,
                                                 passes: bool) -> None:
    d = lab.start_derper(lab.add_region())
    a, b = lab.add_home("a", nat=nat_a), lab.add_home("b", nat=nat_b)
    sa, ma = mapped(lab, a, WG, d.stun_addr)
    sb, mb = mapped(lab, b, WG, d.stun_addr)
    assert punch(sa, ma, sb, mb) == (passes, passes)


def test_block_tcp_port_between_routed_lan_hosts(lab: NatLab) -> None:
    a, b = lab.add_home("a", nat="none"), lab.add_home("b", nat="none")
    with sink_server(b.lan.ns, b.lan.ip, 5000), sink_server(b.lan.ns, b.lan.ip, 5001):
        assert call_in_netns(a.lan.ns, connect, b.lan.ip, 5000, 5.0)[0] == "connected"
        lab.block_port("tcp", 5000)
        assert call_in_netns(a.lan.ns, connect, b.lan.ip, 5000, 1.0)[0] == "timeout"
        assert call_in_netns(a.lan.ns, connect, b.lan.ip, 5001, 5.0)[0] == "connected"
        lab.unblock_port("tcp", 5000)
        assert call_in_netns(a.lan.ns, connect, b.lan.ip, 5000, 5.0)[0] == "connected"


# --- servers on the public segment ---------------------------------------------------------------


@pytest.mark.feature("derper")
def test_tls_derper_and_control_answer_from_a_lan_host(lab: NatLab) -> None:
    region = lab.add_region("r1")
    d = lab.start_derper(region)
    assert d.pid in netns_pids(region.ns)
    assert d.region_json() == {
        "RegionID": 900, "RegionCode": "r1", "RegionName": "natlab r1",
        "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": region.ip, "IPv4": region.ip,
                   "DERPPort": 443, "STUNPort": 3478, "InsecureForTests": True}]}
    assert d.cert_name.startswith("sha256-raw:")
    ctl = lab.start_control()
    a = lab.add_home("a", nat="easy")

    assert http_get(a.lan.ns, f"{d.url}/derp/probe")[0] == 200
    assert http_get(a.lan.ns, f"{ctl.url}/key?v={CAPABILITY_VERSION}")[0] == 200
    assert ctl.url == f"http://{ctl.ip}:{ctl.port}" and ctl.admin_token

    # the control server runs the policy whose derpMap holds the region
    r = ctl.ctl("policy", "get")
    assert r.returncode == 0, r.stderr
    pol = parse_policy(r.stdout)
    assert pol.derp_map is not None and pol.derp_map == derpmap_from_wire(lab.derp_map())
    node = pol.derp_map.Regions[900].Nodes[0]
    assert (node.HostName, node.DERPPort, node.STUNPort, node.InsecureForTests) == \
        (region.ip, 443, 3478, True)


@pytest.mark.feature("derper")
@pytest.mark.parametrize("backend", ["netem", "delayline"])
def test_region_latency_shows_in_stun_rtt_and_tcp_still_flows(backend: str) -> None:
    if backend == "netem" and (why := netem_available()) is not None:
        pytest.skip(why)
    with NatLab(latency=backend) as lab:
        assert lab.latency_backend == backend
        _latency_checks(lab)


def _latency_checks(lab: NatLab) -> None:
    slow = lab.add_region("slow", latency_ms=40)
    fast = lab.add_region("fast")
    ds, df = lab.start_derper(slow), lab.start_derper(fast)
    a = lab.add_home("a", nat="easy")
    s = lab.udp_socket(a, FIXED)

    def rtts(server: tuple[str, int]) -> list[float]:
        return [stun(s, server)[1] for _ in range(5)]

    assert min(rtts(ds.stun_addr)) >= 0.040
    assert min(rtts(df.stun_addr)) < 0.010

    # bulk TCP from the LAN host through the slowed link (segmentation offloads intact)
    blob = os.urandom(4 << 20)
    with sink_server(slow.ns, slow.ip, 9000) as res:
        digest = call_in_netns(a.lan.ns, send_blob, slow.ip, 9000, blob, timeout=60)
    assert digest == hashlib.sha256(blob).digest() and res["bytes"] == len(blob)

    lab.set_latency(slow, 0)
    assert min(rtts(ds.stun_addr)) < 0.010


# --- agents behind the NATs (the harness's agent helper) -----------------------------------------


@pytest.mark.feature("derper")
@pytest.mark.skipif(tun_available() is not None, reason=str(tun_available()))
def test_agents_behind_nats_log_in_and_see_each_other(lab: NatLab) -> None:
    lab.start_derper(lab.add_region())
    ctl = lab.start_control()
    key = ctl.authkey()
    agents = [lab.start_agent(lab.add_home(n, nat=m), ctl, auth_key=key)
              for n, m in (("a", "easy"), ("b", "hard"))]
    for ag in agents:
        ag.wait_running()
    for ag, other in zip(agents, reversed(agents), strict=True):
        wait_until(lambda ag=ag, other=other: other.name in {
            p["HostName"] for p in (ag.api("status").get("Peer") or {}).values()},
            20, f"{ag.name} sees {other.name}")
    assert sorted(n["HostName"] for n in ctl.nodes()) == ["a", "b"]


# --- teardown ------------------------------------------------------------------------------------


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True,
                         timeout=30).stdout
    return {link["ifname"] for link in json.loads(out)}


@pytest.mark.feature("derper")
def test_teardown_leaves_nothing_behind_even_after_a_failure() -> None:
    links_before = _root_links()
    with pytest.raises(RuntimeError, match="boom"), NatLab() as lab:
        slow = lab.add_region("r1", latency_ms=5)  # netem, or a delay-line process
        lab.start_derper(slow)
        lab.start_derper(lab.add_region("r2"))
        ctl = lab.start_control()
        a, b = lab.add_home("a", nat="easy"), lab.add_home("b", nat="hard")
        if tun_available() is None:
            lab.start_agent(a, ctl)
        lab.block_direct_udp()
        lab.block_port("tcp", 22)
        lab.udp_socket(a, WG + 1)  # not the agent's own port
        names, pids = list(lab.namespaces), [p.pid for p in lab.procs]
        assert len(names) >= 8 and len(pids) >= 3
        for ns in (lab.hub, a.ns, b.ns):  # the tables exist while the lab does
            assert "natlab" in lab.run(ns, ["nft", "list", "tables"]).stdout
        raise RuntimeError("boom")
    assert lab.leftovers() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout
    assert not [ns for ns in names if ns in listed]
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    assert _root_links() - links_before == set()
    assert b.lan.ns not in listed and a.ns not in listed
