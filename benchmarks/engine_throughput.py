"""Benchmark: TCP throughput, ping RTT and CPU per GB through two nodeagent engines vs two
wireguard-go, alternating sides in one run.

Builds two network namespaces joined by a veth (198.18.1.0/24) and, per run, either two
``nodeagent up`` agents or two wireguard-go instances on the same topology. The anchor is
upstream wireguard-go from ``../shared/tools/wireguard-go`` when present, else Debian's (the
output says which). Sides alternate (A B, B A, ...) for ``--runs`` runs each. Per run:

- ping RTT of single pings with no load (``ping -i 0.05``), median and p99;
- TCP throughput (iperf3, one stream, ``--seconds``) and, during it, ping RTT under load;
- CPU seconds of both engine processes (utime+stime from /proc/PID/stat) per GB moved;
- with ``--syscalls`` (on by default), a second short iperf3 under ``strace -c -f`` on both
  engines: data packets per syscall, i.e. (bytes moved / 1228-byte MSS) per engine over that
  engine's syscalls — each engine's TUN and UDP sides both count, so 2.0 means one syscall per
  packet per direction it crosses. strace slows both sides; the figure compares, it is not a
  rate.

Prints every run, then medians per side and the ratios nodeagent / wireguard-go.
``--pure`` adds a third side: nodeagent with ``NODEAGENT_NO_ACCEL=1`` (pure-Python data path).
``--env K=V`` (repeatable) sets agent environment variables (e.g. ``NODEAGENT_TUN_TSO=0``).

Run as root: ``python3 benchmarks/engine_throughput.py [--seconds 5] [--runs 3]``.
Needs: iperf3, wireguard-go (../shared/tools or Debian's), wireguard-tools, ping, strace.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
    wireguard_go_binaries,
)

ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
MSS = 1228  # TCP payload per packet at the tunnels' MTU 1280 (IPv4, timestamps)
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (namespace A, namespace B, pid A, pid B)
Pair = tuple[str, str, int, int]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (all threads)


def wait_listening(ns: str, port: int = 5201) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltn"], capture_output=True,
                           text=True)
        if f":{port}" in r.stdout:
            return
        time.sleep(0.05)


def iperf(ns_server: str, ns_client: str, addr: str, seconds: int,
          during: Callable[[], Any] | None = None) -> tuple[float, int, Any]:
    """(Mbit/s, bytes received, what ``during`` returned) for one iperf3 TCP stream."""
    srv = popen_in_netns(ns_server, ["iperf3", "-s", "-1", "-B", addr],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(ns_server)
        cli = popen_in_netns(ns_client, ["iperf3", "-c", addr, "-t", str(seconds), "-J"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        extra = during() if during is not None else None
        out, _ = cli.communicate(timeout=seconds + 60)
        data = json.loads(out)
        recv = data["end"]["sum_received"]
        return float(recv["bits_per_second"]) / 1e6, int(recv["bytes"]), extra
    finally:
        stop(srv, signal.SIGKILL)


def ping_times(ns: str, addr: str, count: int, interval: float = 0.05) -> list[float]:
    r = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i",
                        str(interval), "-W", "2", addr], capture_output=True, text=True,
                       timeout=count * interval + 30)
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", r.stdout)]


def p99(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def strace_counts(pids: list[int], seconds: float) -> list[int]:
    """Syscalls each pid (all threads) made during ``seconds`` (strace -c -f)."""
    procs = []
    for pid in pids:
        procs.append(subprocess.Popen(["strace", "-c", "-f", "-qq", "-p", str(pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    time.sleep(seconds)
    counts = []
    for p in procs:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
        # the summary's last line: "100.00  seconds  usecs/call  calls  [errors]  total"
        total = [ln.split() for ln in err.splitlines() if ln.rstrip().endswith(" total")]
        counts.append(int(total[-1][3]) if total and len(total[-1]) >= 5 else 0)
    return counts


def measure(pair: Pair, seconds: int, syscalls: bool) -> dict[str, float]:
    ns_a, ns_b, pid_a, pid_b = pair
    wait_ping(ns_a, TS4["b"])
    ping_times(ns_a, TS4["b"], 5)  # warm: sessions, caches
    idle = ping_times(ns_a, TS4["b"], 40)
    cpu0 = cpu_seconds(pid_a) + cpu_seconds(pid_b)

    def loaded_ping() -> list[float]:
        time.sleep(1.0)  # let the stream get going
        return ping_times(ns_a, TS4["b"], max(10, int((seconds - 2) / 0.05)))

    mbps, nbytes, loaded = iperf(ns_b, ns_a, TS4["b"], seconds, loaded_ping)
    cpu = cpu_seconds(pid_a) + cpu_seconds(pid_b) - cpu0
    res = {"mbps": mbps, "rtt_idle_med": statistics.median(idle) if idle else float("nan"),
           "rtt_idle_p99": p99(idle),
           "rtt_load_med": statistics.median(loaded) if loaded else float("nan"),
           "rtt_load_p99": p99(loaded), "cpu_s_per_gb": cpu / (nbytes / 1e9)}
    if syscalls and shutil.which("strace"):
        window = 2.0

        def traced() -> list[int]:
            time.sleep(0.5)
            return strace_counts([pid_a, pid_b], window)

        _, nb, counts = iperf(ns_b, ns_a, TS4["b"], 4, traced)
        pkts = nb / MSS * (window / 4)  # packets in the traced window, assuming a steady rate
        res["pkts_per_syscall_a"] = pkts / max(counts[0], 1)
        res["pkts_per_syscall_b"] = pkts / max(counts[1], 1)
    return res


@contextmanager
def nodeagent_pair(env: dict[str, str]) -> Iterator[Pair]:
    with two_agents(ALLOW_ALL, ALLOW_ALL, env_a=env, env_b=env) as (a, b):
        assert a.proc is not None and b.proc is not None
        yield a.ns, b.ns, a.proc.pid, b.proc.pid


@contextmanager
def wireguard_go_pair(binary: str) -> Iterator[Pair]:
    ka, kb = PrivateKey.generate(), PrivateKey.generate()
    pa = NODE_PREFIX + bytes(ka.public_key).hex()
    pb = NODE_PREFIX + bytes(kb.public_key).hex()
    with two_namespaces() as (ns_a, ns_b), tempfile.TemporaryDirectory() as tmp, \
            wireguard_go(ns_a, "a", tmp, peer_key=pb, private_key=bytes(ka),
                         peer_endpoint=f"{UNDERLAY['b']}:{WG_PORT}",
                         peer_allowed=[f"{TS4['b']}/32", f"{TS6['b']}/128"],
                         binary=binary) as wa, \
            wireguard_go(ns_b, "b", tmp, peer_key=pa, private_key=bytes(kb),
                         peer_endpoint=f"{UNDERLAY['a']}:{WG_PORT}",
                         peer_allowed=[f"{TS4['a']}/32", f"{TS6['a']}/128"],
                         binary=binary) as wb:
        yield ns_a, ns_b, wa.proc.pid, wb.proc.pid


KEYS = [("mbps", "TCP Mbit/s", "{:8.1f}"), ("rtt_idle_med", "RTT idle med ms", "{:7.3f}"),
        ("rtt_idle_p99", "idle p99", "{:7.3f}"), ("rtt_load_med", "RTT load med", "{:7.3f}"),
        ("rtt_load_p99", "load p99", "{:7.3f}"), ("cpu_s_per_gb", "CPU s/GB", "{:6.2f}"),
        ("pkts_per_syscall_a", "pkt/sc A", "{:5.2f}"), ("pkts_per_syscall_b", "pkt/sc B",
                                                          "{:5.2f}")]


def row(name: str, r: dict[str, float]) -> str:
    cells = [f"{label} {fmt.format(r[k])}" for k, label, fmt in KEYS if k in r]
    return f"{name:26s} " + "  ".join(cells)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pure", action="store_true", help="also run NODEAGENT_NO_ACCEL=1")
    ap.add_argument("--no-syscalls", dest="syscalls", action="store_false")
    ap.add_argument("--env", action="append", default=[], help="K=V for the agents")
    args = ap.parse_args()
    bins = wireguard_go_binaries()
    if not bins:
        print("wireguard-go is not installed (../shared/tools/wireguard-go or Debian's)")
        return 2
    kind = "modern" if "modern" in bins else "debian"
    binary = bins[kind]
    print(f"anchor: wireguard-go {kind} ({binary})")
    env = dict(kv.split("=", 1) for kv in args.env)
    sides: list[tuple[str, Callable[[], Any]]] = [
        ("nodeagent", lambda: nodeagent_pair(env)),
        (f"wireguard-go ({kind})", lambda: wireguard_go_pair(binary))]
    if args.pure:
        sides.insert(1, ("nodeagent NO_ACCEL", lambda: nodeagent_pair(
            dict(env, NODEAGENT_NO_ACCEL="1"))))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in sides}
    for i in range(args.runs):
        order = sides if i % 2 == 0 else list(reversed(sides))
        for name, make in order:
            with make() as pair:
                r = measure(pair, args.seconds, args.syscalls)
            results[name].append(r)
            print(f"run {i + 1}: " + row(name, r), flush=True)
    print("\nmedians:")
    med: dict[str, dict[str, float]] = {}
    for name, rs in results.items():
        med[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(row(name, med[name]))
    wg = med[sides[-1][0]] if not args.pure else med[f"wireguard-go ({kind})"]
    for name in results:
        if name.startswith("wireguard-go"):
            continue
        m = med[name]
        print(f"ratio {name} / wireguard-go: throughput {m['mbps'] / wg['mbps']:.2f}x, "
              f"idle RTT {m['rtt_idle_med'] / wg['rtt_idle_med']:.2f}x, "
              f"loaded RTT {m['rtt_load_med'] / wg['rtt_load_med']:.2f}x, "
              f"CPU/GB {m['cpu_s_per_gb'] / wg['cpu_s_per_gb']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
