"""The agent's DERP connections: :class:`DerpManager`, one client per region of the DERP map.

Owns, per region: the connection (dialled lazily when a packet is sent there; the home region's
at once, and kept), its write queue (32 packets, the oldest dropped when full), the reader that
turns server frames into callbacks, the reconnect backoff, and the idle close of non-home
connections. Also owns the dialling rules the region check (:mod:`nodeagent.derp.debugcheck`)
shares: where a DERP map node is reached and how its TLS is verified.

Dialling a node (Tailscale's rules, derp.md §2): the nodes of a region are tried in map order,
``STUNOnly`` ones skipped. A node's ``IPv4``/``IPv6`` fields force an address; a value that is
not an IP (conventionally ``none``) disables that family; empty means resolve ``HostName``. The
TCP attempts to a node's addresses race (IPv4 first, each further address 250 ms later) within
1.5 s; the whole connect (TCP, TLS, HTTP upgrade, login) within 10 s. TLS goes to ``DERPPort``
(0: 443) with ALPN ``http/1.1`` only. The certificate is verified against the system store for
the name ``CertName`` (else ``HostName``), which is also the SNI; ``CertName`` of the form
``sha256-raw:<hex>`` instead pins the leaf certificate's SHA-256 (a self-signed derper); a node
with ``InsecureForTests`` is not verified at all. Connections to a node other than the region's
first carry ``Ideal-Node: <first node's Name>``. No fast start: Python's ``ssl`` does not show
the server's extra "meta certificate", so the client always reads the server key first.

Tests run derpers with TLS (``--certmode manual`` with an IP ``--hostname``: a self-signed
certificate) and mark their nodes ``InsecureForTests``. For a plain-HTTP development derper
(``derper --dev``) there is :data:`PLAIN_HTTP_ENV` (``NODEAGENT_DERP_PLAIN_HTTP=1``, or
``DerpManager(plain_http=True)``): every node is then dialled over plain HTTP, ``DERPPort`` 0
meaning 3340, like Tailscale's ``TS_DEBUG_USE_DERP_HTTP``.

Connection life (magicsock.md §2, §8-§9): a connection logs in with ``CanAckPings`` (the
client adapter answers server Pings), then sends NotePreferred (true only on the home region's
connection; sent again to every connection when the home changes). A failed dial or a lost
connection calls ``on_region_down(region)`` (once until the next success) and backs off: the
n-th consecutive failure waits ``min(n² * 10 ms, 5 s) * random[0.5, 1.5)`` (:func:`backoff_delay`,
reset by a successful login). The home region redials after the backoff; another region redials
when a packet is waiting for it. A server's Restarting frame postpones the next dial by the
announced delay instead. A server that takes no bytes for 10 s counts as lost. A non-home
region not written for 60 s is closed (checked every 15 s while non-home regions exist), with
its queue, whether it is connected or still redialling. A DERP map change closes the regions whose
definition changed or vanished; the home region is redialled with its new definition, or
forgotten (home 0) if it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nodeagent.derp import frames as F
from nodeagent.derp.client import (
    DerpClient,
    Health,
    PeerGone,
    Pong,
    ReceivedPacket,
    Restarting,
)
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

log = logging.getLogger("nodeagent.derp")

__all__ = [
    "CERT_PIN_PREFIX",
    "DEFAULT_DERP_PORT",
    "PLAIN_HTTP_ENV",
    "DerpDialError",
    "DerpManager",
    "RegionStatus",
    "backoff_delay",
    "derp_nodes",
    "describe_error",
    "dial_node",
    "dial_region",
    "node_addresses",
    "node_label",
    "node_port",
    "open_node_stream",
    "plain_http_from_env",
    "tls_context",
    "tls_server_name",
]

DEFAULT_DERP_PORT = 443
DEV_DERP_PORT = 3340  # plain-HTTP development derpers (derper --dev)
PLAIN_HTTP_ENV = "NODEAGENT_DERP_PLAIN_HTTP"
CERT_PIN_PREFIX = "sha256-raw:"

QUEUE_LEN = 32  # packets waiting per region; the oldest is dropped when full
# While a region is connected and its socket keeps up, packets are written at once (a whole
# WireGuard burst in one write); past this many unsent bytes they queue behind the writer task,
# which waits for the socket (and notices a stalled server).
DIRECT_WRITE_HIGH_WATER = 1 << 20
IDLE_TIMEOUT = 60.0  # a non-home connection not written for this long is closed
IDLE_CHECK_INTERVAL = 15.0
NODE_DIAL_TIMEOUT = 1.5  # TCP to one node (all its addresses)
CONNECT_TIMEOUT = 10.0  # one whole connect: TCP, TLS, upgrade and login
WRITE_TIMEOUT = 10.0  # a server that takes no bytes for this long is given up
DIAL_STAGGER = 0.25  # each further address of a node starts this much later
BACKOFF_UNIT = 0.010
MAX_BACKOFF = 5.0
_READ_LIMIT = 256 << 10

PacketCallback = Callable[[int, bytes, bytes], None]


def backoff_delay(failures: int, jitter: float) -> float:
    """Seconds to wait before the next dial after ``failures`` consecutive failures:
    ``min(failures² * 10 ms, 5 s) * (0.5 + jitter)`` with ``jitter`` in [0, 1); 0 for none."""
    if failures <= 0:
        return 0.0
    return min(failures * failures * BACKOFF_UNIT, MAX_BACKOFF) * (0.5 + jitter)


def plain_http_from_env() -> bool:
    return os.environ.get(PLAIN_HTTP_ENV, "") not in ("", "0", "false")


class DerpDialError(ConnectionError):
    """No node of a region (or the one node asked for) could be reached and logged in to; the
    message is one line naming the node(s) and what went wrong (``reason`` without the name)."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"{node}: {reason}" if node else reason)
        self.node = node
        self.reason = reason


