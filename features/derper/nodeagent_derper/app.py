"""The derper process: listeners, routes, TLS, STUN, background tasks and graceful shutdown.

Owns ``DerperOptions`` (the resolved command line) and ``Derper``, which binds the main listener
(TLS when the port is 443 or ``--certmode manual``, Tailscale's rule; plain HTTP otherwise), the
plain ``--http-port`` listener in TLS mode, the STUN sockets, the accept-rate limiter, the ACME
renewal and bootstrap-DNS tasks, and stops them all in order (the relay last announces a restart
to its clients). The DERP relay itself is ``nodeagent_derper.server.DerpServer``; the listening
and accepted TCP sockets are set up by :mod:`nodeagent_derper.listen`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from nodeagent.netguard import (
    ConnLimiter,
    ThrottledLog,
    raise_nofile_limit,
    request_timeout,
)
from nodeagent_derper import home
from nodeagent_derper.acme_manager import LETSENCRYPT_DIRECTORY, AcmeManager
from nodeagent_derper.certs import (
    POLL_SECONDS,
    CertError,
    CertStore,
    ensure_self_signed_for_ip,
    is_ip,
)
from nodeagent_derper.debug import DebugHandlers
from nodeagent_derper.listen import (
    DEFAULT_TCP_KEEPALIVE,
    DEFAULT_TCP_USER_TIMEOUT,
    listen_sockets,
    split_hostport,
    tune_accepted,
)
from nodeagent_derper.metrics import DerperMetrics
from nodeagent_derper.server import DEFAULT_WRITE_TIMEOUT
from nodeagent_derper.stun_ratelimit import (
    DEFAULT_BURST,
    DEFAULT_GLOBAL_RATE,
    DEFAULT_RATE,
    StunRateLimits,
    TokenBucket,
)
from nodeagent_derper.stun_server import start_stun
from nodeagent_derper.verify import Admission, build_admission

log = logging.getLogger("derper")

DEV_ADDR = "localhost:3340"
HANDSHAKE_TIMEOUT = 10.0
# Simultaneous connections per source IP that have not logged in to DERP yet (HTTP requests,
# TLS handshakes and DERP handshakes in progress). Logged-in clients do not count, so a whole
# office behind one NAT is fine; a stranger holding sockets open is not.
DEFAULT_MAX_PENDING_PER_IP = 256


class StartupError(Exception):
    """The derper cannot start; the message is one line for the operator."""


@dataclass
class DerperOptions:
    private_key: bytes
    addr: str = ":443"
    hostname: str = "derp.tailscale.com"
    certmode: str = "letsencrypt"
    certdir: str = ""
    http_port: int = 80
    stun: bool = True
    stun_port: int = 3478
    stun_strict: bool = False
    stun_rate_limit: float = DEFAULT_RATE  # STUN replies/s to one source; 0 = unlimited
    stun_rate_burst: int = DEFAULT_BURST
    stun_global_rate_limit: float = DEFAULT_GLOBAL_RATE  # STUN replies/s in total; 0 = unlimited
    derp: bool = True
    dev: bool = False
    home: str = ""
    bootstrap_dns_names: list[str] = field(default_factory=list)
    acme_directory: str = LETSENCRYPT_DIRECTORY
    acme_email: str = ""
    accept_connection_limit: float = math.inf
    accept_connection_burst: int = 2**31 - 1
    mesh_key: str | None = None  # 64 lowercase hex digits
    mesh_with: list[str] = field(default_factory=list)  # --mesh-with entries (needs mesh_key)
    rate_limit_bytes_per_sec: int | None = None
    rate_limit_burst: int | None = None
    rate_config: str = ""  # the --rate-config file, re-read on SIGHUP
    tcp_keepalive: float = DEFAULT_TCP_KEEPALIVE  # idle seconds before probes; 0 = off
    tcp_user_timeout: float = DEFAULT_TCP_USER_TIMEOUT  # seconds; 0 = the kernel's default
    cert_poll_interval: float = POLL_SECONDS  # seconds between certificate file checks
    write_timeout: float = DEFAULT_WRITE_TIMEOUT  # seconds; 0 disables
    max_pending_per_ip: int = DEFAULT_MAX_PENDING_PER_IP  # 0 disables
    verify_clients: bool = False  # admit only node keys the local nodeagent knows
    socket: str = ""  # its LocalAPI socket ("" = nodeagent's default)
    verify_client_url: str = ""  # admission webhook
    verify_client_url_fail_open: bool = True


def uses_tls(opts: DerperOptions) -> bool:
    """Tailscale's rule: HTTPS iff the listen port is 443 or certmode is manual (not in --dev)."""
    if opts.dev:
        return False
    _, port = split_hostport(opts.addr)
    return port == 443 or opts.certmode == "manual"


