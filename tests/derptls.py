"""Test DERP relays on loopback, served over TLS the way the DERP map reaches them.

``TLSDerper`` runs our derper in-process in ``--certmode manual`` with the IP hostname
127.0.0.1 (it makes itself a self-signed certificate); ``tailscale_derper`` runs Tailscale's real
``derper`` binary the same way. Their DERP map nodes say ``InsecureForTests: true`` with
``IPv4: 127.0.0.1`` and the listening ``DERPPort`` (the agent's DERP client does no plain HTTP
unless told to). ``inproc_derpers`` makes in-process derpers with any options and stops them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

TAILSCALE_DIR = Path(__file__).resolve().parents[2] / "shared" / "tools" / "tailscale"
TAILSCALE_DERPER = TAILSCALE_DIR / "derper"
TAILSCALE_CLI = TAILSCALE_DIR / "tailscale"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node(port: int, *, stun_port: int = -1, name: str = "900a", region: int = 900,
         insecure: bool = True, cert_name: str = "") -> DERPNode:
    return DERPNode(Name=name, RegionID=region, HostName="127.0.0.1", IPv4="127.0.0.1",
                    DERPPort=port, STUNPort=stun_port, InsecureForTests=insecure,
                    CertName=cert_name)


def region(rid: int, *nodes: DERPNode, code: str = "") -> DERPRegion:
    return DERPRegion(RegionID=rid, RegionCode=code or f"r{rid}", RegionName=f"test {rid}",
                      Nodes=list(nodes))


def derp_map(*regions: DERPRegion) -> DERPMap:
    return DERPMap(Regions={r.RegionID: r for r in regions})


def cert_pin(certdir: str, host: str = "127.0.0.1") -> str:
    """``sha256-raw:<hex>`` of the certificate a manual-mode derper serves from ``certdir``."""
    import ssl

    with open(os.path.join(certdir, f"{host}.crt")) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


@asynccontextmanager
async def inproc_derpers(**defaults: Any) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``make(**options)``: start one of our derpers in this event loop (a fresh key, ``addr``
    127.0.0.1:0, then ``defaults``, then ``options``, as ``DerperOptions``); every derper made is
    stopped when the block ends."""
    from nodeagent_derper.app import Derper, DerperOptions

    made: list[Any] = []

    async def make(**kw: Any) -> Any:
        opts: dict[str, Any] = {"private_key": bytes(PrivateKey.generate()),
                                "addr": "127.0.0.1:0", **defaults, **kw}
        d = Derper(DerperOptions(**opts))
        made.append(d)
        await d.start()
        return d

    try:
        yield make
    finally:
        for d in made:
            await d.stop()


class TLSDerper:
    """Our derper in this event loop: TLS (self-signed for 127.0.0.1) and STUN on loopback.
    ``restart()`` brings a stopped one back on the same ports with the same key."""

    def __init__(self, port: int = 0, key: bytes | None = None) -> None:
        self.key = key or bytes(PrivateKey.generate())
        self.certdir = tempfile.mkdtemp(prefix="na-derpcert-")
        self.port = port
        self.stun_port = 0
        self.derper: Any = None

    @property
    def public_key(self) -> bytes:
        return bytes(PrivateKey(self.key).public_key)

    async def start(self) -> TLSDerper:
        from nodeagent_derper.app import Derper, DerperOptions

        opts = DerperOptions(private_key=self.key, addr=f"127.0.0.1:{self.port}",
                             hostname="127.0.0.1", certmode="manual", certdir=self.certdir,
                             http_port=-1, stun_port=self.stun_port)
        d = Derper(opts)
        await d.start()
        self.derper = d
        self.port, self.stun_port = d.main_port, d.stun_port
        return self

    async def stop(self, graceful: bool = False) -> None:
        if self.derper is not None:
            await self.derper.stop(graceful=graceful)
            self.derper = None

    async def restart(self) -> None:
        deadline = time.monotonic() + 5
        while True:
            try:
                await self.start()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        return self.derper._derp.stats()

    def node(self, **kw: Any) -> DERPNode:
        kw.setdefault("stun_port", self.stun_port)
        return node(self.port, **kw)

    def cleanup(self) -> None:
        shutil.rmtree(self.certdir, ignore_errors=True)


def _wait_tcp(port: int, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"derper exited with {proc.returncode}: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"derper did not listen on {port} within {timeout}s")


@contextmanager
def tailscale_derper() -> Iterator[tuple[int, int]]:
    """Tailscale's derper on loopback in manual cert mode (a self-signed certificate for
    127.0.0.1): yields (TLS port, STUN port)."""
    d = tempfile.mkdtemp(prefix="na-tsderper-")
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    proc = subprocess.Popen(
        [str(TAILSCALE_DERPER), "-a", f"127.0.0.1:{port}", "-certmode", "manual",
         "-certdir", os.path.join(d, "certs"), "-hostname", "127.0.0.1", "-http-port", "-1",
         "-stun-port", str(stun), "-c", os.path.join(d, "derper.key")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_tcp(port, proc)
        yield port, stun
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(d, ignore_errors=True)


async def until(cond: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)
