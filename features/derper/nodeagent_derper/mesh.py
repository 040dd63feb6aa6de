"""DERP mesh: forwarding packets between the derpers of one region (``--mesh-with``).

Owns three things:

* :class:`RouteTable` — sans-IO bookkeeping of which client keys are connected on which mesh
  peer, fed by the peers' PeerPresent / PeerGone frames. A key seen on several peers keeps all of
  them, most recent first; a PeerGone removes only that peer's claim; a dropped peer connection
  forgets everything learned from it. :attr:`RouteTable.best` is the plain dict the relay's hot
  path reads (the relay checks its local clients first: local wins).
* :class:`MeshPeer` — one mesh peer: a task that logs in to it as a mesh client (ClientInfo with
  the mesh key, signed with this derper's own private key), sends WatchConns, feeds the table,
  and reconnects with jittered exponential backoff. :meth:`MeshPeer.forward` is called by the
  relay for a packet whose destination lives on that peer: it queues a ForwardPacket frame
  without awaiting, written once per event-loop pass; when the connection's write buffer is
  over its bound the packet is dropped and counted.
* :class:`Mesh` — the set of peers of one derper, their start/stop, stats and Prometheus view.

Entries of ``--mesh-with`` are host names (dialled as ``https://HOST/derp``, Tailscale's rule),
``host:port``, or full ``http(s)://`` URLs. TLS is verified against the system trust store
(``SSL_CERT_FILE`` is honoured). Connecting to oneself is detected by the server key and that
peer is then left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Hashable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodeagent.derp import frames as F
from nodeagent.derp.client import DerpClient, PeerGone, PeerPresent

if TYPE_CHECKING:
    from nodeagent_derper.server import DerpServer

log = logging.getLogger("derper")

P = TypeVar("P", bound=Hashable)

BACKOFF_BASE = 0.2  # seconds before the first reconnect attempt
BACKOFF_CAP = 3.0  # reconnect attempts at least this often
STABLE_AFTER = 5.0  # a connection that lived this long resets the backoff
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 3 * F.KEEPALIVE_INTERVAL  # the peer sends keep-alives; silence this long = dead
WRITE_BUFFER_LIMIT = 4 << 20  # bytes queued towards one mesh peer before packets are dropped
MESH_DROP_REASONS = ("mesh_write_full", "mesh_down")

_FWD = int(F.FrameType.FORWARD_PACKET)
_hdr = F.frame_header
_KEY_LEN = F.KEY_LEN


class RouteTable(Generic[P]):
    """Which client keys are present on which mesh peer (no I/O)."""

    __slots__ = ("_learned", "_where", "best")

    def __init__(self) -> None:
        self.best: dict[bytes, P] = {}  # key → the peer to forward to (the latest claim)
        self._where: dict[bytes, list[P]] = {}  # key → peers claiming it, oldest first
        self._learned: dict[P, set[bytes]] = {}  # peer → keys it claims

    def present(self, peer: P, key: bytes) -> None:
        """``peer`` says ``key`` is connected there (the newest claim wins)."""
        lst = self._where.get(key)
        if lst is None:
            self._where[key] = [peer]
        else:
            if peer in lst:
                lst.remove(peer)
            lst.append(peer)
        self.best[key] = peer
        self._learned.setdefault(peer, set()).add(key)

    def gone(self, peer: P, key: bytes) -> None:
        """``peer`` says ``key`` left it; other peers' claims stay."""
        learned = self._learned.get(peer)
        if learned is None or key not in learned:
            return
        learned.discard(key)
        self._drop_claim(peer, key)

    def peer_down(self, peer: P) -> int:
        """Forget everything learned from ``peer``; returns how many keys it claimed."""
        keys = self._learned.pop(peer, set())
        for key in keys:
            self._drop_claim(peer, key)
        return len(keys)

    def _drop_claim(self, peer: P, key: bytes) -> None:
        lst = self._where.get(key)
        if lst is None or peer not in lst:
            return
        lst.remove(peer)
        if lst:
            self.best[key] = lst[-1]
        else:
            del self._where[key]
            del self.best[key]

    def lookup(self, key: bytes) -> P | None:
        return self.best.get(key)

    def claims(self, key: bytes) -> list[P]:
        """The peers claiming ``key``, most recent last."""
        return list(self._where.get(key, ()))

    def count(self, peer: P) -> int:
        return len(self._learned.get(peer, ()))

    def __len__(self) -> int:
        return len(self.best)


