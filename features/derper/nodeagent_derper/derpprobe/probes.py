"""derpprobe's probes: what one round checks on every node of a DERP map, as :class:`ProbeResult`.

Per DERP node (not ``STUNOnly``), concurrently:

- ``tls``: TCP + TLS handshake to the DERP port, verified the way the agent verifies it (system
  trust store and name; a ``sha256-raw:`` pin; no verification for ``InsecureForTests``), then
  the leaf certificate's validity window: expired, not yet valid, or fewer than
  :data:`EXPIRES_SOON_DAYS` days left is a failure (also for ``InsecureForTests`` nodes). The
  latency is the TCP + TLS handshake.
- ``login``: a DERP login with a fresh key and ``IsProber`` in the ClientInfo; latency = dial
  to ServerInfo.
- ``packet``: two probe clients on the node; a packet from the first to the second and one back.
  Latency = that round trip.

Per node with ``STUNPort`` ≥ 0 (0 meaning 3478): ``stun``, one IPv4 binding request to the node
(its ``STUNTestIP`` when set). Latency = the request's round trip.

Per region with several DERP nodes, for every ordered pair (A, B): ``mesh``, a client on A sends
to a client on B, which answers back through B and A (the region's mesh carries both ways).
The packet is resent every :data:`RESEND_INTERVAL` until it arrives, since a mesh peer learns of
a new client a moment later. A pair with an end whose ``login`` failed in the same round is
``skip`` (that node's own row already fails). Every probe is bounded by ``timeout`` seconds and
never raises for what the network or the servers do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from nacl.public import PrivateKey

from nodeagent.derp.client import DerpClient, ReceivedPacket
from nodeagent.derp.debugcheck import stun_address
from nodeagent.derp.dial import (
    DerpDialError,
    derp_nodes,
    describe_error,
    dial_node,
    open_node_stream,
)
from nodeagent.derp.frames import ProtocolError
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

__all__ = ["EXPIRES_SOON_DAYS", "FAIL", "LOGIN", "MESH", "OK", "PACKET", "PROBES", "SKIP",
           "STUN", "TLS", "CertError", "ProbeResult", "cert_days_left", "node_id",
           "run_round"]

TLS, LOGIN, STUN, PACKET, MESH = "tls", "login", "stun", "packet", "mesh"
PROBES = (LOGIN, MESH, STUN, PACKET, TLS)  # display order
OK, FAIL, SKIP = "ok", "fail", "skip"
EXPIRES_SOON_DAYS = 7.0
RESEND_INTERVAL = 0.1
_PAYLOAD_TAG = b"nodeagent-derpprobe "


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one node (of one pair of nodes for ``mesh``) in one round."""

    region: int
    node: str  # the map's Name, else HostName
    host: str
    probe: str  # TLS, LOGIN, STUN, PACKET or MESH
    status: str  # OK, FAIL or SKIP
    latency: float | None = None  # seconds
    error: str = ""
    peer: str = ""  # MESH: the other node
    cert_days_left: float | None = None  # TLS
    at: float = 0.0  # wall-clock time the probe ended

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def key(self) -> tuple[int, str, str, str]:
        return (self.region, self.node, self.probe, self.peer)


def node_id(node: DERPNode) -> str:
    return node.Name or node.HostName


class CertError(ValueError):
    """The peer's certificate is unusable (unparsable, or outside its validity window)."""


