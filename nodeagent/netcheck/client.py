"""Asyncio netcheck adapter: runs a probe plan over UDP, then HTTP(S) latency if UDP is blocked.

Owns the I/O of one report: the timers of the probe plan, DNS lookups of DERP node names, sending
STUN binding requests through a :class:`StunTransport`, the 3 s STUN phase inside the 5 s budget
with Tailscale's early stop, and the latency fallback over TCP. Decisions and bookkeeping live
in the sans-IO core ``nodeagent.netcheck.report``.

The STUN seam: a :class:`StunTransport` sends datagrams (``send``) and, while a receiver is
attached (``attach``), hands it every datagram that looks like STUN; the receiver returns True
for the replies it consumed. :class:`UDPStunTransport` — the default — owns two sockets of its
own (udp4 on ``0.0.0.0:0``, udp6 on ``[::]:0``), so a netcheck works standalone; the agent can
later pass a transport over its WireGuard socket so the mapped port is the one peers reach.

HTTP(S) latency fallback (only when no STUN reply arrived at all): per region, the nodes that
are not ``STUNOnly`` in map order; TCP to ``IPv4``/``IPv6`` (or ``HostName``'s addresses) on
``DERPPort`` (0 → 443), TLS with SNI ``HostName`` (``CertName`` when set; ``sha256-raw:<hex>``
pins the leaf certificate; ``InsecureForTests`` skips verification), then one
``GET /derp/latency-check`` (``/derp/probe`` if that is 404) timed from request to response.
Plain HTTP is tried only for a test node — ``InsecureForTests`` with a ``DERPPort`` — and before
TLS: ``derper --dev`` (ours and Tailscale's) serves plain HTTP, and a TLS test server refuses the
plain request at once (a TLS handshake against a plain-HTTP server would instead hang until its
timeout). Real nodes only ever get TLS. ICMP latency is not measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from nodeagent.netcheck.report import (
    SECOND,
    V4,
    V6,
    Probe,
    Report,
    ReportBuilder,
    ReportHistory,
    make_probe_plan,
    make_probe_plan_initial,
    stun_target,
)
from nodeagent.stun.codec import build_binding_request, is_stun, new_txid
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

log = logging.getLogger("nodeagent.netcheck")

__all__ = [
    "DEFAULT_STUN_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "NetcheckClient",
    "StunReceiver",
    "StunTransport",
    "UDPStunTransport",
    "https_latency",
    "interface_families",
    "os_has_ipv6",
    "run_netcheck",
]

DEFAULT_TIMEOUT = 5.0  # the whole report
DEFAULT_STUN_TIMEOUT = 3.0  # the STUN phase
DIAL_TIMEOUT = 1.5  # one TCP (+TLS) connection of the latency fallback
MAX_BODY = 8 << 10
MAX_DATAGRAM = 2048
LATENCY_PATHS = ("/derp/latency-check", "/derp/probe")
# Send errors that mean "the packet is lost", not "this family cannot send" (a firewall's EPERM,
# a full queue).
LOST_UDP_ERRNOS = frozenset((errno.EPERM, errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))

StunReceiver = Callable[[bytes, tuple[str, int]], bool]


class StunTransport(Protocol):
    """Where netcheck's STUN datagrams go out and come back in."""

    def send(self, addr: tuple[str, int], data: bytes) -> None:
        """Send one datagram to ``(ip, port)`` (an IP literal of either family). Raises OSError
        when it cannot be handed to the OS."""

    def attach(self, receiver: StunReceiver | None) -> None:
        """While attached, call ``receiver(data, (ip, port))`` with every received datagram
        that looks like STUN (``nodeagent.stun.codec.is_stun``); it returns True for the ones
        it consumed. ``None`` detaches."""