def parse_entry(entry: str) -> tuple[str, str | None]:
    """A ``--mesh-with`` entry as (URL to dial, host to connect to instead or None).

    ``HOST`` and ``HOST:PORT`` become ``https://HOST[:PORT]/derp``; ``HOST/DIALHOST`` (Tailscale's
    form) keeps that URL (TLS name, Host header) but connects to DIALHOST; a full ``http(s)://``
    URL is used as given. ValueError when the entry is unusable."""
    e = entry.strip()
    dial: str | None = None
    if "://" in e:
        url = e
    else:
        host, sep, dial = e.partition("/")
        if sep and (not dial or "/" in dial):
            raise ValueError(f"--mesh-with entry {entry!r}: want HOST or HOST/DIALHOST")
        url = f"https://{host}/derp"
        dial = dial or None
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--mesh-with entry {entry!r}: want a host name or http(s)://host/derp")
    try:
        u.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"--mesh-with entry {entry!r}: bad port") from None
    if not u.path:
        url += "/derp"
    return url, dial


def peer_url(entry: str) -> str:
    """The URL a ``--mesh-with`` entry dials; ValueError when the entry is unusable."""
    return parse_entry(entry)[0]


_ANY = ("", "*", "0.0.0.0", "::")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def is_self(entry: str, hostname: str, listen_host: str, listen_port: int) -> bool:
    """True when a ``--mesh-with`` entry names this derper (its --hostname or listen address)."""
    e = entry.strip()
    name = e.partition("/")[0] if "://" not in e else ""
    if name and name.lower().rstrip(".") == hostname.lower().rstrip("."):
        return True
    u = urlsplit(peer_url(e))
    host = (u.hostname or "").lower()
    port = u.port or (443 if u.scheme == "https" else 80)
    if port != listen_port:
        return False
    lh = listen_host.lower()
    return host == lh or host == hostname.lower() or (lh in _ANY and host in _LOOPBACK)


def client_ssl_context() -> ssl.SSLContext:
    """System trust store (OpenSSL honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``)."""
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class MeshPeer:
    """One mesh peer: its watch connection, its forwarding queue and its counters."""

    def __init__(self, mesh: Mesh, url: str, dial_host: str | None = None) -> None:
        self.mesh = mesh
        self.url = url
        self.dial_host = dial_host
        self.client: DerpClient | None = None
        self.connected = False
        self.is_self = False
        self.connects = 0
        self.disconnects = 0
        self.last_error = ""
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_queued = False
        self._blocked = False
        self._task: asyncio.Task[None] | None = None

    # --- hot path (called from the relay's read callbacks) --------------------------------------

    def forward(self, src: bytes, payload: bytes, disco: bool) -> None:
        """Forward a SendPacket's payload (``dst || packet``) from ``src`` to this peer."""
        srv = self.mesh.srv
        client = self.client
        if client is None:
            srv.drop("mesh_down", disco, len(payload) - _KEY_LEN)
            return
        if self._blocked:
            # The socket is behind: packets wait until half the bound has drained.
            if client.write_buffer_size() > WRITE_BUFFER_LIMIT // 2:
                srv.drop("mesh_write_full", disco, len(payload) - _KEY_LEN)
                return
            self._blocked = False
        if self._out_bytes > WRITE_BUFFER_LIMIT:
            srv.drop("mesh_write_full", disco, len(payload) - _KEY_LEN)
            return
        frame = _hdr(_FWD, _KEY_LEN + len(payload)) + src + payload
        self._out.append(frame)
        self._out_bytes += len(frame)
        srv.forwarded_out += 1
        if not self._flush_queued:
            self._flush_queued = True
            self.mesh.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_queued = False
        out = self._out
        if not out:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        client = self.client
        if client is None:
            return
        try:
            client.write_nowait(data)
            self._blocked = client.write_buffer_size() > WRITE_BUFFER_LIMIT
        except (OSError, RuntimeError, AttributeError):
            pass  # the read loop sees the connection end and cleans up

    # --- connection loop ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = self.mesh.loop.create_task(self._run(), name=f"mesh {self.url}")

    async def stop(self) -> None:
        t = self._task
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._task = None

    async def _run(self) -> None:
        mesh = self.mesh
        backoff = BACKOFF_BASE
        loop = mesh.loop
        while True:
            began = loop.time()
            try:
                client = await DerpClient.connect(
                    self.url, mesh.srv.private_key, mesh_key=mesh.mesh_key_hex,
                    ssl=mesh.ssl_context if self.url.startswith("https:") else None,
                    timeout=CONNECT_TIMEOUT, app_name="derper-mesh", dial_host=self.dial_host)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._note_error(f"connect: {_describe(e)}")
            else:
                if client.server_public_key == mesh.srv.public_key:
                    log.info("mesh %s: that is this derper itself; not meshing with it",
                             self.url)
                    self.is_self = True
                    await client.close()
                    return
                try:
                    await self._serve(client)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._note_error(_describe(e))
                finally:
                    self._detach()
                    with contextlib.suppress(Exception):
                        await asyncio.shield(client.close())
                if loop.time() - began >= STABLE_AFTER:
                    backoff = BACKOFF_BASE
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _serve(self, client: DerpClient) -> None:
        await client.watch_conns()
        self.client = client
        self.connected = True
        self.connects += 1
        if self.last_error or self.connects > 1:
            log.info("mesh %s: connected", self.url)
        self.last_error = ""
        table = self.mesh.routes
        own = self.mesh.srv.public_key
        while True:
            events = await asyncio.wait_for(client.recv_batch(), READ_TIMEOUT)
            for ev in events:
                if isinstance(ev, PeerPresent):
                    if ev.key != own:
                        table.present(self, ev.key)
                elif isinstance(ev, PeerGone):
                    table.gone(self, ev.key)

    def _detach(self) -> None:
        if self.connected:
            self.disconnects += 1
        self.client = None
        self.connected = False
        self._blocked = False
        dropped = self._out
        for fr in dropped:
            self.mesh.srv.drop("mesh_down", F.looks_like_disco(fr, 5 + 2 * _KEY_LEN),
                               len(fr) - 5 - 2 * _KEY_LEN)
        dropped.clear()
        self._out_bytes = 0
        self.mesh.routes.peer_down(self)

    def _note_error(self, msg: str) -> None:
        if msg != self.last_error:
            log.warning("mesh %s: %s; retrying", self.url, msg)
        self.last_error = msg

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "connected": self.connected, "self": self.is_self,
                "keys": self.mesh.routes.count(self), "connects": self.connects,
                "disconnects": self.disconnects, "last_error": self.last_error}


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


