"""Two ``nodeagent up`` processes in two namespaces talking real WireGuard over a veth: ping, a
10 MB TCP transfer, and the ACL / TSMP / fast-failure scenario of the data plane — observed
through each agent's LocalAPI (metrics, status and, with connreject installed, debug-rejects).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import re
import subprocess
import time

import pytest

from tests.agentutil import localapi, metric
from tests.dataplane import connect, send_blob, sink_server
from tests.netns import in_netns, netns_available, tun_available
from tests.wgnet import TS4, TS6, run_in, two_agents, wait_ping

_missing = netns_available() or tun_available()
pytestmark = [pytest.mark.integration]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

RULES_A = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
RULES_B = [{"SrcIPs": [TS4["a"], TS6["a"]],
            "DstPorts": [{"IP": TS4["b"], "Ports": {"First": 8080, "Last": 8080}},
                         {"IP": TS6["b"], "Ports": {"First": 8080, "Last": 8080}}]}]


def test_ping_transfer_and_acl_over_wireguard() -> None:
    with two_agents(RULES_A, RULES_B) as (a, b):
        wait_ping(a.ns, TS4["b"])
        wait_ping(b.ns, TS4["a"])
        wait_ping(a.ns, TS6["b"])
        wait_ping(b.ns, TS6["a"])

        blob = os.urandom(10 << 20)
        for fam in (TS4, TS6):
            with sink_server(b.ns, fam["b"], 8080) as result:
                digest = run_in(a.ns, send_blob, fam["b"], 8080, blob)
            assert result.get("bytes") == len(blob)
            assert digest == hashlib.sha256(blob).digest()

        for fam in (TS4, TS6):
            for _ in range(3):
                outcome, took = run_in(a.ns, connect, fam["b"], 22, 5.0)
                assert outcome == "refused" and took < 1.0, (outcome, took)

        st, mb = asyncio.run(localapi(b.sock, "GET", "/localapi/v0/metrics"))
        assert st == 200 and metric(mb, "nodeagent_tsmp_rejects_sent_total") >= 6
        st, ma = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/metrics"))
        assert metric(ma, "nodeagent_fast_failures_total") >= 6
        # The 10 MB went out in UDP GSO bursts and arrived in GRO buffers (where the kernel
        # offers them: the gauges say whether it did).
        if metric(ma, 'nodeagent_wireguard_udp_offload{kind="gso"}') == 1:
            assert metric(ma, "nodeagent_wireguard_udp_gso_sends_total") > 0
        if metric(mb, 'nodeagent_wireguard_udp_offload{kind="gro"}') == 1:
            assert metric(mb, "nodeagent_wireguard_udp_gro_buffers_total") > 0
        # ... and the receiver wrote joined runs of TCP segments into its TUN.
        if metric(mb, 'nodeagent_tun_offload{kind="gro"}') == 1:
            assert metric(mb, "nodeagent_tun_gso_writes_total") > 0
        assert metric(ma, "nodeagent_tun_bad_reads_total") == 0

        st, status = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/status"))
        (peer,) = status["Peer"].values()
        assert peer["HostName"] == "b" and peer["RxBytes"] > 0 and peer["TxBytes"] > (10 << 20)
        assert peer["CurAddr"] == "198.18.1.2:41641"

        if importlib.util.find_spec("nodeagent_connreject") is not None:
            _, ra = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/debug-rejects"))
            outs = {(e["Dst"].rsplit(":", 1)[0], e["Reason"], e["Source"]): e["Count"]
                    for e in ra["Outgoing"]}
            assert outs[(TS4["b"], "acl", "tsmp_recv")] == 3
            assert outs[(f"[{TS6['b']}]", "acl", "tsmp_recv")] == 3
            _, rb = asyncio.run(localapi(b.sock, "GET", "/localapi/v0/debug-rejects"))
            ins = {(e["Src"].rsplit(":", 1)[0], e["Reason"], e["Source"]) for e in rb["Incoming"]}
            assert (TS4["a"], "acl", "tsmp_sent") in ins


def test_transfer_with_tso_reads_and_without_tun_offloads() -> None:
    """Agent a lets its kernel hand over TSO segments (cut up in Python) and joins what it
    writes; agent b uses no TUN offload at all. 10 MB each way arrive intact."""
    with two_agents(RULES_A, RULES_A, env_a={"NODEAGENT_TUN_TSO": "1"},
                    env_b={"NODEAGENT_TUN_OFFLOAD": "0"}) as (a, b):
        wait_ping(a.ns, TS4["b"])
        blob = os.urandom(10 << 20)
        for src, dst in ((a, b), (b, a)):
            with sink_server(dst.ns, TS4[dst.name], 8080) as result:
                digest = run_in(src.ns, send_blob, TS4[dst.name], 8080, blob)
            assert result.get("bytes") == len(blob), (src.name, dst.name)
            assert digest == hashlib.sha256(blob).digest()
        _, ma = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/metrics"))
        _, mb = asyncio.run(localapi(b.sock, "GET", "/localapi/v0/metrics"))
        assert metric(ma, 'nodeagent_tun_offload{kind="tso"}') == 1
        assert metric(ma, "nodeagent_tun_tso_reads_total") > 0
        assert metric(ma, "nodeagent_tun_gso_writes_total") > 0
        assert metric(ma, "nodeagent_tun_bad_reads_total") == 0
        assert metric(mb, 'nodeagent_tun_offload{kind="gro"}') == 0
        assert metric(mb, "nodeagent_tun_gso_writes_total") == 0


def test_stopped_peer_reported_by_pendopen() -> None:
    with two_agents(RULES_A, RULES_B) as (a, b):
        wait_ping(a.ns, TS4["b"])
        from tests.wgnet import stop_agent

        stop_agent(b)
        t0 = time.monotonic()
        outcome, _ = run_in(a.ns, connect, TS4["b"], 8080, 6.5)
        assert outcome == "timeout"
        _, ma = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/metrics"))
        deadline = t0 + 8
        while metric(ma, "nodeagent_pendopen_timeouts_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            _, ma = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/metrics"))
        assert metric(ma, "nodeagent_pendopen_timeouts_total") >= 1
        if importlib.util.find_spec("nodeagent_connreject") is not None:
            _, ra = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/debug-rejects"))
            (ev,) = [e for e in ra["Outgoing"] if e["Source"] == "pendopen_timeout"]
            assert ev["Reason"] in ("timeout", "peer-unreachable")
            assert ev["Dst"] == f"{TS4['b']}:8080"


def _flood(ns: str, src: str, dst: tuple[str, int], msg: bytes, count: int) -> float:
    """Send ``msg`` ``count`` times from ``src`` as fast as possible; return datagrams/s."""
    import socket

    with in_netns(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((src, 0))
        t0 = time.perf_counter()
        for _ in range(count):
            try:
                s.sendto(msg, dst)
            except BlockingIOError:
                pass
        return count / (time.perf_counter() - t0)
    finally:
        s.close()


def test_handshake_flood_gets_cookies_and_sessions_survive() -> None:
    from nacl.public import PrivateKey

    from nodeagent.engine.wireguard import PeerSpec, WireGuardCore
    from nodeagent.keys import NODE_PREFIX, parse_public
    from nodeagent.packet import build_udp, ip_to_int
    from tests.wgnet import UNDERLAY, WG_PORT

    with two_agents(RULES_A, RULES_B) as (a, b):
        wait_ping(b.ns, TS4["a"])
        # A well-formed initiation with a valid MAC1 for A, from a stranger at B's address.
        attacker = WireGuardCore(bytes(PrivateKey.generate()))
        victim = parse_public(a.public_key, NODE_PREFIX)
        attacker.set_peers([PeerSpec(victim, endpoint=(UNDERLAY["a"], WG_PORT))])
        pkt = build_udp(4, ip_to_int("100.64.0.9")[1], ip_to_int(TS4["a"])[1], 1, 2, b"x")
        (_, initiation), = attacker.encrypt(victim, [pkt])
        pinger = subprocess.Popen(["ip", "netns", "exec", b.ns, "ping", "-c", "20", "-i", "0.1",
                                   "-W", "2", TS4["a"]], stdout=subprocess.PIPE, text=True)
        rate = _flood(b.ns, UNDERLAY["b"], (UNDERLAY["a"], WG_PORT), initiation, 30000)
        out, _ = pinger.communicate(timeout=30)
        assert rate >= 10000, f"flood generator too slow: {rate:.0f}/s"
        m = re.search(r"(\d+) received", out)
        assert m and int(m.group(1)) >= 18, out  # the established session kept working
        _, ma = asyncio.run(localapi(a.sock, "GET", "/localapi/v0/metrics"))
        assert metric(ma, 'nodeagent_wireguard_dropped_total{reason="cookie_sent"}') > 0