class UDPStunTransport:
    """The default transport: its own non-blocking udp4 and udp6 sockets, read by the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, v4: socket.socket | None,
                 v6: socket.socket | None, errors: list[str]) -> None:
        self._loop = loop
        self._socks = {V4: v4, V6: v6}
        self.bind_errors = errors  # why a family has no socket
        self._receiver: StunReceiver | None = None
        for s in (v4, v6):
            if s is not None:
                loop.add_reader(s.fileno(), self._readable, s)

    @classmethod
    def open(cls, *, bind_v4: tuple[str, int] | None = ("0.0.0.0", 0),
             bind_v6: tuple[str, int] | None = ("::", 0)) -> UDPStunTransport:
        """Bind the sockets (inside a running loop). A family that cannot be bound is left out
        and named in ``bind_errors``; ``None`` skips it."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        socks: dict[int, socket.socket | None] = {V4: None, V6: None}
        for fam, af, bind in ((V4, socket.AF_INET, bind_v4), (V6, socket.AF_INET6, bind_v6)):
            if bind is None:
                continue
            s = None
            try:
                s = socket.socket(af, socket.SOCK_DGRAM)
                if af == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.setblocking(False)
                s.bind(bind)
            except OSError as e:
                if s is not None:
                    s.close()
                errors.append(f"udp{fam}: {e.strerror or e}")
                continue
            socks[fam] = s
        return cls(loop, socks[V4], socks[V6], errors)

    def local_port(self, family: int) -> int | None:
        s = self._socks.get(family)
        return None if s is None else int(s.getsockname()[1])

    def send(self, addr: tuple[str, int], data: bytes) -> None:
        fam = V6 if ":" in addr[0] else V4
        s = self._socks.get(fam)
        if s is None:
            raise OSError(errno.EAFNOSUPPORT, f"no udp{fam} socket")
        s.sendto(data, addr)

    def attach(self, receiver: StunReceiver | None) -> None:
        self._receiver = receiver

    def _readable(self, sock: socket.socket) -> None:
        for _ in range(64):  # then let the loop run other work
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. a queued ICMP error; the next datagram may be fine
            receiver = self._receiver
            if receiver is not None and is_stun(data):
                receiver(data, (addr[0], addr[1]))

    def close(self) -> None:
        for fam, s in self._socks.items():
            if s is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(s.fileno())
                s.close()
                self._socks[fam] = None
        self._receiver = None


def _has_route(af: int, dest: str) -> bool:
    try:
        with socket.socket(af, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))  # a route lookup only; nothing is sent
            return True
    except OSError:
        return False


def interface_families() -> tuple[bool, bool]:
    """(have IPv4, have IPv6): whether the host has a route to the Internet in each family
    (checked by connecting a UDP socket to a documentation address; nothing is sent)."""
    return _has_route(socket.AF_INET, "192.0.2.1"), _has_route(socket.AF_INET6, "2001:db8::1")


def os_has_ipv6() -> bool:
    """Tailscale's ``OSHasIPv6``: a UDP socket can be bound to ``[::1]:0``."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
            return True
    except OSError:
        return False


# --- HTTP(S) latency ---------------------------------------------------------------------------


class LatencyCheckError(Exception):
    """An HTTP(S) latency check that gave no latency; the message says why."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _tls_for(node: DERPNode) -> tuple[ssl.SSLContext, str, str | None]:
    """(context, server name, pinned SHA-256 hex or None) for a DERP node."""
    name = node.HostName
    pin = None
    if node.CertName.startswith("sha256-raw:"):
        pin = node.CertName.removeprefix("sha256-raw:").lower()
    elif node.CertName:
        name = node.CertName
    if node.InsecureForTests or pin is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx, name, pin


async def _dial_addresses(node: DERPNode, port: int) -> list[tuple[int, str]]:
    """(family, ip) to try for ``node``: forced ``IPv4``/``IPv6`` (a non-IP value disables the
    family), an IP-literal ``HostName``, else its DNS addresses; IPv4 first."""
    loop = asyncio.get_running_loop()
    out: list[tuple[int, str]] = []
    for fam, forced, af in ((V4, node.IPv4, socket.AF_INET), (V6, node.IPv6, socket.AF_INET6)):
        want = ipaddress.IPv4Address if fam == V4 else ipaddress.IPv6Address
        if forced:
            with contextlib.suppress(ValueError):
                if isinstance(ipaddress.ip_address(forced), want):
                    out.append((fam, forced))
            continue
        if not node.HostName:
            continue
        try:
            ip = ipaddress.ip_address(node.HostName)
        except ValueError:
            pass
        else:
            if isinstance(ip, want):
                out.append((fam, str(ip)))
            continue
        try:
            infos = await loop.getaddrinfo(node.HostName, port, family=af,
                                           type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        if infos:
            out.append((fam, str(infos[0][4][0])))
    return out


def _schemes(node: DERPNode) -> tuple[bool, ...]:
    """TLS or not, in the order to try: TLS only, except that a test node (``InsecureForTests``
    with a ``DERPPort``) is first asked over plain HTTP, as ``derper --dev`` serves."""
    return (False, True) if node.InsecureForTests and node.DERPPort else (True,)


async def _open(ip: str, port: int, node: DERPNode,
                tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if not tls:
        return await asyncio.wait_for(asyncio.open_connection(ip, port), DIAL_TIMEOUT)
    ctx, name, pin = _tls_for(node)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(ip, port, ssl=ctx, server_hostname=name,
                                ssl_handshake_timeout=DIAL_TIMEOUT), DIAL_TIMEOUT)
    if pin is not None:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
        if der is None or hashlib.sha256(der).hexdigest() != pin:
            writer.close()
            raise LatencyCheckError(f"certificate of {node.Name or ip} does not match CertName")
    return reader, writer


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       host: str, path: str, ns_clock: Callable[[], int]) -> int:
    """Time one GET on an open connection; return nanoseconds or raise LatencyCheckError."""
    req = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodeagent-netcheck\r\n"
           "Connection: close\r\n\r\n").encode("ascii", "replace")
    t0 = ns_clock()
    writer.write(req)
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise LatencyCheckError(f"no HTTP response head: {type(e).__name__}") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise LatencyCheckError(f"not an HTTP response: {lines[0][:60]!r}")
    status = int(parts[1])
    length: int | None = None
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length" and v.strip().isdigit():
            length = int(v.strip())
    if length is not None:
        want = min(length, MAX_BODY)
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readexactly(want)
    else:
        got = 0
        while got < MAX_BODY:
            chunk = await reader.read(MAX_BODY - got)
            if not chunk:
                break
            got += len(chunk)
    t1 = ns_clock()
    if status > 299:
        raise LatencyCheckError(f"{path}: HTTP {status}", status)
    return max(0, t1 - t0)