class Derper:
    """One running derper. ``start()`` binds everything; ``stop()`` shuts down gracefully."""

    def __init__(self, opts: DerperOptions, *, derp_server: Any = None,
                 registry: CollectorRegistry | None = None) -> None:
        from nodeagent.version import __version__

        self.opts = opts
        self.registry = registry or CollectorRegistry()
        self.metrics = DerperMetrics(self.registry, version=__version__)
        self.version = __version__
        self.started = time.time()
        self.tls = uses_tls(opts)
        self._derp = derp_server
        self.cert_store: CertStore | None = None
        self.acme: AcmeManager | None = None
        self.bootstrap = home.BootstrapDNS(opts.bootstrap_dns_names,
                                           self.metrics.bootstrap_dns_requests.inc)
        self._runners: list[web.AppRunner] = []
        self._listeners: list[socket.socket] = []
        self._stun: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._bucket = (TokenBucket(opts.accept_connection_limit, opts.accept_connection_burst)
                        if math.isfinite(opts.accept_connection_limit) else None)
        self._pending = ConnLimiter(opts.max_pending_per_ip or 2**62, log,
                                    "source IP with connections not logged in:")
        self._accept_log = ThrottledLog(log)
        self.main_port = 0
        self.http_port = 0
        self.stun_port = 0
        self.stopped = asyncio.Event()
        self.mesh: Any = None  # nodeagent_derper.mesh.Mesh once started with --mesh-with
        self.admission: Admission | None = None  # the client checks, when configured

    # --- construction of the pieces ---

    def _derp_server(self) -> Any:
        if self._derp is None:
            from nodeagent_derper.server import DerpServer

            o = self.opts
            self._derp = DerpServer(o.private_key, mesh_key=o.mesh_key,
                                    rate_limit_bytes_per_sec=o.rate_limit_bytes_per_sec,
                                    rate_limit_burst=o.rate_limit_burst,
                                    write_timeout=o.write_timeout, registry=self.registry)
            # --verify-clients / --verify-client-url (nodeagent_derper.verify)
            self.admission = build_admission(o.verify_clients, o.socket, o.verify_client_url,
                                             o.verify_client_url_fail_open, self.registry)
            self._derp.verify_client = self.admission
        if hasattr(self._derp, "on_login"):
            self._derp.on_login = self._logged_in
        return self._derp

    def _logged_in(self, conn: Any) -> None:
        if conn.remote is not None:
            self._pending.release_name(conn.remote)

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "uptime": f"{time.time() - self.started:.0f}s",
                "hostname": self.opts.hostname, "TLS": self.tls,
                "certmode": self.opts.certmode if self.tls else "-",
                "mesh key": self.opts.mesh_key is not None, "derp": self.opts.derp,
                "STUN port": self.stun_port if self.opts.stun else "off",
                **({"mesh peers": self.mesh.summary()} if self.mesh is not None else {})}

    def display_name(self) -> str:
        """The name the home page shows: ``--hostname`` when it means something (TLS is served
        for it, or it was given), else where this derper listens (``--dev`` keeps the default
        hostname, which names some other server)."""
        o = self.opts
        if self.tls or o.hostname != DerperOptions.hostname:
            return o.hostname
        try:
            host, _ = split_hostport(o.addr)
        except ValueError:
            host = ""
        host = host.strip("[]") or socket.gethostname()
        return f"[{host}]:{self.main_port}" if ":" in host else f"{host}:{self.main_port}"

    def _stats(self) -> dict[str, Any]:
        if self._derp is None or not self.opts.derp:
            return {}
        st = self._derp.stats()
        if self.mesh is not None:
            st["mesh"] = self.mesh.stats()
        if self.admission is not None:
            st["admission"] = self.admission.stats()
        return st

    async def _derp_disabled(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="derp server disabled\n")

    def build_main_app(self) -> web.Application:
        app = web.Application()
        r = app.router
        derp = self._derp_server() if self.opts.derp else None
        r.add_route("*", "/derp", derp.handle_http if derp is not None else self._derp_disabled)
        r.add_route("*", "/derp/probe", home.probe)
        r.add_route("*", "/derp/latency-check", home.probe)
        r.add_get("/generate_204", home.generate_204)
        r.add_get("/robots.txt", home.robots)
        r.add_get("/bootstrap-dns", self.bootstrap.handle)
        r.add_get("/", home.HomePage(self.opts.home, self.display_name, self.opts.derp).handle)
        DebugHandlers(self.registry, self.info, self._stats).add_routes(app)
        return app

    def build_http_port_app(self) -> web.Application:
        app = web.Application()
        handler = home.PlainPortHandler(self.acme.challenges if self.acme else None,
                                        self.main_port, self.opts.hostname)
        r = app.router
        r.add_get("/.well-known/acme-challenge/{token}", handler.acme_challenge)
        r.add_get("/generate_204", home.generate_204)
        DebugHandlers(self.registry, self.info, self._stats).add_routes(app)
        r.add_route("*", "/{tail:.*}", handler.other)
        return app

    def _setup_tls(self) -> ssl.SSLContext:
        o = self.opts
        if o.certmode not in ("manual", "letsencrypt"):
            raise StartupError(f"--certmode {o.certmode!r}: want manual or letsencrypt")
        if not o.certdir:
            raise StartupError("--certdir is empty")

        def loaded(not_after: float) -> None:
            self.metrics.cert_reloads.inc()
            self.metrics.cert_expiry.set(not_after)

        self.cert_store = CertStore(o.certdir, o.hostname, on_load=loaded)

        def obtained() -> None:
            self.metrics.acme_renewals.inc()
            if self.cert_store is not None:
                self.cert_store.reload()

        if o.certmode == "manual":
            if is_ip(o.hostname):
                pin = ensure_self_signed_for_ip(o.certdir, o.hostname)
                if pin is not None:
                    log.info("created a self-signed certificate for %s; DERP map CertName: %s",
                             o.hostname, pin)
            try:
                self.cert_store.load()
            except CertError as e:
                raise StartupError(str(e)) from None
        else:
            if is_ip(o.hostname):
                raise StartupError("--certmode letsencrypt needs a DNS --hostname, not an IP")
            if o.http_port < 0:
                raise StartupError("--certmode letsencrypt needs --http-port for the "
                                   "HTTP-01 challenge")
            self.acme = AcmeManager(o.hostname, o.certdir, directory_url=o.acme_directory,
                                    email=o.acme_email,
                                    on_obtained=obtained,
                                    on_failed=self.metrics.acme_failures.inc)
            with contextlib.suppress(CertError):
                self.cert_store.load()  # a certificate from an earlier run, if any
        return self.cert_store.server_context()

    # --- serving ---

    def _spawn(self, coro: Any, conn: bool = False) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        group = self._conn_tasks if conn else self._tasks
        group.add(t)
        t.add_done_callback(group.discard)
        return t

    async def _serve_conn(self, factory: Any, conn: socket.socket, addr: Any,
                          ctx: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                factory, conn, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ctx else None)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            conn.close()  # failed TLS handshake or a client gone before it finished
            if not self._pending.release_name(addr):
                self._pending.release(addr[0])

    async def _accept_loop(self, lsock: socket.socket, factory: Any,
                           ctx: ssl.SSLContext | None, limited: bool) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as e:
                # EMFILE and friends: say so once per interval, give connections time to end
                # (idle ones are closed by the request deadline), then go on accepting.
                self.metrics.accept_errors.inc()
                self._accept_log.warning("accept on %s: %s; retrying",
                                         lsock.getsockname()[:2], e.strerror or e)
                await asyncio.sleep(0.1)
                continue
            if limited and self._bucket is not None and not self._bucket.take(time.monotonic()):
                self.metrics.rejected.inc()
                conn.close()
                continue
            if limited and not pending.try_acquire(addr[0]):
                pending.refuse(addr[0])
                self.metrics.rejected_pending.inc()
                conn.close()
                continue
            self.metrics.accepted.inc()
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tune_accepted(conn, self.opts.tcp_keepalive, self.opts.tcp_user_timeout)
            conn_factory = pending.wrap_held(factory, addr[0], addr) if limited else factory
            self._spawn(self._serve_conn(conn_factory, conn, addr, ctx), conn=True)

    async def _serve_app(self, app: web.Application, host: str, port: int,
                         ctx: ssl.SSLContext | None, limited: bool,
                         wrap_derp: bool = False) -> int:
        # tcp_keepalive=False: aiohttp would switch SO_KEEPALIVE on with the kernel's timers;
        # tune_accepted applies --tcp-keepalive-time instead.
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               keepalive_timeout=request_timeout(), tcp_keepalive=False)
        await runner.setup()
        self._runners.append(runner)
        socks = listen_sockets(host, port)
        self._listeners.extend(socks)
        factory: Any = runner.server
        if wrap_derp and self._derp is not None and hasattr(self._derp, "wrap_protocol_factory"):
            # Lets the relay see bytes a fast-start client pipelines behind its request.
            factory = self._derp.wrap_protocol_factory(factory)
        for s in socks:
            self._spawn(self._accept_loop(s, factory, ctx, limited))
        return socks[0].getsockname()[1]

    async def start(self) -> None:
        """Bind and start everything; ``StartupError`` (one line) when something cannot."""
        o = self.opts
        try:
            host, port = split_hostport(o.addr)
        except ValueError as e:
            raise StartupError(str(e)) from None
        raise_nofile_limit()
        try:
            ctx = self._setup_tls() if self.tls else None
            self.main_port = await self._serve_app(self.build_main_app(), host, port, ctx,
                                                   limited=True, wrap_derp=True)
            if self.tls and o.http_port >= 0:
                self.http_port = await self._serve_app(self.build_http_port_app(), host,
                                                       o.http_port, None, limited=False)
            if o.stun:
                limits = StunRateLimits(rate=o.stun_rate_limit, burst=o.stun_rate_burst,
                                        global_rate=o.stun_global_rate_limit)
                self._stun = await start_stun(host, o.stun_port, self.metrics,
                                              strict=o.stun_strict, limits=limits)
                self.stun_port = self._stun[0].get_extra_info("sockname")[1]
        except OSError as e:
            await self.stop(graceful=False)
            raise StartupError(e.strerror or str(e)) from None
        except BaseException:
            await self.stop(graceful=False)
            raise
        if self.acme is not None:
            self._spawn(self.acme.run())
        if self.cert_store is not None and o.cert_poll_interval > 0:
            self._spawn(self._poll_certs(self.cert_store, o.cert_poll_interval))
        if o.bootstrap_dns_names:
            self._spawn(self.bootstrap.run())
        if o.mesh_with and o.derp and self._derp is not None:
            self._start_mesh(host)
        scheme = "https" if self.tls else "http"
        log.info("derper serving %s on %s port %d%s%s", scheme, host or "*", self.main_port,
                 f", http on {self.http_port}" if self.http_port else "",
                 f", STUN on UDP {self.stun_port}" if self._stun else "")

    def _start_mesh(self, listen_host: str) -> None:
        from nodeagent_derper.mesh import Mesh, is_self, parse_entry

        o = self.opts
        targets: list[tuple[str, str | None]] = []
        for entry in o.mesh_with:
            try:
                if is_self(entry, o.hostname, listen_host, self.main_port):
                    continue
                target = parse_entry(entry)
            except ValueError as e:
                raise StartupError(str(e)) from None
            if target not in targets:
                targets.append(target)
        try:
            self.mesh = Mesh(self._derp, targets)
        except ValueError as e:
            raise StartupError(f"--mesh-with: {e}") from None
        self.mesh.start()
        log.info("mesh with %s", ", ".join(u for u, _ in targets) or "no other derper")

    async def _poll_certs(self, store: CertStore, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            store.poll()

    def reload_certs(self) -> None:
        """SIGHUP: re-read the certificate files now (a broken pair keeps the old one)."""
        if self.cert_store is not None:
            self.cert_store.reload()

    def set_rate_limit(self, rate: int | None, burst: int | None) -> None:
        """New per-client receive rate limit for current and future DERP connections."""
        self.opts.rate_limit_bytes_per_sec, self.opts.rate_limit_burst = rate, burst
        if self._derp is not None and hasattr(self._derp, "set_rate_limit"):
            self._derp.set_rate_limit(rate, burst)

    async def stop(self, graceful: bool = True) -> None:
        """Stop accepting, tell DERP clients (Restarting frame when graceful), close all."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        for tr in self._stun:
            tr.close()
        self._stun.clear()
        for t in list(self._tasks):
            t.cancel()
        if self.mesh is not None:
            try:
                await asyncio.wait_for(self.mesh.stop(), 5.0)
            except Exception as e:
                log.warning("mesh shutdown: %s", e)
        if self._derp is not None:
            try:
                await asyncio.wait_for(self._derp.shutdown(graceful=graceful), 10.0)
            except Exception as e:  # shutdown must go on whatever the relay does
                log.warning("DERP shutdown: %s", e)
        for t in list(self._conn_tasks):
            t.cancel()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self.admission is not None:
            await self.admission.close()
        pending = [*self._tasks, *self._conn_tasks]
        if pending:
            await asyncio.wait(pending, timeout=5.0)


def default_certdir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tailscale", "derper-certs")
