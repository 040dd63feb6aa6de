"""Helpers for the DERP mesh tests (tests/integration/test_derper_mesh.py): derper processes on
loopback with one shared self-signed certificate, DERP clients collecting packets, delivery with
resends while routes spread, and a TCP proxy that splits successive connections across nodes."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PrivateKey

from nodeagent.derp.client import DerpClient, ReceivedPacket
from nodeagent.derp.frames import ProtocolError
from tests.derptls import TAILSCALE_DIR
from tests.procutil import stop

DERPER = [sys.executable, "-m", "nodeagent_derper.cli"]
MESH_KEY = "5e" * 32
DERPCHECK = TAILSCALE_DIR / "derpcheck"
_seq = itertools.count()


@dataclass
class Node:
    port: int
    workdir: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/derp"

    def start(self) -> None:
        self.log = open(os.path.join(self.workdir, "stderr.log"), "ab")
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.log,
                                     env=self.env)

    def kill(self) -> None:
        stop(self.proc, signal.SIGKILL)
        if self.log is not None:
            self.log.close()
            self.log = None

    def stderr(self) -> str:
        with open(os.path.join(self.workdir, "stderr.log"), errors="replace") as f:
            return f.read()[-3000:]


@dataclass
class Fleet:
    nodes: list[Node]
    cafile: str
    ctx: ssl.SSLContext
    tmp: str
    extra: list[Any] = field(default_factory=list)

    def vars(self, i: int) -> dict[str, Any]:
        url = f"https://127.0.0.1:{self.nodes[i].port}/debug/vars"
        with urllib.request.urlopen(url, timeout=5, context=self.ctx) as r:
            return json.loads(r.read())

    def varz(self, i: int) -> str:
        url = f"https://127.0.0.1:{self.nodes[i].port}/debug/varz"
        with urllib.request.urlopen(url, timeout=5, context=self.ctx) as r:
            return r.read().decode()


def make_certdir(tmp: str) -> tuple[str, str]:
    """One self-signed certificate for 127.0.0.1, served by every node and trusted by all."""
    from nodeagent_derper.certs import ensure_self_signed_for_ip

    certdir = os.path.join(tmp, "certs")
    ensure_self_signed_for_ip(certdir, "127.0.0.1")
    return certdir, os.path.join(certdir, "127.0.0.1.crt")


def our_args(port: int, workdir: str, certdir: str, psk: str, mesh_with: str) -> list[str]:
    return [*DERPER, "-a", f"127.0.0.1:{port}", "-certmode", "manual", "-certdir", certdir,
            "-hostname", "127.0.0.1", "-http-port", "-1", "-stun=false",
            "-c", os.path.join(workdir, "derper.key"), "-mesh-psk-file", psk,
            "-mesh-with", mesh_with]


def wait_for(cond: Any, timeout: float, what: str) -> float:
    """Poll ``cond`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    last: Any = None
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception as e:  # not up yet
            last = e
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s (last error: {last})")
        time.sleep(0.05)


def mesh_connected(fleet: Fleet, i: int, n: int) -> bool:
    return bool(fleet.vars(i)["mesh"]["peers_connected"] == n)



# --- DERP clients -------------------------------------------------------------------------------


class Client:
    """A DERP client whose received packets collect in a queue."""

    def __init__(self, c: DerpClient) -> None:
        self.c = c
        self.key = c.public_key
        self.q: asyncio.Queue[ReceivedPacket] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str, ctx: ssl.SSLContext, key: bytes | None = None) -> Client:
        return cls(await DerpClient.connect(url, key or bytes(PrivateKey.generate()), ssl=ctx))

    async def _read(self) -> None:
        try:
            while True:
                for ev in await self.c.recv_batch():
                    if isinstance(ev, ReceivedPacket):
                        self.q.put_nowait(ev)
        except (ConnectionError, ProtocolError, OSError):
            pass

    async def close(self) -> None:
        self.task.cancel()
        await self.c.close()


async def deliver(a: Client, b: Client, timeout: float = 10.0) -> float:
    """Send a fresh packet a → b, resending until it arrives (routes may still be spreading).
    Returns how long it took."""
    data = f"mesh packet {next(_seq)}".encode()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        await a.c.send(b.key, data)
        end = loop.time() + 0.2
        while (left := end - loop.time()) > 0:
            try:
                ev = await asyncio.wait_for(b.q.get(), left)
            except TimeoutError:
                break
            if ev.src == a.key and ev.data == data:
                return loop.time() - t0
        if loop.time() - t0 > timeout:
            raise AssertionError(f"packet from {a.key.hex()[:8]} to {b.key.hex()[:8]} not "
                                 f"delivered within {timeout}s")


async def burst(a: Client, b: Client, n: int = 300) -> None:
    """``n`` packets a → b over an established route: all arrive, in order."""
    pkts = [f"burst {i} ".encode() * 20 for i in range(n)]
    for p in pkts:
        a.c.send_nowait(b.key, p)
    await a.c.drain()
    got = []
    while len(got) < n:
        ev = await asyncio.wait_for(b.q.get(), 10)
        if ev.src == a.key:
            got.append(ev.data)
    assert got == pkts



async def connect_retrying(url: str, ctx: ssl.SSLContext, timeout: float = 20) -> Client:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await Client.connect(url, ctx)
        except (OSError, ProtocolError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)  # the restarted derper is not listening yet



async def split_proxy(targets: list[int]) -> tuple[asyncio.Server, list[int]]:
    """A TCP proxy on loopback: its k-th connection goes to ``targets[k % len(targets)]``."""
    counter = itertools.count()
    used: list[int] = []

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        port = targets[next(counter) % len(targets)]
        used.append(port)
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, used



def ts_varz(port: int, ctx: ssl.SSLContext) -> dict[str, float]:
    url = f"https://127.0.0.1:{port}/debug/varz"
    with urllib.request.urlopen(url, timeout=5, context=ctx) as r:
        out = {}
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#") and " " in line:
                name, _, v = line.rpartition(" ")
                out[name] = float(v)
        return out


