"""Asyncio STUN client: one binding request to a server, the mapped address and round-trip time.

Owns the UDP socket for a single query, retransmission (RFC 5389 style doubling from 500 ms)
and matching the reply by transaction ID. Parsing lives in ``nodeagent.stun.codec``.
"""

from __future__ import annotations

import asyncio
import socket
import time

from nodeagent.stun.codec import (
    StunError,
    build_binding_request,
    new_txid,
    parse_binding_response,
)

DEFAULT_PORT = 3478
DEFAULT_TIMEOUT = 3.0
_FIRST_RTO = 0.5


class StunTimeout(TimeoutError):
    """No matching binding response arrived in time."""


class _Query(asyncio.DatagramProtocol):
    def __init__(self, txid: bytes) -> None:
        self.txid = txid
        self.done: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        self.last_error: str | None = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done():
            return
        try:
            txid, host, port = parse_binding_response(data)
        except StunError as e:
            self.last_error = str(e)  # keep waiting: it may be stray traffic
            return
        if txid == self.txid:
            self.done.set_result((host, port))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def stun_query(host: str, port: int = DEFAULT_PORT, timeout: float = DEFAULT_TIMEOUT, *,
                     family: int = 0, local_addr: tuple[str, int] | None = None
                     ) -> tuple[tuple[str, int], float]:
    """Send a Tailscale-form binding request to ``host:port``; return ``((ip, port), rtt_s)``.

    Raises ``StunTimeout`` when nothing matching arrives within ``timeout`` seconds, ``OSError``
    for resolution or socket errors (e.g. ICMP port unreachable). ``local_addr`` binds the
    client socket (the answer should then name that port, unless a NAT is in between)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    fam, _, _, _, sockaddr = infos[0]
    txid = new_txid()
    req = build_binding_request(txid)
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Query(txid), remote_addr=sockaddr[:2],
        family=fam, local_addr=local_addr)
    try:
        deadline = loop.time() + timeout
        rto = _FIRST_RTO
        while (wait := min(rto, deadline - loop.time())) > 0:
            sent = time.perf_counter()
            transport.sendto(req)
            try:
                mapped = await asyncio.wait_for(asyncio.shield(proto.done), wait)
            except TimeoutError:
                rto *= 2
                continue
            return mapped, time.perf_counter() - sent
        extra = f" (last reply: {proto.last_error})" if proto.last_error else ""
        raise StunTimeout(f"no STUN response from {host}:{port} within {timeout:g}s{extra}")
    finally:
        transport.close()
