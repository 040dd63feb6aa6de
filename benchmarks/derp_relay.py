"""Benchmark: relay 1400-byte packets between two DERP clients, against a plain TCP relay.

The DerpServer runs behind aiohttp in its own process (as derper would); the sender and the
receiver run here. In the same run the same bytes (identical frames) go through a plain TCP
relay — socat ``TCP-LISTEN,fork TCP:...`` when installed, else a small asyncio relay — to a
sink. Both legs use the same in-flight window so neither overflows queues. Prints packets/s,
MB/s and the ratio DERP / baseline.

    python3 benchmarks/derp_relay.py [--packets 200000] [--size 1400] [--window 256]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time

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
        app = web.Application()
        app.router.add_route("*", "/derp", srv.handle_http)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--window", type=int, default=256, help="frames in flight")
    args = ap.parse_args()
    total = args.packets - args.packets % 32
    proc, port, key = start_derp_process()
    loopname = _use_uvloop()
    try:
        derp_dt = asyncio.run(bench_derp(port, key, total, args.size, args.window))
        tcp_dt, kind = asyncio.run(bench_tcp(total, args.size, args.window))
    finally:
        proc.terminate()
        proc.join(5)
    mb = total * (args.size + 37) / 1e6
    print(f"packets: {total} x {args.size} B payload, window {args.window}, loop {loopname}")
    print(f"DERP relay : {total / derp_dt:12,.0f} pkt/s  {mb / derp_dt:8.1f} MB/s"
          f"  ({derp_dt:.2f} s)")
    print(f"TCP relay  : {total / tcp_dt:12,.0f} pkt/s  {mb / tcp_dt:8.1f} MB/s"
          f"  ({tcp_dt:.2f} s)  [{kind}]")
    print(f"ratio DERP/TCP throughput: {tcp_dt / derp_dt:.2f}")


if __name__ == "__main__":
    main()