async def _node_latency(node: DERPNode, ns_clock: Callable[[], int]) -> tuple[int, int]:
    port = node.DERPPort or 443
    if not 0 < port <= 0xFFFF:
        raise LatencyCheckError(f"DERPPort {node.DERPPort} out of range")
    addrs = await _dial_addresses(node, port)
    if not addrs:
        raise LatencyCheckError(f"no address for {node.Name or node.HostName!r}")
    last: Exception | None = None
    for fam, ip in addrs:
        for tls in _schemes(node):
            for path in LATENCY_PATHS:
                try:
                    reader, writer = await _open(ip, port, node, tls)
                except (OSError, TimeoutError, LatencyCheckError) as e:
                    last = e
                    break  # no connection this way: the next scheme or address
                try:
                    return await _one_request(reader, writer, node.HostName or ip, path,
                                              ns_clock), fam
                except (OSError, TimeoutError, LatencyCheckError) as e:
                    last = e
                    if not (isinstance(e, LatencyCheckError) and e.status == 404):
                        break  # only "not found" is worth the other path
                finally:
                    writer.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.wait_closed(), 0.5)
    raise LatencyCheckError(f"{node.Name or node.HostName}: {last}")


async def https_latency(region: DERPRegion, *,
                        ns_clock: Callable[[], int] = time.perf_counter_ns
                        ) -> tuple[int, int] | None:
    """(latency ns, family 4 or 6) of the first non-STUNOnly node of ``region`` that answers
    the latency check, or None. Failures are logged at debug level."""
    for node in region.Nodes:
        if node.STUNOnly:
            continue
        try:
            return await _node_latency(node, ns_clock)
        except (OSError, TimeoutError, LatencyCheckError, ValueError) as e:
            log.debug("netcheck: latency check of region %d failed: %s", region.RegionID, e)
    return None


# --- the client --------------------------------------------------------------------------------


