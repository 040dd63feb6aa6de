"""Test harness: two agents' data planes in two network namespaces, joined by a plain relay.

Each side has a real kernel TUN device living in its own namespace, driven by the Wrapper and the
transport-independent Engine in this process; the relay hands packets from one engine to the
other unencrypted (standing in for WireGuard). Applications are real kernel sockets opened from
threads switched into the namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from nodeagent.engine.core import Engine, PeerConfig, PeerState
from nodeagent.filter import Filter, parse_rules
from nodeagent.packet import endpoint_str
from nodeagent.tundev.device import TunDevice
from nodeagent.tundev.wrapper import Wrapper
from tests.netns import in_netns, make_netns

V4 = {"a": "100.64.0.1", "b": "100.64.0.2"}
V6 = {"a": "fd7a:115c:a1e0::1", "b": "fd7a:115c:a1e0::2"}
TAILNET_ROUTES = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]


class RelayTransport:
    """Moves packets to the other engine on the event loop, like an unencrypted wire."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.engines: dict[str, Engine] = {}  # peer key → that peer's engine
        self.configured: set[str] = set()
        self.unreachable: set[str] = set()

    def send(self, peer_key: str, pkts: list[bytes]) -> None:
        eng = self.engines.get(peer_key)
        if eng is not None and peer_key not in self.unreachable:
            self.loop.call_soon(eng.deliver, pkts)

    def configure(self, peers: list[PeerConfig]) -> None:
        self.configured = {p.key for p in peers}

    def peer_state(self, peer_key: str) -> PeerState:
        return PeerState(configured=peer_key in self.configured,
                         reachable=peer_key not in self.unreachable)


@dataclass
class Note:
    at: float
    direction: str
    proto: int
    src: str
    dst: str
    reason: str
    source: str
    maybe_broken: bool


@dataclass
class Side:
    name: str
    ns: str
    tun: TunDevice
    wrapper: Wrapper
    engine: Engine
    notes: list[Note] = field(default_factory=list)

    def note(self, direction: str, proto: int, version: int, src_ip: int, src_port: int,
             dst_ip: int, dst_port: int, reason: str, source: str, maybe_broken: bool) -> None:
        self.notes.append(Note(time.monotonic(), direction, proto,
                               endpoint_str(version, src_ip, src_port),
                               endpoint_str(version, dst_ip, dst_port), reason, source,
                               maybe_broken))

    async def wait_note(self, pred: Callable[[Note], bool], timeout: float) -> Note:
        deadline = time.monotonic() + timeout
        while True:
            for n in self.notes:
                if pred(n):
                    return n
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no matching note within {timeout}s; "
                                     f"have {self.notes}")
            await asyncio.sleep(0.02)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking socket function in a thread inside this side's namespace."""

        def call() -> Any:
            with in_netns(self.ns):
                return fn(*args)

        return await asyncio.to_thread(call)


def node_key(name: str) -> str:
    return "nodekey:" + (name.encode().hex() * 32)[:64]


@contextlib.asynccontextmanager
async def pair(rules_b: list[dict[str, Any]], rules_a: list[dict[str, Any]] | None = None, *,
               fast_failure: bool = True, shields_b: bool = False) -> AsyncIterator[
                   tuple[Side, Side]]:
    """Sides A and B. ``rules_*`` are FilterRules (Tailscale JSON shape) for inbound traffic."""
    loop = asyncio.get_running_loop()
    relay = RelayTransport(loop)
    with contextlib.ExitStack() as stack:
        sides: dict[str, Side] = {}
        for name, rules in (("a", rules_a or []), ("b", rules_b)):
            ns = stack.enter_context(make_netns(f"na{name}"))
            addrs = [f"{V4[name]}/32", f"{V6[name]}/128"]
            tun = TunDevice.create(f"tn{name}{os.getpid() % 10000}", mtu=1280, addresses=addrs,
                                   routes=TAILNET_ROUTES, netns=ns)
            stack.callback(tun.close)
            filt = Filter(parse_rules(rules), addrs, shields_up=shields_b and name == "b")
            wrapper = Wrapper(tun, filt)
            engine = Engine(wrapper, relay, loop=loop, fast_failure=fast_failure)
            stack.callback(engine.close)
            side = Side(name, ns, tun, wrapper, engine)
            wrapper.set_conn_reject_note(side.note)
            engine.set_conn_reject_note(side.note)
            relay.engines[node_key(name)] = engine
            sides[name] = side
        for name, other in (("a", "b"), ("b", "a")):
            sides[name].engine.configure([PeerConfig(
                key=node_key(other), name=other,
                allowed_ips=[f"{V4[other]}/32", f"{V6[other]}/128"])])
            sides[name].wrapper.start(loop)
        yield sides["a"], sides["b"]


# --- blocking application helpers (run inside a namespace thread) --------------------------

def connect(addr: str, port: int, timeout: float) -> tuple[str, float]:
    """Try a TCP connect; return (outcome, seconds) where outcome is connected/refused/timeout
    or the error's name."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    t0 = time.monotonic()
    try:
        s.connect((addr, port))
        return "connected", time.monotonic() - t0
    except ConnectionRefusedError:
        return "refused", time.monotonic() - t0
    except TimeoutError:
        return "timeout", time.monotonic() - t0
    except OSError as e:
        return type(e).__name__ + f"({e.errno})", time.monotonic() - t0
    finally:
        s.close()


@contextlib.contextmanager
def listening(ns: str, addr: str, port: int) -> Iterator[None]:
    """A TCP listener in ``ns`` that never accepts: the kernel completes handshakes into its
    backlog, so a connect succeeds exactly when the path and the policy let the SYN through
    (where nothing listens, the host's own RST would say "refused" whatever the policy)."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with in_netns(ns):
        srv = socket.socket(fam, socket.SOCK_STREAM)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(1024)
        yield
    finally:
        srv.close()


@contextlib.contextmanager
def sink_server(ns: str, addr: str, port: int) -> Iterator[dict[str, Any]]:
    """A TCP server in ``ns`` that reads one connection to EOF and replies with its SHA-256."""
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with in_netns(ns):
        srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(4)
    srv.settimeout(30)
    result: dict[str, Any] = {}

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError as e:
            result["error"] = e
            return
        with conn:
            conn.settimeout(30)
            h = hashlib.sha256()
            n = 0
            while chunk := conn.recv(65536):
                h.update(chunk)
                n += len(chunk)
            result["bytes"] = n
            conn.sendall(h.digest())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield result
    finally:
        srv.close()
        t.join(5)


def send_blob(addr: str, port: int, blob: bytes) -> bytes:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect((addr, port))
        s.sendall(blob)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(64):
            out += chunk
        return out
