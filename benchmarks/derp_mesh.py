"""Benchmark: packets/s through a two-node DERP mesh against one node, in the same run.

Two derper processes (``derper --dev`` with ``--mesh-with`` each other, plain HTTP so the figure
is the relay's and not TLS's) on loopback. Mesh leg: the sender on node A, the receiver on node
B, every packet going SendPacket → ForwardPacket (A to B) → RecvPacket. Baseline: sender and
receiver both on node A. Both legs send identical 1400-byte packets with the same in-flight
window (``derp_relay.relay_between``), counting received bytes straight from the receiver's socket.
Prints packets/s, MB/s and the ratio mesh / one node.

    python3 benchmarks/derp_mesh.py [--packets 100000] [--size 1400] [--window 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."),
                os.path.join(os.path.dirname(__file__), "..", "features", "derper")]

from derp_relay import _use_uvloop, relay_between  # noqa: E402
from nacl.public import PrivateKey  # noqa: E402

from nodeagent.derp.client import DerpClient  # noqa: E402
from tests.procutil import stop  # noqa: E402

MESH_KEY = "be" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nodes(n: int) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    ports = [free_port() for _ in range(n)]
    mesh_with = ",".join(f"http://127.0.0.1:{p}/derp" for p in ports)
    env = {**os.environ, "TAILSCALE_DERPER_MESH_KEY": MESH_KEY, "DERPER_LOG": "WARNING",
           "NO_PROXY": "*"}
    procs = [subprocess.Popen([sys.executable, "-m", "nodeagent_derper.cli", "--dev", "-a",
                               f"127.0.0.1:{p}", "--stun=false", "--mesh-with", mesh_with],
                              env=env) for p in ports]
    return procs, ports


def debug_vars(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/vars", timeout=2) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def wait_until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():  # type: ignore[operator]
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"derp_mesh: {what} not reached within {timeout:g}s")
        time.sleep(0.05)


def meshed(port: int) -> bool:
    mesh = debug_vars(port)["mesh"]
    return mesh["peers_connected"] == mesh["peers_configured"]  # type: ignore[index]


async def bench(send_port: int, recv_port: int, total: int, size: int, window: int) -> float:
    a = await DerpClient.connect(f"http://127.0.0.1:{send_port}/derp",
                                 bytes(PrivateKey.generate()))
    before = debug_vars(send_port)["remote_clients"]
    b = await DerpClient.connect(f"http://127.0.0.1:{recv_port}/derp",
                                 bytes(PrivateKey.generate()))
    if send_port != recv_port:  # the sender's node must have learnt the receiver's key
        await asyncio.to_thread(wait_until, lambda: debug_vars(send_port)["remote_clients"]
                                > before, 10, "route to the receiver")  # type: ignore[operator]
    return await relay_between(a, b, total, size, window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--window", type=int, default=256, help="frames in flight")
    args = ap.parse_args()
    total = max(32, args.packets - args.packets % 32)
    loopname = _use_uvloop()
    procs, ports = start_nodes(2)
    try:
        for p in ports:
            wait_until(lambda p=p: meshed(p), 30, f"derper on {p} meshed")
        one_dt = asyncio.run(bench(ports[0], ports[0], total, args.size, args.window))
        mesh_dt = asyncio.run(bench(ports[0], ports[1], total, args.size, args.window))
        fwd = debug_vars(ports[0])["packets_forwarded_out"]
        drops = debug_vars(ports[0])["packets_dropped"]
    finally:
        for p in procs:
            stop(p, timeout=5)
    mb = total * (args.size + 37) / 1e6
    print(f"packets: {total} x {args.size} B payload, window {args.window}, loop {loopname}")
    print(f"one node       : {total / one_dt:12,.0f} pkt/s  {mb / one_dt:8.1f} MB/s"
          f"  ({one_dt:.2f} s)")
    print(f"two-node mesh  : {total / mesh_dt:12,.0f} pkt/s  {mb / mesh_dt:8.1f} MB/s"
          f"  ({mesh_dt:.2f} s)  [forwarded A→B: {fwd}, drops at A: {drops or 'none'}]")
    print(f"ratio mesh/one-node throughput: {one_dt / mesh_dt:.2f}")


if __name__ == "__main__":
    main()
