"""Benchmark: TCP throughput and ping RTT through two nodeagent engines vs two wireguard-go.

Builds two network namespaces joined by a veth (198.18.1.0/24), then — in the same run, on the
same topology — runs iperf3 (TCP, one stream) and ping through two ``nodeagent up`` agents with
their default offloads, then with TSO reads added (``NODEAGENT_TUN_TSO=1``), without TUN offloads
(``NODEAGENT_TUN_OFFLOAD=0``) and without any offload (also ``NODEAGENT_UDP_OFFLOAD=0``), and
through two wireguard-go instances (Debian package); prints every figure and the ratios.
The DERP-relayed path (and the direct one through NATs) is measured by
``benchmarks/path_throughput.py``.

Run as root: ``python3 benchmarks/engine_throughput.py [--seconds 5]``.
Needs: iperf3, wireguard-go, wireguard-tools, ping.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nacl.public import PrivateKey

from nodeagent.keys import NODE_PREFIX
from tests.netns import popen_in_netns
from tests.procutil import stop
from tests.wgnet import (
    TS4,
    TS6,
    UNDERLAY,
    WG_PORT,
    two_agents,
    two_namespaces,
    wait_ping,
    wireguard_go,
)

ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]


def iperf(ns_server: str, ns_client: str, addr: str, seconds: int) -> float:
    srv = popen_in_netns(ns_server, ["iperf3", "-s", "-1", "-B", addr],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until the server listens
            r = subprocess.run(["ip", "netns", "exec", ns_server, "ss", "-ltn"],
                               capture_output=True, text=True)
            if ":5201" in r.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        r = subprocess.run(["ip", "netns", "exec", ns_client, "iperf3", "-c", addr, "-t",
                            str(seconds), "-J"], capture_output=True, text=True,
                           timeout=seconds + 30)
        data = json.loads(r.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        stop(srv, signal.SIGKILL)


def rtt(ns: str, addr: str) -> float:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "20", "-i", "0.05", "-q", addr],
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return float(m.group(1)) if m else float("nan")


def run_nodeagent(seconds: int, *, udp_offload: bool = True, tun_offload: bool = True,
                  tun_tso: bool = False) -> tuple[float, float]:
    env = {"NODEAGENT_UDP_OFFLOAD": str(int(udp_offload)),
           "NODEAGENT_TUN_OFFLOAD": str(int(tun_offload)), "NODEAGENT_TUN_TSO": str(int(tun_tso))}
    with two_agents(ALLOW_ALL, ALLOW_ALL, env_a=env, env_b=env) as (a, b):
        wait_ping(a.ns, TS4["b"])
        return iperf(b.ns, a.ns, TS4["b"], seconds), rtt(a.ns, TS4["b"])


def run_wireguard_go(seconds: int) -> tuple[float, float]:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    pa = NODE_PREFIX + bytes(ka.public_key).hex()
    pb = NODE_PREFIX + bytes(kb.public_key).hex()
    with two_namespaces() as (ns_a, ns_b), tempfile.TemporaryDirectory() as tmp, \
            wireguard_go(ns_a, "a", tmp, peer_key=pb, private_key=bytes(ka),
                         peer_endpoint=f"{UNDERLAY['b']}:{WG_PORT}",
                         peer_allowed=[f"{TS4['b']}/32", f"{TS6['b']}/128"]), \
            wireguard_go(ns_b, "b", tmp, peer_key=pa, private_key=bytes(kb),
                         peer_endpoint=f"{UNDERLAY['a']}:{WG_PORT}",
                         peer_allowed=[f"{TS4['a']}/32", f"{TS6['a']}/128"]):
        wait_ping(ns_a, TS4["b"])
        return iperf(ns_b, ns_a, TS4["b"], seconds), rtt(ns_a, TS4["b"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    na_tput, na_rtt = run_nodeagent(args.seconds)
    tso_tput, tso_rtt = run_nodeagent(args.seconds, tun_tso=True)
    udp_tput, udp_rtt = run_nodeagent(args.seconds, tun_offload=False)
    plain_tput, plain_rtt = run_nodeagent(args.seconds, udp_offload=False, tun_offload=False)
    wg_tput, wg_rtt = run_wireguard_go(args.seconds)
    rows = [("nodeagent", na_tput, na_rtt), ("nodeagent + TSO reads", tso_tput, tso_rtt),
            ("nodeagent, UDP offloads only", udp_tput, udp_rtt),
            ("nodeagent, no offloads", plain_tput, plain_rtt),
            ("wireguard-go", wg_tput, wg_rtt)]
    for name, tput, ms in rows:
        print(f"{name:30s} TCP {tput:8.1f} Mbit/s   ping RTT {ms:.3f} ms")
    print(f"ratio nodeagent/wireguard-go: throughput {na_tput / wg_tput:.2f}x, "
          f"RTT {na_rtt / wg_rtt:.2f}x")
    print(f"ratio nodeagent default offloads / none: throughput {na_tput / plain_tput:.2f}x; "
          f"UDP only / none: {udp_tput / plain_tput:.2f}x; "
          f"with TSO reads / default: {tso_tput / na_tput:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