def cert_days_left(der: bytes, now: dt.datetime | None = None) -> float:
    """Days until the DER certificate ``der`` expires; CertError when it cannot be parsed,
    is not valid yet, or has expired."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except Exception as e:  # cryptography raises ValueError and friends for garbage
        raise CertError(f"certificate does not parse: {type(e).__name__}") from None
    now = now or dt.datetime.now(dt.UTC)
    if now < not_before:
        raise CertError(f"certificate not valid before {not_before:%Y-%m-%d %H:%M} UTC")
    if now >= not_after:
        raise CertError(f"certificate expired {not_after:%Y-%m-%d %H:%M} UTC")
    return (not_after - now).total_seconds() / 86400


async def run_round(dm: DERPMap, *, timeout: float) -> list[ProbeResult]:
    """Every probe of every node of ``dm`` (regions concurrently); results in map order."""
    per_region = await asyncio.gather(*(_Region(r, timeout).run()
                                        for _, r in sorted(dm.Regions.items())))
    return [res for rs in per_region for res in rs]


class _Region:
    def __init__(self, region: DERPRegion, timeout: float) -> None:
        self.region = region
        self.timeout = timeout

    def _result(self, node: DERPNode, probe: str, status: str, **kw: Any) -> ProbeResult:
        return ProbeResult(region=self.region.RegionID, node=node_id(node), host=node.HostName,
                           probe=probe, status=status, at=time.time(), **kw)

    async def run(self) -> list[ProbeResult]:
        per_node = await asyncio.gather(*(self._node(n) for n in self.region.Nodes))
        out = [r for rs in per_node for r in rs]
        nodes = derp_nodes(self.region)
        if len(nodes) > 1:
            up = {r.node for r in out if r.probe == LOGIN and r.ok}
            pairs = [(a, b) for a in nodes for b in nodes if a is not b]
            out += await asyncio.gather(*(self._mesh(a, b, up) for a, b in pairs))
        return out

    async def _node(self, node: DERPNode) -> list[ProbeResult]:
        probes: list[Any] = []
        if not node.STUNOnly:
            probes += [self._guard(node, TLS, self._tls(node)),
                       self._guard(node, LOGIN, self._login(node)),
                       self._guard(node, PACKET, self._packet(node))]
        if node.STUNPort >= 0:
            probes.append(self._guard(node, STUN, self._stun(node)))
        return list(await asyncio.gather(*probes))

    async def _guard(self, node: DERPNode, probe: str, coro: Any) -> ProbeResult:
        """Run one probe within its bound (each step has ``timeout``; a probe has at most three
        steps); a bug in it is that probe's failure, not the round's."""
        try:
            async with asyncio.timeout(3 * self.timeout + 1):
                result: ProbeResult = await coro
            return result
        except TimeoutError:
            return self._result(node, probe, FAIL, error="timed out")
        except Exception as e:
            return self._result(node, probe, FAIL,
                                error=f"probe failed unexpectedly: {type(e).__name__}: {e}")

    # --- the probes ----------------------------------------------------------------------

    async def _tls(self, node: DERPNode) -> ProbeResult:
        t0 = time.perf_counter()
        try:
            _, writer = await open_node_stream(node, tcp_timeout=self.timeout,
                                               tls_timeout=self.timeout)
        except DerpDialError as e:
            return self._result(node, TLS, FAIL, error=e.reason)
        latency = time.perf_counter() - t0
        try:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if not der:
            return self._result(node, TLS, FAIL, latency=latency,
                                error="the server sent no certificate")
        try:
            days = cert_days_left(der)
        except CertError as e:
            return self._result(node, TLS, FAIL, latency=latency, error=str(e))
        if days < EXPIRES_SOON_DAYS:
            return self._result(node, TLS, FAIL, latency=latency, cert_days_left=days,
                                error=f"certificate expires in {days:.1f} days")
        return self._result(node, TLS, OK, latency=latency, cert_days_left=days)

    async def _dial(self, node: DERPNode) -> DerpClient:
        return await dial_node(node, bytes(PrivateKey.generate()), is_prober=True,
                               timeout=self.timeout)

    async def _login(self, node: DERPNode) -> ProbeResult:
        t0 = time.perf_counter()
        try:
            c = await self._dial(node)
        except DerpDialError as e:
            return self._result(node, LOGIN, FAIL, error=e.reason)
        latency = time.perf_counter() - t0
        await _close(c)
        return self._result(node, LOGIN, OK, latency=latency)

    async def _packet(self, node: DERPNode) -> ProbeResult:
        return await self._exchange(node, node, PACKET, "")

    async def _mesh(self, a: DERPNode, b: DERPNode, up: set[str]) -> ProbeResult:
        down = [node_id(n) for n in (a, b) if node_id(n) not in up]
        if down:
            return self._result(a, MESH, SKIP, peer=node_id(b),
                                error=f"not tried: login to {', '.join(down)} failed")
        return await self._guard(a, MESH, self._exchange(a, b, MESH, node_id(b)))

    async def _exchange(self, a: DERPNode, b: DERPNode, probe: str, peer: str) -> ProbeResult:
        """A packet from a client on ``a`` to a client on ``b`` and one back; the round trip."""
        clients: list[DerpClient] = []
        try:
            for n in (a, b):
                try:
                    clients.append(await self._dial(n))
                except DerpDialError as e:
                    return self._result(a, probe, FAIL, peer=peer,
                                        error=f"probe client could not log in: {e}")
            ca, cb = clients
            legs = ((ca, cb, f"to {peer}" if peer else "to the second client"),
                    (cb, ca, f"back from {peer}" if peer else "back"))
            t0 = time.perf_counter()
            leg = legs[0][2]
            try:
                async with asyncio.timeout(self.timeout):
                    for src, dst, leg in legs:  # noqa: B007 (leg names the failing one)
                        await _deliver(src, dst)
            except TimeoutError:
                return self._result(a, probe, FAIL, peer=peer,
                                    error=f"packet {leg} did not arrive within "
                                          f"{self.timeout:g}s")
            except (OSError, ValueError, ProtocolError) as e:
                return self._result(a, probe, FAIL, peer=peer, error=describe_error(e))
            return self._result(a, probe, OK, peer=peer, latency=time.perf_counter() - t0)
        finally:
            for c in clients:
                await _close(c)

    async def _stun(self, node: DERPNode) -> ProbeResult:
        from nodeagent.stun.client import stun_query

        try:
            where = await stun_address(node)
        except OSError as e:
            return self._result(node, STUN, FAIL, error=describe_error(e))
        if where is None:
            return self._result(node, STUN, SKIP, error="no IPv4 address")
        host, port = where
        try:
            _, rtt = await stun_query(host, port, timeout=self.timeout, family=socket.AF_INET)
        except (OSError, TimeoutError, ValueError) as e:
            return self._result(node, STUN, FAIL, error=f"{host} port {port}: {describe_error(e)}")
        return self._result(node, STUN, OK, latency=rtt)


async def _deliver(src: DerpClient, dst: DerpClient) -> None:
    """Send a fresh packet src → dst, again every RESEND_INTERVAL, until dst has it."""
    payload = _PAYLOAD_TAG + os.urandom(16)

    async def resend() -> None:
        while True:
            await src.send(dst.public_key, payload)
            await asyncio.sleep(RESEND_INTERVAL)

    async def receive() -> None:
        while True:
            ev = await dst.recv()
            if isinstance(ev, ReceivedPacket) and ev.data == payload:
                if ev.src != src.public_key:
                    raise ValueError("packet arrived with the wrong source key")
                return

    loop = asyncio.get_running_loop()
    sender, receiver = loop.create_task(resend()), loop.create_task(receive())
    try:
        done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()  # the receiver's success, or whichever side's error
    finally:
        for t in (sender, receiver):
            t.cancel()
        await asyncio.gather(sender, receiver, return_exceptions=True)


async def _close(c: DerpClient) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(c.close(), 2)
