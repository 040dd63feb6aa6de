"""Reaching one DERP node or region of a DERP map: addresses, the TCP race, TLS and its
verification, the HTTP upgrade and login; :class:`DerpDialError` and :func:`describe_error`, the
one-line text of a failed dial or exchange. Shared by :mod:`nodeagent.derp.manager` (the agent's
connections), the region check (:mod:`nodeagent.derp.debugcheck`) and derpprobe.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import os
import socket
import ssl

from nodeagent.derp import frames as F
from nodeagent.derp.client import DerpClient
from nodeagent.tailcfg import DERPNode, DERPRegion

__all__ = [
    "CERT_PIN_PREFIX",
    "CONNECT_TIMEOUT",
    "DEFAULT_DERP_PORT",
    "PLAIN_HTTP_ENV",
    "DerpDialError",
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

NODE_DIAL_TIMEOUT = 1.5  # TCP to one node (all its addresses)
CONNECT_TIMEOUT = 10.0  # one whole connect: TCP, TLS, upgrade and login
DIAL_STAGGER = 0.25  # each further address of a node starts this much later
_READ_LIMIT = 256 << 10


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


async def _first_ok(tasks: list[asyncio.Task[socket.socket]]) -> socket.socket | None:
    """The socket of the first of ``tasks`` to succeed; None when every one fails (OSError)."""
    for fut in asyncio.as_completed(tasks):
        with contextlib.suppress(OSError):
            return await fut
    return None


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
            winner = await _first_ok(tasks)
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
        winner = await _first_ok(tasks)
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
