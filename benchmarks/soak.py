"""Soak: a real ``derper`` under legitimate traffic, churn, slowloris and garbage, for a while.

Starts ``derper --dev`` on loopback (with a short request deadline so idle sockets are cut during
the run) and, for ``--duration`` seconds (default 120), runs at once:

- ``--clients`` logged-in clients (default 2 000) from 127.0.0.1, each sending a small packet to
  a random other client about once a second, and draining what it receives;
- connection churn from 127.0.0.2: upgrade-and-close and login-and-close visits;
- slowloris from 127.0.0.3: up to 300 sockets each trickling one header byte a second, reopened
  when the server cuts them;
- garbage from 127.0.0.4: connections sending random bytes;
- a latency probe: two clients ping-ponging a packet through the relay every 50 ms.

Prints RSS at start (after the clients logged in and a warm-up churn), middle and end (after the
churn stopped), open fds, the probe's RTT median and p99, and what is left over once every
client has gone (DERP connections the server still counts, fds above the idle baseline). Exits 1
if RSS after the churn exceeds its start by more than ``--rss-bound-mb`` (default 16) or anything
is left over.

    python3 benchmarks/soak.py [--duration 120] [--clients 2000] [--rss-bound-mb 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
import urllib.request

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..")]

from nacl.public import PrivateKey  # noqa: E402

from nodeagent.derp.client import DerpClient, ReceivedPacket  # noqa: E402
from nodeagent.netguard import raise_nofile_limit  # noqa: E402
from tests import derpload as D  # noqa: E402

SLOWLORIS_SOCKETS = 300
REQUEST_DEADLINE = 5.0


class Stats:
    def __init__(self) -> None:
        self.packets_sent = 0
        self.packets_received = 0
        self.churn_visits = 0
        self.churn_failures = 0
        self.slowloris_cut = 0
        self.garbage_conns = 0
        self.rtts: list[float] = []


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/varz", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.split(" ")[0] in (name, name + "_total"):
                return float(line.split()[-1])
    raise RuntimeError(f"derper serves no metric {name}")


async def connect_clients(url: str, n: int) -> list[DerpClient]:
    sem = asyncio.Semaphore(64)  # under the derper's per-IP bound on not-logged-in connections

    async def one() -> DerpClient:
        async with sem:
            return await DerpClient.connect(url, bytes(PrivateKey.generate()), timeout=60)

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def chatter(c: DerpClient, peers: list[bytes], stop: asyncio.Event, st: Stats) -> None:
    await asyncio.sleep(random.random())
    while not stop.is_set():
        with contextlib.suppress(OSError, ConnectionError):
            await c.send(random.choice(peers), os.urandom(64))
            st.packets_sent += 1
        await asyncio.sleep(0.8 + random.random() * 0.4)


async def drain(c: DerpClient, st: Stats) -> None:
    with contextlib.suppress(Exception):
        while True:
            if isinstance(await c.recv(), ReceivedPacket):
                st.packets_received += 1


async def churner(port: int, stop: asyncio.Event, st: Stats, keys: list[bytes]) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            await asyncio.wait_for(D.upgrade_and_close(port, bool(i % 2), keys[i % len(keys)],
                                                       source="127.0.0.2"), 10)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            st.churn_failures += 1
        st.churn_visits += 1


async def slowloris(port: int, stop: asyncio.Event, st: Stats) -> None:
    head = b"GET /derp HTTP/1.1\r\nHost: derp.test\r\nX-Padding: " + b"a" * 10_000
    while not stop.is_set():
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
        except OSError:
            await asyncio.sleep(0.5)
            continue
        try:
            for b in head:
                if stop.is_set():
                    break
                w.write(bytes([b]))
                await w.drain()
                await asyncio.sleep(1.0)
        except (OSError, ConnectionError):
            st.slowloris_cut += 1
        finally:
            w.close()


async def garbage(port: int, stop: asyncio.Event, st: Stats) -> None:
    while not stop.is_set():
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.4", 0))
            w.write(random.choice([os.urandom(random.randrange(1, 4096)),
                                   D.UPGRADE_REQUEST + os.urandom(random.randrange(1, 4096))]))
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.read(), 15)
            w.close()
            st.garbage_conns += 1
        except OSError:
            await asyncio.sleep(0.2)


async def probe(a: DerpClient, b: DerpClient, stop: asyncio.Event, st: Stats) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        payload = i.to_bytes(8, "big") + bytes(56)
        t0 = time.perf_counter()
        await a.send(b.public_key, payload)
        while (ev := await b.recv()) is not None and not (
                isinstance(ev, ReceivedPacket) and ev.data == payload):
            pass
        st.rtts.append((time.perf_counter() - t0) * 1e3)
        await asyncio.sleep(0.05)


def fmt_kib(k: int) -> str:
    return f"{k / 1024:.1f} MiB"


async def soak(args: argparse.Namespace, port: int, pid: int) -> int:
    url = f"http://127.0.0.1:{port}/derp"
    st = Stats()
    idle_fds = D.open_fds(pid)
    t0 = time.perf_counter()
    clients = await connect_clients(url, args.clients)
    print(f"{len(clients)} clients logged in in {time.perf_counter() - t0:.1f} s")
    a, b = await connect_clients(url, 2)
    keys = [bytes(PrivateKey.generate()) for _ in range(200)]
    await D.churn(port, 1000, login=True, keys=keys)  # warm-up: allocator pools, caches
    rss_start = D.rss_kib(pid)
    print(f"start : RSS {fmt_kib(rss_start)}, fds {D.open_fds(pid)}")

    stop = asyncio.Event()
    peers = [c.public_key for c in clients]
    tasks = [asyncio.create_task(drain(c, st)) for c in clients]
    tasks += [asyncio.create_task(chatter(c, peers, stop, st)) for c in clients]
    tasks += [asyncio.create_task(churner(port, stop, st, keys)) for _ in range(8)]
    tasks += [asyncio.create_task(slowloris(port, stop, st)) for _ in range(SLOWLORIS_SOCKETS)]
    tasks += [asyncio.create_task(garbage(port, stop, st)) for _ in range(4)]
    tasks.append(asyncio.create_task(probe(a, b, stop, st)))

    await asyncio.sleep(args.duration / 2)
    print(f"middle: RSS {fmt_kib(D.rss_kib(pid))}, fds {D.open_fds(pid)}, "
          f"churn visits {st.churn_visits}, packets sent {st.packets_sent}")
    await asyncio.sleep(args.duration / 2)
    stop.set()
    # Let the slowloris and garbage sockets be cut or closed, then measure.
    await asyncio.sleep(REQUEST_DEADLINE + 2)
    rss_end = D.rss_kib(pid)
    print(f"end   : RSS {fmt_kib(rss_end)}, fds {D.open_fds(pid)}; growth "
          f"{(rss_end - rss_start) / 1024:+.1f} MiB over {st.churn_visits} churn visits, "
          f"{st.garbage_conns} garbage connections, {st.slowloris_cut} slowloris sockets cut")
    print(f"packets: {st.packets_sent} sent, {st.packets_received} received by clients")
    rtts = sorted(st.rtts) or [float("nan")]
    print(f"legitimate client RTT through the relay: median {statistics.median(rtts):.2f} ms, "
          f"p99 {rtts[max(0, int(len(rtts) * 0.99) - 1)]:.2f} ms ({len(rtts)} samples)")

    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in (*clients, a, b):
        await c.close()
    deadline = time.monotonic() + 15
    left = metric(port, "derp_current_connections")
    while (left or D.open_fds(pid) > idle_fds + 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        left = metric(port, "derp_current_connections")
    extra_fds = D.open_fds(pid) - idle_fds
    print(f"left over after every client closed: {left:.0f} DERP connections, "
          f"{extra_fds:+d} fds against the idle baseline")

    failed = []
    if rss_end - rss_start > args.rss_bound_mb * 1024:
        failed.append(f"RSS grew {(rss_end - rss_start) / 1024:.1f} MiB "
                      f"(bound {args.rss_bound_mb} MiB)")
    if left:
        failed.append(f"{left:.0f} DERP connections still counted")
    if extra_fds > 2:
        failed.append(f"{extra_fds} fds more than when idle")
    if st.churn_visits and st.churn_failures > st.churn_visits // 2:
        failed.append(f"{st.churn_failures} of {st.churn_visits} churn visits failed")
    if not st.rtts:
        failed.append("the latency probe got no answer")
    for f in failed:
        print(f"FAIL: {f}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--rss-bound-mb", type=float, default=16.0)
    args = ap.parse_args()
    limit = raise_nofile_limit()  # the derper child inherits it
    need = args.clients * 2 + SLOWLORIS_SOCKETS * 2 + 512
    if limit < need:
        print(f"RLIMIT_NOFILE is {limit}; need {need} for {args.clients} clients")
        return 2
    port = D.free_port()
    env = {**os.environ, "NODEAGENT_HTTP_REQUEST_TIMEOUT": str(REQUEST_DEADLINE)}
    proc = D.start_derper(port, env=env)
    try:
        return asyncio.run(soak(args, port, proc.pid))
    finally:
        D.stop_process(proc)


if __name__ == "__main__":
    sys.exit(main())
