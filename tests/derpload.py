"""Load generators against a running derper: connection churn, idle sockets, RSS readings.

Shared by the leak and lock-out tests and by ``benchmarks/derp_conns.py`` / ``benchmarks/soak.py``.
Everything speaks raw TCP so the load looks like a stranger's, not like our own client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO

from nacl.public import PrivateKey

from nodeagent.derp import frames as F
from tests.procutil import stop as stop_process  # the name the derper tests and benchmarks use

UPGRADE_REQUEST = (b"GET /derp HTTP/1.1\r\nHost: derp.test\r\nUpgrade: DERP\r\n"
                   b"Connection: Upgrade\r\n\r\n")
_SERVER_KEY_FRAME_LEN = F.FRAME_HEADER_LEN + len(F.MAGIC) + F.KEY_LEN


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_derper(port: int, *extra: str, env: dict[str, str] | None = None,
                 nofile: tuple[int, int] | None = None) -> subprocess.Popen[bytes]:
    """``derper --dev`` on 127.0.0.1:``port`` as a child process (STUN off); waits until it serves.

    ``nofile`` (soft, hard) is the child's RLIMIT_NOFILE at exec. Its stderr goes to a temporary
    file (a pipe nobody reads could fill and stall it): read it with :func:`stderr_text`.
    """
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeagent_derper.cli", "--dev", "-a", f"127.0.0.1:{port}",
         "--stun=false", *extra],
        stdout=subprocess.DEVNULL, stderr=err, env=env, preexec_fn=limit)
    _stderr[proc.pid] = err
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"derper exited: {stderr_text(proc)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError("derper did not start listening within 20 s")


_stderr: dict[int, IO[bytes]] = {}


def stderr_text(proc: subprocess.Popen[bytes]) -> str:
    """What a :func:`start_derper` child has written to stderr so far."""
    f = _stderr[proc.pid]
    f.seek(0)
    return f.read().decode(errors="replace")


async def _read_upgrade(reader: asyncio.StreamReader) -> bytes:
    """Read the 101 head and the ServerKey frame; return the server's public key."""
    await reader.readuntil(b"\r\n\r\n")
    frame = await reader.readexactly(_SERVER_KEY_FRAME_LEN)
    return F.decode_server_key(frame[F.FRAME_HEADER_LEN:])


async def upgrade_and_close(port: int, login: bool, client_key: bytes | None = None,
                            source: str | None = None) -> None:
    """One stranger's visit: upgrade to DERP, optionally log in (read ServerInfo), close."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0) if source else None)
    try:
        writer.write(UPGRADE_REQUEST)
        server_pub = await _read_upgrade(reader)
        if login:
            key = client_key or bytes(PrivateKey.generate())
            writer.write(F.encode_client_info(key, server_pub, {"version": F.PROTOCOL_VERSION}))
            head = await reader.readexactly(F.FRAME_HEADER_LEN)
            await reader.readexactly(int.from_bytes(head[1:5], "big"))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def churn(port: int, cycles: int, *, login: bool, parallel: int = 32,
                keys: Sequence[bytes] = ()) -> int:
    """Run ``cycles`` upgrade(-and-login)-and-close visits, ``parallel`` at a time.

    ``keys`` (optional) are client private keys reused round-robin, so a login churn does not
    also measure key generation. Returns the number of visits that failed.
    """
    failures = 0
    next_i = 0

    async def worker() -> None:
        nonlocal failures, next_i
        while next_i < cycles:
            i = next_i
            next_i += 1
            key = keys[i % len(keys)] if keys else None
            try:
                await asyncio.wait_for(upgrade_and_close(port, login, key), 10)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, F.FrameError):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return failures


def silent_sockets(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """``n`` TCP connections that never send a byte (the slowloris half of an attack)."""
    out = []
    try:
        for _ in range(n):
            s = socket.socket()
            out.append(s)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(socks: Sequence[socket.socket]) -> None:
    for s in socks:
        s.close()


def closed_by_peer(socks: Sequence[socket.socket], timeout: float) -> int:
    """Wait up to ``timeout`` for the server to close the sockets; return how many it closed."""
    import select

    pending = {s.fileno(): s for s in socks}
    closed = 0
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while pending and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(left * 1000):
            s = pending.pop(fd, None)
            if s is None:
                continue
            poller.unregister(fd)
            try:
                data = s.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pending[fd] = s
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
                continue
            except OSError:
                data = b""
            if data == b"":
                closed += 1
            # bytes (an HTTP error answer) are followed by a close: keep waiting for it
            else:
                pending[fd] = s
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return closed


def login_within(port: int, timeout: float, source: str = "127.0.0.1") -> float:
    """Log a fresh client in from ``source``; return the seconds it took (raises on failure)."""
    t0 = time.monotonic()
    asyncio.run(asyncio.wait_for(upgrade_and_close(port, True, source=source), timeout))
    return time.monotonic() - t0
