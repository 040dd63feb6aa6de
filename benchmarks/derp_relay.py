"""Benchmark: relay 1400-byte packets between two DERP clients, against a plain TCP relay.

The DerpServer runs behind aiohttp in its own process (as derper would); the sender and the
receiver run here. In the same run the same bytes (identical frames) go through a plain TCP
relay — socat ``TCP-LISTEN,fork TCP:...`` when installed, else a small asyncio relay — to a
sink. Both legs use the same in-flight window so neither overflows queues. The legs alternate
``--runs`` times; prints packets/s and MB/s of each, the ratio DERP / baseline per run and the
medians, and the relay process's CPU time per packet.

``--pairs N`` (N > 1) adds a third leg to every run: N sender/receiver pairs through the same
DerpServer, the same total bytes, ``--pair-window`` frames in flight per pair. It prints the
relay's packet rate against its one-pair rate of the same run, the longest per-client send queue
the server held (sampled every 5 ms; bounded by ``send_queue_depth``) and the server's drops by
reason (its stats, fetched over HTTP from the relay process). On a small machine the clients'
process competes with the relay for the CPU, so the relay's CPU time per packet (one pair
against many) is printed too.

    python3 benchmarks/derp_relay.py [--packets 200000] [--size 1400] [--window 256] [--runs 3]
        [--pairs 100] [--pair-window 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."),
                os.path.join(os.path.dirname(__file__), "..", "features", "derper")]

from nacl.public import PrivateKey  # noqa: E402

from nodeagent.derp import frames as F  # noqa: E402
from nodeagent.derp.client import DerpClient  # noqa: E402
from tests.procutil import stop  # noqa: E402


def _use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def serve_derp(conn: object, keepalive: float = 3600.0) -> None:
    """Child process: aiohttp app with only /derp, port sent back over the pipe."""
    _use_uvloop()
    from aiohttp import web
    from nodeagent_derper.server import DerpServer

    async def main() -> None:
        srv = DerpServer(bytes(PrivateKey.generate()), keepalive_interval=keepalive)
        peak = {"q_other": 0, "q_disco": 0, "q_ctrl": 0}

        async def sample_queues() -> None:
            while True:
                await asyncio.sleep(0.005)
                for c in srv.live:
                    for name in peak:
                        q = getattr(c, name)
                        if q and len(q) > peak[name]:
                            peak[name] = len(q)

        async def stats(request: web.Request) -> web.Response:
            return web.json_response({"stats": srv.stats(), "peak_queue": peak,
                                      "send_queue_depth": srv.send_queue_depth})

        sampler = asyncio.get_running_loop().create_task(sample_queues())  # noqa: F841
        app = web.Application()
        app.router.add_route("*", "/derp", srv.handle_http)
        app.router.add_get("/bench/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(srv.wrap_protocol_factory(runner.server),
                                          "127.0.0.1", 0, backlog=4096)
        conn.send((server.sockets[0].getsockname()[1], srv.public_key))  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


def start_derp_process(**kw: object) -> tuple[mp.Process, int, bytes]:
    parent, child = mp.Pipe()
    p = mp.Process(target=serve_derp, args=(child,), kwargs=kw, daemon=True)
    p.start()
    port, key = parent.recv()
    return p, port, key


class Counter(asyncio.Protocol):
    """Receiving end: counts bytes and wakes the sender when the window opens."""

    def __init__(self) -> None:
        self.nbytes = 0
        self.event = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        self.event.set()


async def pump(write: object, chunk: bytes, per_chunk: int, frame_len: int, total: int,
               window: int, sink: Counter, skip: int) -> float:
    """Send ``total`` frames in chunks, keeping at most ``window`` frames unreceived."""
    sent = 0
    t0 = time.perf_counter()
    goal = skip + total * frame_len
    while sent < total:
        while sent - (sink.nbytes - skip) // frame_len >= window:
            sink.event.clear()
            await sink.event.wait()
        write(chunk)  # type: ignore[operator]
        sent += per_chunk
        await asyncio.sleep(0)
    while sink.nbytes < goal:
        sink.event.clear()
        await asyncio.wait_for(sink.event.wait(), 10)
    return time.perf_counter() - t0


async def bench_derp(port: int, server_key: bytes, total: int, size: int, window: int
                     ) -> float:
    url = f"http://127.0.0.1:{port}/derp"
    a = await DerpClient.connect(url, bytes(PrivateKey.generate()), server_public_key=server_key)
    b = await DerpClient.connect(url, bytes(PrivateKey.generate()), server_public_key=server_key)
    return await relay_between(a, b, total, size, window)


async def relay_between(a: DerpClient, b: DerpClient, total: int, size: int, window: int
                        ) -> float:
    """Send ``total`` packets of ``size`` bytes from ``a`` to ``b`` and return the seconds it
    took; closes both clients."""
    # Take over b's socket: count bytes straight from the transport.
    sink = Counter()
    b._writer.transport.set_protocol(sink)  # type: ignore[attr-defined]
    skip = len(b._reader._buffer)  # type: ignore[attr-defined]
    sink.nbytes = skip
    per = 32
    chunk = F.encode_send_packet(b.public_key, os.urandom(size)) * per
    frame_len = F.FRAME_HEADER_LEN + F.KEY_LEN + size
    dt = await pump(a._writer.write, chunk, per, frame_len, total, window, sink, skip)
    await a.close()
    b._writer.transport.close()  # type: ignore[attr-defined]
    return dt


async def _asyncio_relay(listen_port_holder: list[int], target: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    class Pipe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf: list[bytes] = []
            self.peer: asyncio.Transport | None = None

            class Back(asyncio.Protocol):
                def data_received(s, data: bytes) -> None:
                    self.t.write(data)  # type: ignore[attr-defined]

            async def dial() -> None:
                tr, _ = await loop.create_connection(Back, "127.0.0.1", target)
                self.peer = tr  # type: ignore[assignment]
                for d in self.buf:
                    tr.write(d)

            self.dial_task = loop.create_task(dial())

        def data_received(self, data: bytes) -> None:
            if self.peer is None:
                self.buf.append(data)
            else:
                self.peer.write(data)

    srv = await loop.create_server(Pipe, "127.0.0.1", 0)
    listen_port_holder.append(srv.sockets[0].getsockname()[1])
    return srv


async def bench_tcp(total: int, size: int, window: int) -> tuple[float, str]:
    loop = asyncio.get_running_loop()
    sink = Counter()
    accepted = asyncio.Event()

    def factory() -> Counter:
        accepted.set()
        return sink

    sink_srv = await loop.create_server(factory, "127.0.0.1", 0)
    sink_port = sink_srv.sockets[0].getsockname()[1]
    proc = None
    relay_srv = None
    if shutil.which("socat"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        relay_port = s.getsockname()[1]
        s.close()
        proc = subprocess.Popen(["socat", f"TCP-LISTEN:{relay_port},bind=127.0.0.1,reuseaddr,fork",
                                 f"TCP:127.0.0.1:{sink_port}"])
        kind = "socat"
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", relay_port)
                break
            except OSError:
                await asyncio.sleep(0.02)
    else:
        holder: list[int] = []
        relay_srv = await _asyncio_relay(holder, sink_port)
        relay_port = holder[0]
        kind = "asyncio relay (socat not installed)"
        _, w = await asyncio.open_connection("127.0.0.1", relay_port)
    await asyncio.wait_for(accepted.wait(), 5)
    per = 32
    chunk = F.encode_send_packet(bytes(32), os.urandom(size)) * per
    frame_len = F.FRAME_HEADER_LEN + F.KEY_LEN + size
    dt = await pump(w.write, chunk, per, frame_len, total, window, sink, 0)
    w.close()
    sink_srv.close()
    stop(proc, timeout=5)
    if relay_srv is not None:
        relay_srv.close()
    return dt, kind


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/bench/stats", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


class Stalled(Exception):
    """A pair stopped receiving (its packets were dropped): the run reports, not hangs."""


async def pump_pair(write: Any, chunk: bytes, per_chunk: int, frame_len: int, total: int,
                    window: int, sink: Counter, skip: int, stall: float = 5.0) -> None:
    """:func:`pump` for one of many pairs; raises :class:`Stalled` when nothing arrives."""
    sent = 0
    goal = skip + total * frame_len
    while sent < total:
        while sent - (sink.nbytes - skip) // frame_len >= window:
            sink.event.clear()
            try:
                await asyncio.wait_for(sink.event.wait(), stall)
            except TimeoutError:
                raise Stalled from None
        write(chunk)
        sent += per_chunk
        await asyncio.sleep(0)
    while sink.nbytes < goal:
        sink.event.clear()
        try:
            await asyncio.wait_for(sink.event.wait(), stall)
        except TimeoutError:
            raise Stalled from None


async def bench_pairs(port: int, server_key: bytes, total: int, size: int, window: int,
                      pairs: int, pid: int) -> tuple[float, int, int, float, float]:
    """``pairs`` sender/receiver pairs at once, ``total`` packets in all.

    Returns (seconds, packets delivered, pairs that stalled, relay CPU seconds, this process's
    CPU seconds), the times taken over the transfer only (logins excluded)."""
    url = f"http://127.0.0.1:{port}/derp"
    sem = asyncio.Semaphore(64)

    async def connect() -> DerpClient:
        async with sem:
            return await DerpClient.connect(url, bytes(PrivateKey.generate()),
                                            server_public_key=server_key, timeout=60)

    clients = await asyncio.gather(*(connect() for _ in range(2 * pairs)))
    per = min(16, window)
    each = max(per, total // pairs // per * per)
    frame_len = F.FRAME_HEADER_LEN + F.KEY_LEN + size
    payload = os.urandom(size)
    jobs = []
    sinks = []
    for i in range(pairs):
        a, b = clients[2 * i], clients[2 * i + 1]
        sink = Counter()
        b._writer.transport.set_protocol(sink)  # type: ignore[attr-defined]
        skip = len(b._reader._buffer)  # type: ignore[attr-defined]
        sink.nbytes = skip
        sinks.append((sink, skip))
        chunk = F.encode_send_packet(b.public_key, payload) * per
        jobs.append(pump_pair(a._writer.write, chunk, per, frame_len, each, window, sink, skip))
    c0, m0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    dt = time.perf_counter() - t0
    cpu, mine = cpu_seconds(pid) - c0, time.process_time() - m0
    stalled = sum(1 for r in results if isinstance(r, Stalled))
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, Stalled):
            raise r
    delivered = sum((s.nbytes - skip) // frame_len for s, skip in sinks)
    for i, c in enumerate(clients):
        if i % 2:
            c._writer.transport.close()  # type: ignore[attr-defined]
        else:
            await c.close()
    return dt, delivered, stalled, cpu, mine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--window", type=int, default=256, help="frames in flight (one pair)")
    ap.add_argument("--runs", type=int, default=3, help="alternating DERP/TCP runs")
    ap.add_argument("--pairs", type=int, default=1,
                    help="also relay through this many pairs at once (same total bytes)")
    ap.add_argument("--pair-window", type=int, default=0,
                    help="frames in flight per pair in the many-pair leg (default: --window)")
    args = ap.parse_args()
    total = args.packets - args.packets % 32
    pair_window = args.pair_window or args.window
    proc, port, key = start_derp_process()
    pid = proc.pid
    assert pid is not None
    loopname = _use_uvloop()
    mb = total * (args.size + 37) / 1e6
    print(f"packets: {total} x {args.size} B payload, window {args.window}, loop {loopname}")
    derp_rates: list[float] = []
    tcp_rates: list[float] = []
    ratios: list[float] = []
    cpu_us: list[float] = []
    pair_rates: list[float] = []
    pair_ratios: list[float] = []
    pair_cpu_us: list[float] = []
    kind = ""
    st = None
    try:
        for run in range(1, args.runs + 1):
            c0 = cpu_seconds(pid)
            derp_dt = asyncio.run(bench_derp(port, key, total, args.size, args.window))
            cpu_us.append((cpu_seconds(pid) - c0) / total * 1e6)
            tcp_dt, kind = asyncio.run(bench_tcp(total, args.size, args.window))
            derp_rates.append(total / derp_dt)
            tcp_rates.append(total / tcp_dt)
            ratios.append(tcp_dt / derp_dt)
            print(f"run {run}: DERP {total / derp_dt:10,.0f} pkt/s {mb / derp_dt:7.1f} MB/s"
                  f" ({cpu_us[-1]:.2f} us CPU/pkt) | TCP {total / tcp_dt:10,.0f} pkt/s"
                  f" {mb / tcp_dt:7.1f} MB/s | ratio DERP/TCP {ratios[-1]:.2f}", flush=True)
            if args.pairs > 1:
                dt, delivered, stalled, cpu, mine = asyncio.run(bench_pairs(
                    port, key, total, args.size, pair_window, args.pairs, pid))
                pair_cpu_us.append(cpu / max(1, delivered) * 1e6)
                pair_rates.append(delivered / dt)
                pair_ratios.append(pair_rates[-1] / derp_rates[-1])
                print(f"run {run}: {args.pairs} pairs {delivered / dt:10,.0f} pkt/s"
                      f" ({pair_cpu_us[-1]:.2f} us CPU/pkt; clients' process"
                      f" {mine / max(1, delivered) * 1e6:.2f} us/pkt; {delivered} delivered,"
                      f" {stalled} pairs stalled) | ratio to one pair {pair_ratios[-1]:.2f},"
                      f" relay CPU per packet one pair / {args.pairs} pairs"
                      f" {cpu_us[-1] / pair_cpu_us[-1]:.2f}",
                      flush=True)
        if args.pairs > 1:
            st = server_stats(port)
    finally:
        proc.terminate()
        proc.join(5)
    med = statistics.median
    print(f"median DERP relay : {med(derp_rates):12,.0f} pkt/s  "
          f"{med(derp_rates) * (args.size + 37) / 1e6:8.1f} MB/s  ({med(cpu_us):.2f} us CPU/pkt)")
    print(f"median TCP relay  : {med(tcp_rates):12,.0f} pkt/s  "
          f"{med(tcp_rates) * (args.size + 37) / 1e6:8.1f} MB/s  [{kind}]")
    print(f"median ratio DERP/TCP throughput: {med(ratios):.2f} (runs: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    if st is not None:
        print(f"median {args.pairs} pairs: {med(pair_rates):12,.0f} pkt/s "
              f"({med(pair_cpu_us):.2f} us CPU/pkt); ratio to one pair {med(pair_ratios):.2f} "
              f"(runs: {', '.join(f'{r:.2f}' for r in pair_ratios)}); relay CPU per packet, "
              f"one pair / {args.pairs} pairs: {med(cpu_us) / med(pair_cpu_us):.2f}")
        depth = st["send_queue_depth"]
        peak = st["peak_queue"]
        ok = max(peak["q_other"], peak["q_disco"]) <= depth
        print(f"longest send queue seen: {peak} (send_queue_depth {depth}: "
              f"{'bounded' if ok else 'EXCEEDED'})")
        s = st["stats"]
        print(f"server: packets received {s['packets_received']}, sent {s['packets_sent']}; "
              f"drops by reason: {s['packets_dropped'] or 'none'}")

if __name__ == "__main__":
    main()