# --- dialling one node ---------------------------------------------------------------------------

def derp_nodes(region: DERPRegion) -> list[DERPNode]:
    """The nodes of ``region`` that serve DERP (not ``STUNOnly``), in map order."""
    return [n for n in region.Nodes if not n.STUNOnly]


def node_port(node: DERPNode, plain_http: bool = False) -> int:
    if node.DERPPort:
        return node.DERPPort
    return DEV_DERP_PORT if plain_http else DEFAULT_DERP_PORT


def node_label(node: DERPNode) -> str:
    """How messages name a node: ``HostName`` (and the map's ``Name`` when it has one)."""
    host = node.HostName or "?"
    return f"{host} (node {node.Name})" if node.Name and node.Name != host else host


# getaddrinfo errors meaning "no address of this family" rather than "cannot resolve now".
_NO_SUCH_ADDRESS = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
                    if hasattr(socket, n)}


def _forced(value: str, version: int) -> list[str] | None:
    """The address a map field forces: [ip], [] (family disabled), None (resolve HostName)."""
    if not value:
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return []  # "none" or any other non-IP value disables the family
    return [str(ip)] if ip.version == version else []


async def node_addresses(node: DERPNode, family: int) -> list[str]:
    """The addresses of ``node`` in ``family`` (AF_INET / AF_INET6): the forced one from the map,
    nothing when the map disables the family, else ``HostName`` resolved. Raises OSError when the
    name does not resolve at all."""
    version = 4 if family == socket.AF_INET else 6
    forced = _forced(node.IPv4 if version == 4 else node.IPv6, version)
    if forced is not None:
        return forced
    host = node.HostName
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return [str(literal)] if literal.version == version else []
    if not host:
        return []
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno in _NO_SUCH_ADDRESS:
            return []  # the name has no address of this family
        raise OSError(f"cannot resolve {host}: {e.strerror}") from None
    out: list[str] = []
    for info in infos:
        ip = str(info[4][0])
        if ip not in out:
            out.append(ip)
    return out


@functools.lru_cache(maxsize=4)
def _context(verify: bool) -> ssl.SSLContext:
    if verify:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])  # never h2: the /derp upgrade needs HTTP/1.1
    return ctx


def tls_context(node: DERPNode) -> ssl.SSLContext:
    """The client TLS context for ``node``: system trust store and name check, or no check at
    all for ``InsecureForTests`` and for a ``sha256-raw:`` pin (checked after the handshake by
    :func:`open_node_stream`)."""
    verify = not (node.InsecureForTests or node.CertName.startswith(CERT_PIN_PREFIX))
    return _context(verify)


def tls_server_name(node: DERPNode) -> str:
    """SNI and the name the certificate must carry: ``CertName``, else ``HostName``."""
    if node.CertName and not node.CertName.startswith(CERT_PIN_PREFIX):
        return node.CertName
    return node.HostName


def _check_pin(node: DERPNode, writer: asyncio.StreamWriter) -> None:
    if node.InsecureForTests or not node.CertName.startswith(CERT_PIN_PREFIX):
        return
    want = node.CertName[len(CERT_PIN_PREFIX):].strip().lower()
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    got = hashlib.sha256(der).hexdigest() if der else ""
    if got != want:
        raise ssl.SSLCertVerificationError(
            f"certificate of {node_label(node)} does not match its pinned SHA-256 "
            f"(got {got[:16] or 'none'}..., want {want[:16]}...)")