class NetcheckClient:
    """Makes reports. Long-lived owners (the agent) keep one, with its :class:`ReportHistory`
    (incremental reports, PreferredDERP hysteresis) and, later, a transport over the WireGuard
    socket; :func:`run_netcheck` is the one-shot form."""

    def __init__(self, *, transport: StunTransport | None = None,
                 history: ReportHistory | None = None, timeout: float = DEFAULT_TIMEOUT,
                 stun_timeout: float = DEFAULT_STUN_TIMEOUT, have_v4: bool | None = None,
                 have_v6: bool | None = None,
                 ns_clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.transport = transport
        self.history = history if history is not None else ReportHistory()
        self.timeout = timeout
        self.stun_timeout = stun_timeout
        self.have_v4 = have_v4
        self.have_v6 = have_v6
        self.ns_clock = ns_clock
        self.last_bind_errors: list[str] = []
        self._lock = asyncio.Lock()
        self._builder: ReportBuilder | None = None
        self._phase_done: asyncio.Event | None = None
        self._early_timer: asyncio.TimerHandle | None = None

    def receive_stun(self, data: bytes, addr: tuple[str, int]) -> bool:
        """A STUN datagram arrived (the transport's owner calls this): True if it answered one
        of the running report's probes. Never raises."""
        b = self._builder
        if b is None:
            return False
        matched = b.receive(data, self.ns_clock())
        if matched:
            self._progress()
        return matched

    def _progress(self) -> None:
        b, done = self._builder, self._phase_done
        if b is None or done is None:
            return
        if b.all_sets_done():
            done.set()
            return
        wait = b.take_early_stop()
        if wait is not None:
            self._early_timer = asyncio.get_running_loop().call_later(wait / SECOND, done.set)

    async def get_report(self, dm: DERPMap, *, verbose: bool = False,
                         force_full: bool = False) -> Report:
        """One report over ``dm``; its ``PreferredDERP`` is chosen with this client's
        history. Reports run one at a time."""
        async with self._lock:
            return await self._get_report(dm, verbose=verbose, force_full=force_full)

    async def _get_report(self, dm: DERPMap, *, verbose: bool, force_full: bool) -> Report:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        started = self.history.clock()
        full = force_full or self.history.next_is_full()
        have_v4, have_v6 = self.have_v4, self.have_v6
        if have_v4 is None or have_v6 is None:
            auto4, auto6 = interface_families()
            have_v4 = auto4 if have_v4 is None else have_v4
            have_v6 = auto6 if have_v6 is None else have_v6
        if full:
            plan = make_probe_plan_initial(dm, have_v4=have_v4, have_v6=have_v6)
        else:
            plan = make_probe_plan(dm, have_v4=have_v4, have_v6=have_v6,
                                   last=self.history.last)
        b = ReportBuilder(plan, full=full, verbose=verbose)
        b.report.OSHasIPv6 = os_has_ipv6()
        if plan:
            await self._stun_phase(b, min(self.stun_timeout, self.timeout))
        remaining = deadline - loop.time()
        if not b.report.UDP and remaining > 0:
            await self._latency_phase(b, dm, remaining)
        report = b.finish()
        self.history.add_report(report, dm, full=full, started=started)
        return report

    async def _stun_phase(self, b: ReportBuilder, limit: float) -> None:
        loop = asyncio.get_running_loop()
        own: UDPStunTransport | None = None
        transport = self.transport
        if transport is None:
            own = UDPStunTransport.open()
            self.last_bind_errors = own.bind_errors
            if len(own.bind_errors) == 2:
                log.warning("netcheck: UDP test failure: %s", "; ".join(own.bind_errors))
            transport = own
        self._builder, self._phase_done = b, asyncio.Event()
        transport.attach(self.receive_stun)
        start = loop.time()
        tasks = [loop.create_task(self._probe(b, transport, p, start))
                 for probes in b.plan.values() for p in probes]
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._phase_done.wait(), limit)
        finally:
            transport.attach(None)
            if self._early_timer is not None:
                self._early_timer.cancel()
                self._early_timer = None
            self._builder, self._phase_done = None, None
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if own is not None:
                own.close()

    async def _probe(self, b: ReportBuilder, transport: StunTransport, probe: Probe,
                     start: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start + probe.delay - loop.time()))
        if not b.should_fire(probe):
            self._progress()
            return
        target = stun_target(probe.node, probe.family)
        host = target.host if target is not None else ""
        if target is not None and target.resolve:
            af = socket.AF_INET if probe.family == V4 else socket.AF_INET6
            try:
                infos = await loop.getaddrinfo(target.host, target.port, family=af,
                                               type=socket.SOCK_DGRAM)
                host = str(infos[0][4][0]) if infos else ""
            except (OSError, UnicodeError):
                host = ""
        if target is None or not host:
            b.note_unsendable(probe)
            self._progress()
            return
        if b.set_done(probe.set_name):
            return
        txid = new_txid()
        b.note_sent(probe, txid, self.ns_clock())
        try:
            transport.send((host, target.port), build_binding_request(txid))
            ok = True
        except OSError as e:
            ok = e.errno in LOST_UDP_ERRNOS
            log.debug("netcheck: STUN to %s:%d: %s", host, target.port, e)
        b.note_send_result(probe, txid, ok)
        self._progress()

    async def _latency_phase(self, b: ReportBuilder, dm: DERPMap, limit: float) -> None:
        async def one(rid: int) -> None:
            res = await https_latency(dm.Regions[rid], ns_clock=self.ns_clock)
            if res is not None:
                b.add_https_latency(rid, res[0], res[1])

        tasks = [asyncio.ensure_future(one(rid)) for rid in b.https_regions(dm)]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_netcheck(derpmap: DERPMap, *, send_stun: StunTransport | None = None,
                       history: ReportHistory | None = None, timeout: float = DEFAULT_TIMEOUT,
                       stun_timeout: float = DEFAULT_STUN_TIMEOUT, verbose: bool = False,
                       have_v4: bool | None = None, have_v6: bool | None = None,
                       force_full: bool = False) -> Report:
    """One network report over ``derpmap``. Without ``send_stun`` the STUN requests go out of
    two sockets of its own; with it, through that transport (which must pass received STUN
    datagrams to the attached receiver). Without ``history`` the report is one-shot (full, no
    hysteresis). ``have_v4``/``have_v6`` override the interface check; ``verbose`` waits for up
    to 100 regions before the early stop, as ``tailscale netcheck --verbose`` does."""
    client = NetcheckClient(transport=send_stun, history=history, timeout=timeout,
                            stun_timeout=stun_timeout, have_v4=have_v4, have_v6=have_v6)
    return await client.get_report(derpmap, verbose=verbose, force_full=force_full)
