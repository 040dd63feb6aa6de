"""Benchmark: N logged-in DERP clients; server RSS per idle and per active client, RTT under load.

First, against a real ``derper`` process: RSS growth per 10 000 closed connections, for
upgrade-and-close and login-and-close visits (should be ≈0: nothing of a closed connection may
stay referenced).

The DerpServer runs behind aiohttp in its own process; this process opens N clients, each doing
the full HTTP upgrade and boxed login, then leaves them idle. Prints the server's RSS growth per
client, and the round-trip time of a packet A→B→A between two extra clients, before the load
and with the N clients connected (and their ratio). Then every client becomes active: it sends
``--active-packets`` packets of ``--active-size`` bytes to the next client (a ring) and reads the
ones sent to it; once all have arrived, the server's RSS growth per client is printed next to
the idle figure (after the traffic, and at its peak, VmHWM). ``--clients`` takes a list (a fresh
server for each N, default 1000 and 10 000); RLIMIT_NOFILE is raised for 2N + 1024 descriptors
(root may raise the hard limit too): each process of the pair holds N sockets.

    python3 benchmarks/derp_conns.py [--clients 1000,10000] [--rtts 500] [--churn 20000]
        [--active-packets 10] [--active-size 1400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."),
                os.path.join(os.path.dirname(__file__), "..", "features", "derper")]
sys.path.insert(0, os.path.dirname(__file__))

from derp_relay import _use_uvloop, start_derp_process  # noqa: E402
from nacl.public import PrivateKey  # noqa: E402

from nodeagent.derp.client import DerpClient, ReceivedPacket  # noqa: E402
from tests import derpload as D  # noqa: E402


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:  # root may raise the hard limit (up to fs.nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, want), want))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ValueError, OSError):
            pass
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


async def ring_traffic(clients: list[DerpClient], count: int, size: int) -> float:
    """Each client sends ``count`` packets to the next one and reads the ``count`` sent to it."""
    n = len(clients)
    pkt = os.urandom(size)
    t0 = time.perf_counter()
    for i, c in enumerate(clients):
        dst = clients[(i + 1) % n].public_key
        for _ in range(count):
            c.send_nowait(dst, pkt)

    async def drain_and_read(c: DerpClient) -> None:
        await c.drain()
        got = 0
        while got < count:
            if isinstance(await c.recv(), ReceivedPacket):
                got += 1

    await asyncio.wait_for(asyncio.gather(*(drain_and_read(c) for c in clients)), 120)
    return time.perf_counter() - t0


async def rtt_samples(a: DerpClient, b: DerpClient, n: int) -> list[float]:
    out = []
    for i in range(n):
        payload = i.to_bytes(4, "big") + bytes(96)
        t0 = time.perf_counter()
        await a.send(b.public_key, payload)
        while not isinstance(ev := await b.recv(), ReceivedPacket):
            pass
        await b.send(a.public_key, ev.data)
        while not isinstance(await a.recv(), ReceivedPacket):
            pass
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def fmt(samples: list[float]) -> str:
    s = sorted(samples)
    return (f"median {statistics.median(s):.3f} ms, p99 {s[int(len(s) * 0.99) - 1]:.3f} ms, "
            f"max {s[-1]:.3f} ms")


async def run(port: int, key: bytes, pid: int, n: int, rtts: int, active_packets: int,
              active_size: int) -> None:
    url = f"http://127.0.0.1:{port}/derp"
    a = await DerpClient.connect(url, bytes(PrivateKey.generate()))
    b = await DerpClient.connect(url, bytes(PrivateKey.generate()))
    await rtt_samples(a, b, rtts)  # warm-up, discarded
    idle = await rtt_samples(a, b, rtts)
    base = rss_kib(pid)
    sem = asyncio.Semaphore(256)
    clients: list[DerpClient] = []
    keys = [bytes(PrivateKey.generate()) for _ in range(n)]

    async def one(k: bytes) -> None:
        async with sem:
            clients.append(await DerpClient.connect(url, k, timeout=60))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in keys))
    login_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # let the server settle before measuring memory
    loaded_rss = rss_kib(pid)
    loaded = await rtt_samples(a, b, rtts)
    print(f"clients: {len(clients)} logged in over {login_s:.1f} s "
          f"({len(clients) / login_s:,.0f} logins/s)")
    idle_per = (loaded_rss - base) / len(clients)
    print(f"server RSS: {base / 1024:.1f} MiB before, {loaded_rss / 1024:.1f} MiB with clients; "
          f"{idle_per:.1f} KiB per client")
    print(f"RTT A->B->A idle server : {fmt(idle)}")
    print(f"RTT A->B->A under load  : {fmt(loaded)}")
    print(f"ratio loaded/idle median RTT: "
          f"{statistics.median(loaded) / statistics.median(idle):.2f}")
    if active_packets:
        dt = await ring_traffic(clients, active_packets, active_size)
        await asyncio.sleep(1.0)
        active_rss = rss_kib(pid)
        peak = rss_kib(pid, "VmHWM")
        print(f"active: each client sent and received {active_packets} x {active_size} B "
              f"({len(clients) * active_packets / dt:,.0f} pkt/s over {dt:.1f} s)")
        print(f"memory per client at {len(clients)} clients: idle {idle_per:.1f} KiB, "
              f"active {(active_rss - base) / len(clients):.1f} KiB after the traffic "
              f"(peak {(peak - base) / len(clients):.1f} KiB)")
    for c in clients:
        await c.close()
    await a.close()
    await b.close()


def churn_growth(cycles: int) -> None:
    """RSS growth of a real ``derper`` per 10 000 closed connections (upgrade / login visits)."""
    port = D.free_port()
    proc = D.start_derper(port)
    try:
        keys = [bytes(PrivateKey.generate()) for _ in range(1000)]
        asyncio.run(D.churn(port, 1000, login=True, keys=keys))  # warm-up
        for login in (False, True):
            before = D.rss_kib(proc.pid)
            t0 = time.perf_counter()
            failed = asyncio.run(D.churn(port, cycles, login=login, keys=keys))
            grew = D.rss_kib(proc.pid) - before
            kind = "login-and-close" if login else "upgrade-and-close"
            print(f"{kind}: {cycles} visits in {time.perf_counter() - t0:.1f} s "
                  f"({failed} failed); RSS {grew:+d} KiB = "
                  f"{grew * 10_000 / cycles:+.0f} KiB per 10 000 closed connections")
    finally:
        D.stop_process(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1000,10000",
                    help="comma-separated client counts, one server process each")
    ap.add_argument("--rtts", type=int, default=500)
    ap.add_argument("--churn", type=int, default=20_000,
                    help="closed connections per churn measurement (0 skips it)")
    ap.add_argument("--active-packets", type=int, default=10,
                    help="packets each client sends in the active phase (0 skips it)")
    ap.add_argument("--active-size", type=int, default=1400)
    args = ap.parse_args()
    counts = [int(x) for x in str(args.clients).split(",") if x.strip()]
    if args.churn:
        churn_growth(args.churn)
    limit = raise_nofile(max(counts) * 2 + 1024)  # the child process inherits this
    if limit < max(counts) + 256:
        sys.exit(f"RLIMIT_NOFILE is {limit}; cannot hold {max(counts)} clients")
    loopname = _use_uvloop()
    print(f"loop {loopname}, RLIMIT_NOFILE {limit}")
    for n in counts:
        proc, port, key = start_derp_process()
        print(f"--- {n} clients")
        try:
            asyncio.run(run(port, key, proc.pid, n, args.rtts,  # type: ignore[arg-type]
                            args.active_packets, args.active_size))
        finally:
            proc.terminate()
            proc.join(5)


if __name__ == "__main__":
    main()