def describe_error(e: BaseException) -> str:
    """One line for a failed dial or exchange with a DERP node (also used by the region check
    and derpprobe): the OS's text for an errno, the TLS reason, else the exception's text."""
    if isinstance(e, TimeoutError):
        if e.errno:
            return os.strerror(e.errno)
        return " ".join(str(e).split()) or "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {getattr(e, 'verify_message', None) or e}"
    if isinstance(e, ssl.SSLError):
        return f"TLS error: {e.reason or e}"
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    return text or type(e).__name__


async def _sock_connect(loop: asyncio.AbstractEventLoop, s: socket.socket,
                        addr: tuple[str, int]) -> None:
    """Connect the non-blocking ``s`` to the numeric ``addr``. Not ``loop.sock_connect``:
    uvloop's passes even a numeric address through getaddrinfo in libuv's thread pool, which
    runs at most two lookups at once, so two hung DNS lookups (a HostName whose resolver does
    not answer) would stall every dial behind them."""
    try:
        s.connect(addr)
        return
    except (BlockingIOError, InterruptedError):
        pass
    fd = s.fileno()
    writable = loop.create_future()
    loop.add_writer(fd, lambda: writable.done() or writable.set_result(None))
    try:
        await writable
    finally:
        loop.remove_writer(fd)
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def _race_tcp(targets: list[tuple[int, str]], port: int,
                    timeout: float) -> socket.socket:
    """A connected TCP socket to the first of ``targets`` (family, ip) that answers; attempts
    start :data:`DIAL_STAGGER` apart. OSError naming every failure (or the timeout)."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []

    async def attempt(i: int, fam: int, ip: str) -> socket.socket:
        if i:
            await asyncio.sleep(i * DIAL_STAGGER)
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            await _sock_connect(loop, s, (ip, port))
        except BaseException as e:
            s.close()
            if isinstance(e, OSError):
                where = f"[{ip}]:{port}" if fam == socket.AF_INET6 else f"{ip}:{port}"
                errors.append(f"{where}: {describe_error(e)}")
            raise
        return s

    tasks = [loop.create_task(attempt(i, fam, ip)) for i, (fam, ip) in enumerate(targets)]
    winner: socket.socket | None = None
    try:
        async with asyncio.timeout(timeout):
            for fut in asyncio.as_completed(tasks):
                try:
                    winner = await fut
                except OSError:
                    continue
                break
    except TimeoutError:
        errors.append(f"no TCP answer within {timeout:g}s")
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for res in results:
            if isinstance(res, socket.socket) and res is not winner:
                res.close()
    if winner is None:
        raise OSError("; ".join(errors) or "no address to connect to")
    with contextlib.suppress(OSError):
        winner.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return winner


async def _dial_families(node: DERPNode, families: tuple[int, ...], port: int,
                         tcp_timeout: float) -> socket.socket:
    """A connected TCP socket to ``node``: its address families race, each taking the map's
    forced address or resolving ``HostName`` on its own, so that a slow or failing DNS answer
    for one family (an IPv6 lookup while IPv4 is forced) does not hold back the other. IPv4
    goes first, IPv6 :data:`DIAL_STAGGER` later; each family's TCP attempts get
    ``tcp_timeout`` once its addresses are known. :class:`DerpDialError` when nothing works."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    resolve_errors: list[str] = []
    tcp_errors: list[str] = []
    found = False

    async def dial(i: int, fam: int) -> socket.socket:
        nonlocal found
        try:
            ips = await node_addresses(node, fam)
        except OSError as e:
            resolve_errors.append(describe_error(e))
            raise
        if not ips:
            raise OSError("no address of this family")
        found = True
        if (wait := start + i * DIAL_STAGGER - loop.time()) > 0:
            await asyncio.sleep(wait)
        try:
            return await _race_tcp([(fam, ip) for ip in ips], port, tcp_timeout)
        except OSError as e:
            tcp_errors.append(str(e))
            raise

    tasks = [loop.create_task(dial(i, fam)) for i, fam in enumerate(families)]
    winner: socket.socket | None = None

    def discard(t: asyncio.Task[socket.socket]) -> None:
        # A loser's socket is closed whenever it turns up. Not awaited: a lookup in progress
        # may not stop at once when cancelled (uvloop's getaddrinfo runs to its end).
        if not t.cancelled() and t.exception() is None and t.result() is not winner:
            t.result().close()

    try:
        for fut in asyncio.as_completed(tasks):
            try:
                winner = await fut
            except OSError:
                continue
            break
    finally:
        for t in tasks:
            t.cancel()
            t.add_done_callback(discard)
    if winner is not None:
        return winner
    if not found:
        fam = families[0] if len(families) == 1 else 0
        what = "IPv4" if fam == socket.AF_INET else "IPv6" if fam else "IP"
        why = "; ".join(resolve_errors) or f"no {what} address (map fields IPv4/IPv6, HostName)"
        raise DerpDialError(node_label(node), why)
    raise DerpDialError(node_label(node), f"TCP connect failed: {'; '.join(tcp_errors)}")


