"""Profile: where two ``nodeagent up`` agents spend their time under one iperf3 TCP stream.

Builds the two-namespace topology of ``engine_throughput.py``, starts iperf3 (client in A,
server in B) and records both agents with py-spy (``--native`` off, ``--format raw`` collapsed
stacks) for ``--seconds``, then prints the top functions by own time for the sender (A) and the
receiver (B), and the Mbit/s iperf3 saw. Without py-spy on PATH it says so and exits 2.

Run as root: ``python3 benchmarks/engine_profile.py [--seconds 8] [--out /tmp/naprof]``.
``NODEAGENT_*`` variables in the environment reach the agents (``NODEAGENT_NO_ACCEL=1``
profiles the pure-Python path).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.netns import popen_in_netns
from tests.procutil import stop
from tests.wgnet import TS4, two_agents, wait_ping

ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]


def top(path: str, n: int = 25) -> list[tuple[float, str]]:
    """Own-time share per function from a py-spy raw (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            c = int(count)
            total += c
            own[stack.split(";")[-1]] += c
    return [(100.0 * c / max(total, 1), fn) for fn, c in own.most_common(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--out", default="/tmp/naprof")
    args = ap.parse_args()
    if shutil.which("py-spy") is None:
        print("py-spy is not installed (pip install py-spy)")
        return 2
    os.makedirs(args.out, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("NODEAGENT_")}
    with two_agents(ALLOW_ALL, ALLOW_ALL, env_a=env, env_b=env) as (a, b):
        wait_ping(a.ns, TS4["b"])
        srv = popen_in_netns(b.ns, ["iperf3", "-s", "-1", "-B", TS4["b"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)  # benchmark only: iperf3's listener has no readiness signal here
            cli = popen_in_netns(a.ns, ["iperf3", "-c", TS4["b"], "-t", str(args.seconds + 2),
                                        "-J"], stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            spies = []
            for node in (a, b):
                assert node.proc is not None
                out = os.path.join(args.out, f"{node.name}.txt")
                spies.append((node.name, out, subprocess.Popen(
                    ["py-spy", "record", "-p", str(node.proc.pid), "-d", str(args.seconds),
                     "-r", "200", "-f", "raw", "-o", out],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
            for _, _, p in spies:
                p.wait(timeout=args.seconds + 60)
            data, _ = cli.communicate(timeout=args.seconds + 60)
        finally:
            stop(srv, signal.SIGKILL)
    mbps = json.loads(data)["end"]["sum_received"]["bits_per_second"] / 1e6
    print(f"iperf3 TCP {mbps:.1f} Mbit/s during the profile")
    for name, out, _ in spies:
        role = "sender (A)" if name == "a" else "receiver (B)"
        print(f"\n--- {role}: own time by function ({out}) ---")
        for pct, fn in top(out):
            print(f"{pct:5.1f}%  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