class Mesh:
    """The mesh peers of one derper. The relay reads :attr:`routes`' ``best`` dict directly."""

    def __init__(self, srv: DerpServer, targets: list[tuple[str, str | None]], *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``targets``: (URL, host to connect to instead or None), see :func:`parse_entry`."""
        if srv.mesh_key_bytes is None:
            raise ValueError("meshing needs a mesh key")
        self.srv = srv
        self.mesh_key_hex = srv.mesh_key_bytes.hex()
        self.loop = asyncio.get_running_loop()
        self.ssl_context = ssl_context or client_ssl_context()
        self.routes: RouteTable[MeshPeer] = RouteTable()
        self.peers = [MeshPeer(self, u, d) for u, d in targets]
        for reason in MESH_DROP_REASONS:
            for kind in ("disco", "other"):
                srv.drops.setdefault((reason, kind), [0, 0])
        srv.remote = self.routes.best
        srv.registry.register(MeshCollector(self))

    def start(self) -> None:
        for p in self.peers:
            p.start()

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.peers))
        self.srv.remote = {}

    def connected(self) -> int:
        return sum(1 for p in self.peers if p.connected)

    def stats(self) -> dict[str, Any]:
        return {"peers_configured": sum(1 for p in self.peers if not p.is_self),
                "peers_connected": self.connected(), "remote_clients": len(self.routes),
                "peers": [p.stats() for p in self.peers]}

    def summary(self) -> str:
        """One line for the /debug/ index."""
        return "; ".join(
            f"{p.url} {'self' if p.is_self else 'up' if p.connected else 'down'}"
            f" ({self.routes.count(p)} clients)" for p in self.peers) or "-"


class MeshCollector:
    """Prometheus view of a :class:`Mesh`, read only when scraped."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self._mesh
        st = m.stats()
        yield GaugeMetricFamily("derp_mesh_peers_configured", "mesh peers configured "
                                "(--mesh-with, without this derper itself)",
                                value=st["peers_configured"])
        yield GaugeMetricFamily("derp_mesh_peers_connected",
                                "mesh peers with a live watch connection",
                                value=st["peers_connected"])
        yield GaugeMetricFamily("derp_mesh_remote_clients",
                                "client keys reachable through mesh peers",
                                value=st["remote_clients"])
        up = GaugeMetricFamily("derp_mesh_peer_up", "1 when the mesh peer is connected",
                               labels=["peer"])
        keys = GaugeMetricFamily("derp_mesh_peer_clients", "client keys present on the peer",
                                 labels=["peer"])
        conns = CounterMetricFamily("derp_mesh_peer_connects",
                                    "watch connections established to the peer",
                                    labels=["peer"])
        for p in m.peers:
            up.add_metric([p.url], 1 if p.connected else 0)
            keys.add_metric([p.url], m.routes.count(p))
            conns.add_metric([p.url], p.connects)
        yield up
        yield keys
        yield conns