async def open_node_stream(node: DERPNode, *, family: int | None = None,
                           plain_http: bool = False, tcp_timeout: float = NODE_DIAL_TIMEOUT,
                           tls_timeout: float = CONNECT_TIMEOUT
                           ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP (and, unless ``plain_http``, verified TLS) stream to ``node``'s DERP port.

    ``family`` restricts the dial to AF_INET or AF_INET6; by default both race. Raises
    :class:`DerpDialError` (one line naming the node) when nothing works."""
    port = node_port(node, plain_http)
    families = (family,) if family else (socket.AF_INET, socket.AF_INET6)
    sock = await _dial_families(node, families, port, tcp_timeout)
    try:
        if plain_http:
            return await asyncio.open_connection(sock=sock, limit=_READ_LIMIT)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=tls_context(node), server_hostname=tls_server_name(node),
            ssl_handshake_timeout=tls_timeout, limit=_READ_LIMIT)
    except (OSError, ssl.SSLError, TimeoutError) as e:
        sock.close()
        raise DerpDialError(node_label(node), describe_error(e)) from None
    try:
        _check_pin(node, writer)
    except ssl.SSLError as e:
        writer.close()
        raise DerpDialError(node_label(node), describe_error(e)) from None
    return reader, writer


def _host_header(node: DERPNode, port: int, default: int) -> str:
    host = node.HostName
    if ":" in host:
        host = f"[{host}]"
    return host if port == default else f"{host}:{port}"


async def dial_node(node: DERPNode, private_key: bytes, *, family: int | None = None,
                    plain_http: bool = False, ideal_node: str | None = None,
                    is_prober: bool = False, timeout: float = CONNECT_TIMEOUT) -> DerpClient:
    """Connect to one node and log in (HTTP upgrade, ServerKey, ClientInfo, ServerInfo).

    Raises :class:`DerpDialError` (one line naming the node) for every failure."""
    async def run() -> DerpClient:
        reader, writer = await open_node_stream(node, family=family, plain_http=plain_http,
                                                tls_timeout=timeout)
        port = node_port(node, plain_http)
        host = _host_header(node, port, 80 if plain_http else 443)
        try:
            # The adapter's login over a stream we dialled ourselves (forced IPs, our TLS).
            return await DerpClient._login(reader, writer, private_key, None, host, "/derp",
                                           None, True, is_prober, "", ideal_node)
        except BaseException:
            writer.close()
            raise

    try:
        return await asyncio.wait_for(run(), timeout)
    except DerpDialError:
        raise
    except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
            asyncio.LimitOverrunError, F.ProtocolError, ValueError) as e:
        raise DerpDialError(node_label(node), f"DERP login failed: {describe_error(e)}") from None


async def dial_region(region: DERPRegion, private_key: bytes, *, plain_http: bool = False,
                      timeout: float = CONNECT_TIMEOUT) -> tuple[DerpClient, DERPNode]:
    """Log in to the first node of ``region`` that works, trying them in map order."""
    nodes = derp_nodes(region)
    if not nodes:
        raise DerpDialError("", f"region {region.RegionID} has no DERP nodes")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ideal = region.Nodes[0].Name if region.Nodes else ""
    errors: list[str] = []
    for node in nodes:
        left = deadline - loop.time()
        if left <= 0:
            errors.append(f"{node_label(node)}: not tried (connect budget used up)")
            break
        try:
            c = await dial_node(node, private_key, plain_http=plain_http, timeout=left,
                                ideal_node=ideal if node.Name and node.Name != ideal else None)
        except DerpDialError as e:
            errors.append(str(e))
            continue
        return c, node
    raise DerpDialError("", "; ".join(errors))


# --- the manager -------------------------------------------------------------------------------

@dataclass
class RegionStatus:
    """What :meth:`DerpManager.status` reports for one region."""

    region: int
    code: str = ""
    connected: bool = False
    home: bool = False
    node: str = ""  # HostName of the node connected to
    server_key: str = ""  # "nodekey:<hex>" of that server (kept after a disconnect)
    last_error: str = ""
    health: str = ""  # the server's last Health text ("" = fine)
    latency: float | None = None  # seconds: round trip of the last DerpManager.ping
    connected_for: float | None = None  # seconds since the login, while connected
    queued: int = 0
    failures: int = 0  # consecutive failed dials / lost connections
    retry_in: float = 0.0  # seconds until the next dial may start

    def to_json(self) -> dict[str, Any]:
        return {"RegionID": self.region, "RegionCode": self.code, "Connected": self.connected,
                "Home": self.home, "Node": self.node, "ServerKey": self.server_key,
                "LastError": self.last_error, "Health": self.health,
                "LatencySeconds": self.latency, "ConnectedSeconds": self.connected_for,
                "Queued": self.queued, "Failures": self.failures, "RetryIn": self.retry_in}


_COUNTERS = ("packets_sent", "bytes_sent", "packets_received", "bytes_received",
             "connects", "reconnects", "connect_errors", "disconnects")


class _Region:
    """One region's connection state; only the manager touches it."""

    __slots__ = ("client", "connected_at", "definition", "down_reported", "failures",
                 "health", "id", "last_error", "last_write", "latency", "next_dial", "node",
                 "pings", "preferred_sent", "queue", "reader_done", "reader_error", "restart",
                 "server_key", "stop", "task", "wake")

    def __init__(self, rid: int, definition: DERPRegion, now: float) -> None:
        self.id = rid
        self.definition = definition
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self.client: DerpClient | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.last_write = now
        self.failures = 0
        self.next_dial = 0.0
        self.last_error = ""
        self.health = ""
        self.server_key = b""
        self.node = ""
        self.connected_at: float | None = None
        self.preferred_sent: bool | None = None
        self.restart: tuple[float, float] | None = None  # (reconnect in, try for), seconds
        self.reader_done = False
        self.reader_error = ""
        self.down_reported = False
        self.stop = False
        self.latency: float | None = None
        self.pings: dict[bytes, asyncio.Future[float]] = {}


class DerpManager:
    """The agent's DERP connections, one per region (see the module docstring).

    ``on_packet(region, src_node_key, payload)`` receives every relayed packet;
    ``on_peer_gone(region, node_key)`` a server's PeerGone; ``on_region_down(region)`` a failed
    dial or a lost connection (once until the next successful login); ``on_health(region,
    text)`` a server's Health frame ("" = fine again). Callbacks run on the event loop; one that
    raises is logged and the connection goes on. ``clock`` (monotonic seconds) and ``rng``
    (floats in [0, 1)) are injectable for tests, as are the idle limits and ``dial`` (an async
    ``dial(region, private_key) -> (DerpClient, DERPNode)``, default :func:`dial_region`).
    """

    def __init__(self, private_key: bytes, on_packet: PacketCallback, *,
                 on_peer_gone: Callable[[int, bytes], None] | None = None,
                 on_region_down: Callable[[int], None] | None = None,
                 on_health: Callable[[int, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 idle_timeout: float = IDLE_TIMEOUT,
                 idle_check_interval: float = IDLE_CHECK_INTERVAL,
                 queue_len: int = QUEUE_LEN,
                 plain_http: bool | None = None,
                 dial: Callable[..., Any] | None = None) -> None:
        self.private_key = bytes(private_key)
        self._on_packet = on_packet
        self._on_peer_gone = on_peer_gone
        self._on_region_down = on_region_down
        self._on_health = on_health
        self._clock = clock
        self._rng = rng
        self.idle_timeout = idle_timeout
        self.idle_check_interval = idle_check_interval
        self.queue_len = queue_len
        self.plain_http = plain_http_from_env() if plain_http is None else plain_http
        self._dial = dial
        self.home = 0
        self._map: DERPMap | None = None
        self._regions: dict[int, _Region] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False
        self._counters: dict[int, dict[str, int]] = {}
        self._drops: dict[tuple[int, str], int] = {}
        self._callback_errors = 0

    # --- configuration ----------------------------------------------------------------------

    def set_derp_map(self, dm: DERPMap | None) -> None:
        """Use ``dm`` from now on. Connections to regions that vanished or whose definition
        changed are closed (their queues dropped); the home region is redialled with its new
        definition, or forgotten (home 0) when it is gone."""
        if self._closed:
            return
        home_was_usable = bool(self.home) and self._usable(self.home) is not None
        self._map = copy.deepcopy(dm)
        for rid, r in list(self._regions.items()):
            new = self._usable(rid)
            if new is None or new != r.definition:
                self._drop_region(r, "map_change")
        if home_was_usable and self._usable(self.home) is None:
            log.info("DERP home region %d is no longer in the DERP map", self.home)
            self.home = 0
        elif self.home:
            self._ensure(self.home)
        self._maybe_start_janitor()

    def set_home(self, region: int) -> None:
        """Make ``region`` the home (0: none): it is connected at once and kept; every open
        connection is told NotePreferred (true only for the home). The old home becomes an
        ordinary region, closed after the idle time without writes."""
        if self._closed:
            return
        old, self.home = self.home, region
        if old != region and old in self._regions:
            self._regions[old].last_write = self._clock()
        for r in self._regions.values():
            if r.client is not None:
                r.wake.set()
        if region:
            self._ensure(region)
        self._maybe_start_janitor()

    # --- sending ----------------------------------------------------------------------------

    def send(self, region: int, dst_key: bytes, pkt: bytes) -> bool:
        """Send ``pkt`` to ``dst_key`` via ``region``, dialling it if needed. Never blocks or
        raises: False when the region is not in the DERP map (or has no DERP node), the key or
        packet is unusable, or the manager is closed. See :meth:`send_many`."""
        return self.send_many(region, dst_key, [pkt])

    def send_many(self, region: int, dst_key: bytes, pkts: list[bytes]) -> bool:
        """Send packets to one destination via ``region``. Connected and keeping up: written at
        once, in one write. Otherwise they wait in the region's queue, which drops its oldest
        packet when full."""
        try:
            if self._closed or len(dst_key) != F.KEY_LEN:
                return False
            pkts = [p for p in pkts if len(p) <= F.MAX_PACKET_SIZE]
            if not pkts:
                return False
            r = self._regions.get(region)
            if r is None:
                r = self._ensure(region)
                if r is None:
                    return False
            r.last_write = self._clock()
            q = r.queue
            client = r.client
            if (client is not None and not q and not r.stop
                    and client.write_buffer_size() < DIRECT_WRITE_HIGH_WATER):
                client.send_many_nowait(dst_key, pkts)
                c = self._counters[region]
                c["packets_sent"] += len(pkts)
                c["bytes_sent"] += sum(map(len, pkts))
                return True
            for pkt in pkts:
                if len(q) >= self.queue_len:
                    q.popleft()
                    self._drop(region, "queue_full")
                q.append((dst_key, pkt))
            if r.task is None:
                self._start(r)
            else:
                r.wake.set()
            return True
        except Exception:  # never raise into the data path
            log.exception("DERP send to region %d failed", region)
            return False

    async def ping(self, region: int, timeout: float = 5.0) -> float:
        """Round trip of a DERP Ping to ``region``'s server, in seconds (also kept as its
        status latency). Raises ConnectionError when the region is not connected, TimeoutError
        when no Pong comes."""
        r = self._regions.get(region)
        client = r.client if r is not None else None
        if r is None or client is None:
            raise ConnectionError(f"DERP region {region} is not connected")
        data = os.urandom(F.PING_LEN)
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        r.pings[data] = fut
        start = time.perf_counter()
        try:
            await client.ping(data)
            await asyncio.wait_for(fut, timeout)
        finally:
            r.pings.pop(data, None)
        r.latency = time.perf_counter() - start
        return r.latency

    # --- reporting --------------------------------------------------------------------------

    def status(self) -> dict[int, RegionStatus]:
        """Every region with state (dialled, queued or home), by region ID."""
        now = self._clock()
        out: dict[int, RegionStatus] = {}
        for rid, r in sorted(self._regions.items()):
            out[rid] = RegionStatus(
                region=rid, code=r.definition.RegionCode, connected=r.client is not None,
                home=rid == self.home, node=r.node,
                server_key="nodekey:" + r.server_key.hex() if r.server_key else "",
                last_error=r.last_error, health=r.health, latency=r.latency,
                connected_for=(now - r.connected_at) if r.connected_at is not None else None,
                queued=len(r.queue), failures=r.failures,
                retry_in=max(0.0, r.next_dial - now))
        if self.home and self.home not in out:
            out[self.home] = RegionStatus(region=self.home, home=True)
        return out

    def counters(self, region: int) -> dict[str, int]:
        """The region's counters (a copy): packets/bytes sent and received, connects,
        reconnects, connect errors, disconnects, and ``dropped`` (all reasons)."""
        c = dict(self._counters.get(region) or dict.fromkeys(_COUNTERS, 0))
        c["dropped"] = sum(n for (rid, _), n in self._drops.items() if rid == region)
        return c

    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        s: list[tuple[str, str, dict[str, str], float]] = []
        helps = {
            "packets_sent": "packets written to DERP servers",
            "bytes_sent": "payload bytes written to DERP servers",
            "packets_received": "packets received from DERP servers",
            "bytes_received": "payload bytes received from DERP servers",
            "connects": "DERP logins that succeeded",
            "reconnects": "DERP logins after the region's first",
            "connect_errors": "DERP dials that failed",
            "disconnects": "DERP connections that ended",
        }
        for rid in sorted(self._counters):
            c = self._counters[rid]
            labels = {"region": str(rid)}
            for name in _COUNTERS:
                s.append((f"nodeagent_derp_{name}_total", helps[name], labels, float(c[name])))
        for (rid, reason), n in sorted(self._drops.items()):
            s.append(("nodeagent_derp_dropped_total",
                      "packets for DERP dropped before sending, by reason",
                      {"region": str(rid), "reason": reason}, float(n)))
        for rid, r in sorted(self._regions.items()):
            s.append(("nodeagent_derp_connected", "DERP connection up (1) or not (0)",
                      {"region": str(rid)}, float(r.client is not None)))
        s.append(("nodeagent_derp_home_region", "the home DERP region (0: none)", {},
                  float(self.home)))
        s.append(("nodeagent_derp_callback_errors_total",
                  "DERP callbacks that raised (logged)", {}, float(self._callback_errors)))
        return s

    # --- closing ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection and stop every task; later sends return False."""
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Task[Any]] = []
        for r in list(self._regions.values()):
            t = self._drop_region(r, "closed", report=False)
            if t is not None:
                tasks.append(t)
        if self._janitor is not None:
            self._janitor.cancel()
            tasks.append(self._janitor)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- internals --------------------------------------------------------------------------

    def _usable(self, rid: int) -> DERPRegion | None:
        dm = self._map
        region = dm.Regions.get(rid) if dm is not None else None
        if region is None or not derp_nodes(region):
            return None
        return region

    def _ensure(self, rid: int) -> _Region | None:
        """The region's state, created (and its runner started, for the home) if needed."""
        r = self._regions.get(rid)
        if r is None:
            definition = self._usable(rid)
            if definition is None:
                return None
            r = self._regions[rid] = _Region(rid, definition, self._clock())
            self._counters.setdefault(rid, dict.fromkeys(_COUNTERS, 0))
            self._maybe_start_janitor()
        if rid == self.home and r.task is None:
            self._start(r)
        return r

    def _start(self, r: _Region) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # queued; the next call from within the loop starts it
        r.task = loop.create_task(self._run(r), name=f"derp-region-{r.id}")
        self._maybe_start_janitor()

    def _drop(self, rid: int, reason: str, n: int = 1) -> None:
        key = (rid, reason)
        self._drops[key] = self._drops.get(key, 0) + n

    def _count(self, rid: int, name: str, n: int = 1) -> None:
        self._counters[rid][name] += n

    def _drop_region(self, r: _Region, reason: str, *,
                     report: bool = True) -> asyncio.Task[None] | None:
        """Forget region ``r``: close its connection, drop its queue. Returns its runner."""
        if self._regions.get(r.id) is r:
            del self._regions[r.id]
        r.stop = True
        if r.queue:
            self._drop(r.id, reason, len(r.queue))
            r.queue.clear()
        was_up = r.client is not None
        task = r.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        r.wake.set()
        if was_up:
            log.log(logging.DEBUG if reason == "closed" else logging.INFO,
                    "DERP region %d: connection closed (%s)", r.id, reason.replace("_", " "))
            if report:
                self._report_down(r, force=True)
        return task

    def _report_down(self, r: _Region, force: bool = False) -> None:
        if r.down_reported and not force:
            return
        r.down_reported = True
        if self._on_region_down is not None:
            self._call(self._on_region_down, r.id)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._callback_errors += 1
            if self._callback_errors == 1 or self._callback_errors % 1000 == 0:
                log.exception("DERP callback %s raised (%d so far)",
                              getattr(fn, "__name__", fn), self._callback_errors)

    def _maybe_start_janitor(self) -> None:
        if self._janitor is not None or self._closed:
            return
        if not any(rid != self.home for rid in self._regions):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._janitor = loop.create_task(self._clean_idle(), name="derp-idle-cleanup")

    async def _clean_idle(self) -> None:
        try:
            while not self._closed and any(rid != self.home for rid in self._regions):
                await asyncio.sleep(self.idle_check_interval)
                now = self._clock()
                for r in list(self._regions.values()):
                    if r.id != self.home and now - r.last_write >= self.idle_timeout:
                        self._drop_region(r, "idle")
        finally:
            self._janitor = None

    def _failed(self, r: _Region, error: str) -> None:
        r.failures += 1
        r.last_error = error
        delay = backoff_delay(r.failures, self._rng())
        r.next_dial = max(r.next_dial, self._clock() + delay)
        self._report_down(r)

    async def _run(self, r: _Region) -> None:
        """Dial, serve, back off, redial — while the region is wanted."""
        try:
            while not (self._closed or r.stop):
                wait = r.next_dial - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not (r.queue or r.id == self.home) or r.stop:
                    break  # nothing needs this region now; the next send dials again
                try:
                    dial = self._dial or self._default_dial
                    client, node = await dial(r.definition, self.private_key)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._count(r.id, "connect_errors")
                    msg = str(e) if isinstance(e, DerpDialError) else describe_error(e)
                    if r.failures == 0 or msg != r.last_error:
                        log.info("DERP region %d: %s", r.id, msg)
                    self._failed(r, msg)
                    continue
                if r.stop:
                    await client.close()
                    break
                await self._serve(r, client, node)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: say so, leave the region idle until the next send
            log.exception("DERP region %d: connection task failed", r.id)
            r.last_error = f"internal error: {describe_error(e)}"
        finally:
            if r.task is asyncio.current_task():
                r.task = None

    async def _default_dial(self, region: DERPRegion,
                            private_key: bytes) -> tuple[DerpClient, DERPNode]:
        return await dial_region(region, private_key, plain_http=self.plain_http)

    async def _serve(self, r: _Region, client: DerpClient, node: DERPNode) -> None:
        """One logged-in connection: write the queue and NotePreferred until it ends."""
        c = self._counters[r.id]
        c["connects"] += 1
        if c["connects"] > 1:
            c["reconnects"] += 1
        r.client = client
        r.node = node.HostName
        r.server_key = client.server_public_key
        r.connected_at = self._clock()
        r.failures = 0
        r.next_dial = 0.0
        r.last_error = ""
        r.down_reported = False
        r.restart = None
        r.reader_done = False
        r.reader_error = ""
        r.preferred_sent = None
        log.info("DERP region %d: connected to %s (server nodekey:%s)%s", r.id, node.HostName,
                 client.server_public_key.hex()[:16], " [home]" if r.id == self.home else "")
        reader = asyncio.get_running_loop().create_task(self._read(r, client))
        error = ""
        try:
            while not (r.reader_done or r.stop):
                r.wake.clear()
                want = r.id == self.home
                if r.preferred_sent is not want:
                    await client.note_preferred(want)
                    r.preferred_sent = want
                q = r.queue
                if q:
                    n = nbytes = 0
                    while q:
                        dst, pkt = q.popleft()
                        client.send_nowait(dst, pkt)
                        n += 1
                        nbytes += len(pkt)
                    c["packets_sent"] += n
                    c["bytes_sent"] += nbytes
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await client.drain()
                    continue
                await r.wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            error = f"write failed: {describe_error(e)}"
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            r.client = None
            r.connected_at = None
            for fut in r.pings.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("DERP connection closed"))
            try:
                await asyncio.shield(client.close())
            except Exception:  # the connection is gone either way
                pass
        if r.stop or self._closed:
            return
        c["disconnects"] += 1
        error = r.reader_error or error or "connection closed"
        if r.restart is not None:
            delay, _ = r.restart
            r.last_error = f"server restarting: {error}"
            r.failures = 0
            r.next_dial = self._clock() + delay
            log.info("DERP region %d: server restarting, redialling in %.1fs", r.id, delay)
            self._report_down(r)
        else:
            log.info("DERP region %d: connection lost: %s", r.id, error)
            self._failed(r, error)

    async def _read(self, r: _Region, client: DerpClient) -> None:
        c = self._counters[r.id]
        rid = r.id
        on_packet = self._on_packet
        try:
            while True:
                for ev in await client.recv_batch():
                    if type(ev) is ReceivedPacket:
                        c["packets_received"] += 1
                        c["bytes_received"] += len(ev.data)
                        try:
                            on_packet(rid, ev.src, ev.data)
                        except Exception:
                            self._callback_errors += 1
                            if self._callback_errors == 1 or self._callback_errors % 1000 == 0:
                                log.exception("DERP on_packet raised (%d so far)",
                                              self._callback_errors)
                    elif isinstance(ev, PeerGone):
                        if self._on_peer_gone is not None:
                            self._call(self._on_peer_gone, rid, ev.key)
                    elif isinstance(ev, Health):
                        r.health = ev.problem
                        if ev.problem:
                            log.warning("DERP region %d: server reports: %s", rid, ev.problem)
                        if self._on_health is not None:
                            self._call(self._on_health, rid, ev.problem)
                    elif isinstance(ev, Restarting):
                        r.restart = (ev.reconnect_in_ms / 1000.0, ev.try_for_ms / 1000.0)
                    elif isinstance(ev, Pong):
                        fut = r.pings.get(ev.data)
                        if fut is not None and not fut.done():
                            fut.set_result(0.0)
                    # Ping: the adapter already queued the Pong; KeepAlive, ServerInfo: nothing.
        except asyncio.CancelledError:
            raise
        except Exception as e:
            r.reader_error = describe_error(e)
        finally:
            r.reader_done = True
            r.wake.set()
