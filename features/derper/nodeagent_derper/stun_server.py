"""The derper's STUN server: UDP sockets (IPv4 and IPv6-only) answering binding requests.

Owns the datagram protocol and socket setup. Classification and response bytes come from the
sans-IO ``nodeagent.stun.codec``, the answer-or-refuse decision from the sans-IO
``nodeagent_derper.stun_ratelimit``; every datagram is counted by disposition, answered ones also
by address family and client kind. Nothing is logged per packet.

Anti-reflection. UDP sources can be spoofed, so a STUN server is a potential reflector: the
reply goes to whoever the request claims to come from. Two rules bound what it can be used for:

- **Size.** For every request answered, ``len(reply) <= len(request) + A``, where ``A`` is the
  size of one XOR-MAPPED-ADDRESS attribute for the source's address family
  (``codec.mapped_address_attr_len``): 12 bytes for IPv4, 24 for IPv6. The reply is a 20-byte
  header plus exactly that one attribute (an RFC 3489 reply carries a MAPPED-ADDRESS of the same
  size) — no padding, no SOFTWARE or other attribute — and nothing shorter than a 20-byte header
  is ever answered, so the rule holds for every accepted request and no accepted request has to
  be refused for its size. A bare 20-byte RFC 5389 request gets 32 bytes (IPv4) or 44 (IPv6),
  the rule's limit; Tailscale's 40-byte request (header + SOFTWARE ``tailnode`` + FINGERPRINT)
  gets the same 32/44 bytes, less than it sent. One request never gets more than one datagram.
- **Rate.** Replies are capped per source (IPv4 address / IPv6 /64) and globally by token
  buckets (``StunRateLimits``; defaults far above what netcheck needs). A request over a limit is
  not answered, is counted as ``stun_requests_total{disposition="rate_limited"}``, and refusals
  are logged as one summary line at most once per ``REFUSAL_LOG_INTERVAL``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from nodeagent.stun.codec import (
    ACCEPTED_KINDS,
    build_response_for,
    parse_binding_request,
)
from nodeagent_derper.metrics import DerperMetrics
from nodeagent_derper.stun_ratelimit import (
    ALLOWED,
    RefusalReport,
    StunRateLimits,
    StunReplyLimiter,
)

log = logging.getLogger("derper.stun")


class StunProtocol(asyncio.DatagramProtocol):
    """Answers binding requests on one socket (those ``limiter`` allows, when given); ignores
    and counts everything else. ``report`` throttles the refusal log lines."""

    __slots__ = ("_strict", "_m", "_success", "_write_error", "_rate_limited", "_limiter",
                 "_report", "transport")

    def __init__(self, metrics: DerperMetrics, *, strict: bool = False,
                 limiter: StunReplyLimiter | None = None,
                 report: RefusalReport | None = None) -> None:
        self._strict = strict
        self._m = metrics
        self._success = metrics.stun["success"]
        self._write_error = metrics.stun["write_error"]
        self._rate_limited = metrics.stun["rate_limited"]
        self._limiter = limiter
        self._report = report if report is not None else RefusalReport()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        kind, txid = parse_binding_request(data, strict=self._strict)
        if kind not in ACCEPTED_KINDS:
            self._m.stun[kind].inc()
            return
        host, port = addr[0], addr[1]
        if self._limiter is not None:
            verdict = self._limiter.check(host)
            if verdict != ALLOWED:
                self._rate_limited.inc()
                msg = self._report.note(verdict, host)
                if msg is not None:
                    log.warning("%s", msg)
                return
        try:
            resp = build_response_for(kind, txid, host, port)
            self.transport.sendto(resp, addr)  # type: ignore[union-attr]
        except (OSError, ValueError):
            self._write_error.inc()
            return
        self._success.inc()
        self._m.stun_kind[kind].inc()
        v4 = "." in host and (":" not in host or host.startswith("::ffff:"))
        self._m.stun_family["ipv4" if v4 else "ipv6"].inc()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies surface here on Linux; count, never stop serving.
        self._m.stun["read_error"].inc()


def _udp_socket(family: int, host: str, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            # Separate v4 and v6 sockets: IPv4 clients then arrive (and are answered) as IPv4.
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # No SO_REUSEADDR: on UDP it would let a second derper share the port silently (and
        # Linux would hand each datagram to one of them); a busy port must fail like TCP's.
        s.bind((host, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def stun_bind_hosts(listen_host: str) -> list[tuple[int, str]]:
    """(family, host) pairs to bind for the host part of ``-a`` ("" = all of v4 and v6)."""
    if listen_host in ("", "*"):
        return [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
    if listen_host == "localhost":
        return [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    fam = socket.AF_INET6 if ":" in listen_host else socket.AF_INET
    return [(fam, listen_host.strip("[]"))]


async def start_stun(listen_host: str, port: int, metrics: DerperMetrics, *,
                     strict: bool = False, limits: StunRateLimits | None = StunRateLimits()
                     ) -> list[asyncio.DatagramTransport]:
    """Open the STUN sockets; an IPv6 wildcard that cannot be opened (no IPv6 on the host) is
    skipped, any other bind failure raises ``OSError``. ``limits`` caps the replies (one
    limiter and one refusal log shared by all sockets); ``None`` or all rates 0 = unlimited."""
    loop = asyncio.get_running_loop()
    limiter = StunReplyLimiter(limits) if limits is not None and limits.enabled else None
    report = RefusalReport()
    transports: list[asyncio.DatagramTransport] = []
    pairs = stun_bind_hosts(listen_host)
    try:
        for fam, host in pairs:
            try:
                sock = _udp_socket(fam, host, port)
            except OSError as e:
                if fam == socket.AF_INET6 and len(pairs) > 1 and not _is_in_use(e):
                    log.info("STUN: no IPv6 socket on [%s]:%d (%s); IPv4 only", host, port, e)
                    continue
                raise OSError(e.errno, f"STUN: cannot listen on UDP {host}:{port}: "
                              f"{e.strerror}") from None
            tr, _ = await loop.create_datagram_endpoint(
                lambda: StunProtocol(metrics, strict=strict, limiter=limiter, report=report),
                sock=sock)
            transports.append(tr)
            if port == 0:
                port = sock.getsockname()[1]  # same port for the second family
    except BaseException:
        for tr in transports:
            tr.close()
        raise
    return transports


def _is_in_use(e: OSError) -> bool:
    return e.errno == errno.EADDRINUSE
