"""The checks behind ``debug derp REGION`` (LocalAPI ``POST debug-derp-region``): one region of
the DERP map probed from this host, the findings as plain sentences.

Owns :func:`check_region` and its :class:`Report` (``Info``, ``Warnings``, ``Errors``; the JSON
shape Tailscale's CLI prints, empty lists as ``null``). Stops early, with one Error, when there is
no DERP map, no such region (given by ID or code) or no node in it. Otherwise, for every node
(concurrently, reported in map order; every line names the node's ``HostName``):

- DERP nodes (not ``STUNOnly``): a TCP and TLS connection over IPv4 and over IPv6 to its DERP
  port (a family the map disables, or for which the name has no address, is noted and skipped;
  IPv4 failing is an Error, IPv6 failing a Warning, since this host may lack IPv6);
  ``GET /generate_204`` (the captive-portal probe) on the DERP port with the node's scheme,
  and on plain HTTP port 80 as well when the node says ``CanPort80`` (failures are Warnings);
  five DERP logins with fresh keys (an Error when one fails or the server keys differ); then a
  packet round trip between two temporary clients through the node (our own addition), and
  from the region's first node to each other one (the region's mesh).
- Every node: one IPv4 STUN binding request (``STUNTestIP`` when set; skipped when
  ``STUNPort`` is negative). No answer is an Error.

Dialling follows :mod:`nodeagent.derp.dial` (forced addresses, TLS verification, the plain
HTTP knob for development derpers).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PrivateKey

from nodeagent.derp.client import DerpClient, ReceivedPacket
from nodeagent.derp.dial import (
    DerpDialError,
    derp_nodes,
    describe_error,
    dial_node,
    node_addresses,
    node_label,
    node_port,
    open_node_stream,
    plain_http_from_env,
)
from nodeagent.netcheck.report import V4, stun_target
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

__all__ = ["LOGINS", "Report", "check_region", "find_region", "stun_address"]

LOGINS = 5  # DERP logins per node; their server keys must agree
STEP_TIMEOUT = 5.0  # each connection, request, login or STUN query


@dataclass
class Report:
    Info: list[str] = field(default_factory=list)
    Warnings: list[str] = field(default_factory=list)
    Errors: list[str] = field(default_factory=list)

    def extend(self, other: Report) -> None:
        self.Info += other.Info
        self.Warnings += other.Warnings
        self.Errors += other.Errors

    def to_json(self) -> dict[str, list[str] | None]:
        """Tailscale's shape: empty lists are ``null``."""
        return {"Info": self.Info or None, "Warnings": self.Warnings or None,
                "Errors": self.Errors or None}


def find_region(dm: DERPMap, arg: str) -> DERPRegion | None:
    """The region named by ID (``"900"``) or by code (``"nyc"``, any case)."""
    arg = arg.strip()
    if arg.isdigit() and int(arg) in dm.Regions:
        return dm.Regions[int(arg)]
    for rid in sorted(dm.Regions):
        r = dm.Regions[rid]
        if r.RegionCode and r.RegionCode.lower() == arg.lower():
            return r
    return None


async def check_region(dm: DERPMap | None, region_arg: str, *, plain_http: bool | None = None,
                       timeout: float = STEP_TIMEOUT, logins: int = LOGINS) -> Report:
    """Probe ``region_arg`` of ``dm`` (see the module docstring). Never raises for anything the
    network or the map does; every outcome is a line of the report."""
    rep = Report()
    if dm is None or not dm.Regions:
        rep.Errors.append("no DERP map (not connected?)")
        return rep
    region = find_region(dm, region_arg)
    if region is None:
        rep.Errors.append(f'no such region "{region_arg}" in DERP map')
        return rep
    name = f" ({region.RegionName})" if region.RegionName else ""
    rep.Info.append(f'Region {region.RegionID} == "{region.RegionCode}"{name}')
    if not region.Nodes:
        rep.Errors.append("Region has no nodes defined")
        return rep
    plain = plain_http_from_env() if plain_http is None else plain_http
    c = _Checker(plain, timeout, logins)
    per_node = await asyncio.gather(*(c.node(n) for n in region.Nodes))
    for r, _ in per_node:
        rep.extend(r)
    if not derp_nodes(region):
        rep.Warnings.append("Region has only STUN nodes: no DERP relay to check")
        return rep
    reachable = [n for n, (_, logged_in) in zip(region.Nodes, per_node, strict=True)
                 if logged_in]
    if reachable:
        rep.extend(await c.mesh(reachable[0], reachable[1:]))
    return rep


class _Checker:
    def __init__(self, plain_http: bool, timeout: float, logins: int) -> None:
        self.plain = plain_http
        self.timeout = timeout
        self.logins = logins

    async def node(self, node: DERPNode) -> tuple[Report, bool]:
        """The node's findings, and whether DERP logins to it work."""
        rep = Report()
        logged_in = False
        try:
            if not node.STUNOnly:
                await self._connect(node, rep)
                await self._generate_204(node, rep)
                logged_in = await self._logins(node, rep)
                if logged_in:
                    await self._round_trip(node, node, rep)
            await self._stun(node, rep)
        except Exception as e:  # a bug must not hide the other findings
            rep.Errors.append(f"{node_label(node)}: check failed unexpectedly: "
                              f"{type(e).__name__}: {e}")
        return rep, logged_in

    async def mesh(self, first: DERPNode, others: list[DERPNode]) -> Report:
        rep = Report()
        for other in others:
            await self._round_trip(first, other, rep)
        return rep

    # --- the steps ------------------------------------------------------------------------

    def _scheme(self) -> str:
        return "HTTP" if self.plain else "TLS"

    async def _connect(self, node: DERPNode, rep: Report) -> None:
        label = node_label(node)
        port = node_port(node, self.plain)
        for fam, fname, fatal in ((socket.AF_INET, "IPv4", True),
                                  (socket.AF_INET6, "IPv6", False)):
            field_value = node.IPv4 if fam == socket.AF_INET else node.IPv6
            try:
                addrs = await node_addresses(node, fam)
            except OSError as e:
                (rep.Errors if fatal else rep.Warnings).append(
                    f"{label}: {e} ({fname})")
                continue
            if not addrs:
                why = ("disabled in the DERP map" if field_value else
                       "no address for the host name")
                rep.Info.append(f"{label}: {fname} not checked ({why})")
                continue
            t0 = time.perf_counter()
            try:
                _, writer = await open_node_stream(node, family=fam, plain_http=self.plain,
                                                   tcp_timeout=self.timeout,
                                                   tls_timeout=self.timeout)
            except DerpDialError as e:
                what = "TCP+TLS" if not self.plain else "TCP"
                (rep.Errors if fatal else rep.Warnings).append(
                    f"{label}: could not connect ({what}) over {fname} to {addrs[0]} port "
                    f"{port}: {e.reason}")
                continue
            ms = (time.perf_counter() - t0) * 1000
            peer = writer.get_extra_info("peername")
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            where = peer[0] if peer else addrs[0]
            rep.Info.append(f"Successfully established a {self._scheme()} connection to "
                            f"{label} over {fname} ({where} port {port}) in {ms:.1f} ms")

    async def _http_204(self, node: DERPNode, *, port80: bool) -> tuple[bool, str]:
        """GET /generate_204 with a challenge; (ok, what happened)."""
        challenge = f"ts_{node.HostName}"
        plain = self.plain or port80
        target = node if not port80 else _with_port(node, 80)
        reader, writer = await open_node_stream(target, plain_http=plain,
                                                tcp_timeout=self.timeout,
                                                tls_timeout=self.timeout)
        try:
            port = node_port(target, plain)
            host = f"[{node.HostName}]" if ":" in node.HostName else node.HostName
            default = 80 if plain else 443
            if port != default:
                host = f"{host}:{port}"
            writer.write((f"GET /generate_204?t={int(time.time())} HTTP/1.1\r\nHost: {host}\r\n"
                          f"X-Tailscale-Challenge: {challenge}\r\nConnection: close\r\n"
                          "User-Agent: nodeagent-derpcheck\r\n\r\n").encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (ln.partition(":") for ln in lines[1:] if ":" in ln)}
        if len(status) < 2 or status[1] != "204":
            return False, f"answered {lines[0][:80]!r}, want 204"
        if headers.get("x-tailscale-response") != f"response {challenge}":
            return False, "answered 204 without echoing the X-Tailscale-Challenge"
        return True, "answered 204 with the challenge echoed"

    async def _generate_204(self, node: DERPNode, rep: Report) -> None:
        label = node_label(node)
        scheme = "http" if self.plain else "https"
        ways = [(False, f"{scheme} port {node_port(node, self.plain)}")]
        if node.CanPort80 and not (self.plain and node_port(node, True) == 80):
            ways.append((True, "plain http port 80"))
        for port80, how in ways:
            try:
                ok, what = await self._http_204(node, port80=port80)
            except (DerpDialError, OSError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as e:
                why = e.reason if isinstance(e, DerpDialError) else describe_error(e)
                ok, what = False, f"failed: {why}"
            line = f"{label}: GET /generate_204 over {how} {what}"
            (rep.Info if ok else rep.Warnings).append(line)

    async def _logins(self, node: DERPNode, rep: Report) -> bool:
        label = node_label(node)
        keys: list[bytes] = []
        for i in range(self.logins):
            try:
                c = await dial_node(node, bytes(PrivateKey.generate()), plain_http=self.plain,
                                    is_prober=True, timeout=self.timeout)
            except DerpDialError as e:
                rep.Errors.append(f"{label}: DERP login {i + 1} of {self.logins} failed: "
                                  f"{e.reason}")
                return False
            keys.append(c.server_public_key)
            await c.close()
        distinct = sorted({k.hex() for k in keys})
        if len(distinct) > 1:
            rep.Errors.append(f"{label}: {len(distinct)} different server keys in "
                              f"{self.logins} DERP logins (a load balancer in front of "
                              f"several derpers?): "
                              + ", ".join(f"nodekey:{k[:16]}..." for k in distinct))
        elif distinct:
            rep.Info.append(f"{label}: {self.logins} DERP logins succeeded; server key "
                            f"nodekey:{distinct[0]}")
        return True

    async def _round_trip(self, a_node: DERPNode, b_node: DERPNode, rep: Report) -> None:
        same = a_node is b_node
        where = (f"through {node_label(a_node)}" if same else
                 f"from {node_label(a_node)} to {node_label(b_node)} (mesh)")
        clients: list[DerpClient] = []
        try:
            try:
                for n in (a_node, b_node):
                    clients.append(await dial_node(n, bytes(PrivateKey.generate()),
                                                   plain_http=self.plain, is_prober=True,
                                                   timeout=self.timeout))
            except DerpDialError as e:
                rep.Errors.append(f"Packet round trip {where}: could not log in: {e}")
                return
            a, b = clients
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(_one_way(a, b), self.timeout)
                await asyncio.wait_for(_one_way(b, a), self.timeout)
            except TimeoutError:
                rep.Errors.append(f"Packet round trip {where}: a packet between two "
                                  f"temporary clients did not arrive within "
                                  f"{self.timeout:g}s")
                return
            except (OSError, ConnectionError, ValueError) as e:
                rep.Errors.append(f"Packet round trip {where} failed: {describe_error(e)}")
                return
            ms = (time.perf_counter() - t0) * 1000
            rep.Info.append(f"Packet round trip {where} between two temporary clients: "
                            f"{ms:.1f} ms")
        finally:
            for c in clients:
                with contextlib.suppress(Exception):
                    await c.close()

    async def _stun(self, node: DERPNode, rep: Report) -> None:
        from nodeagent.stun.client import stun_query

        label = node_label(node)
        if node.STUNPort < 0:
            rep.Info.append(f"{label}: STUN disabled in the DERP map (STUNPort < 0)")
            return
        try:
            where = await stun_address(node)
        except OSError as e:
            rep.Errors.append(f"{label}: STUN not tried: {e}")
            return
        if where is None:
            rep.Warnings.append(f"{label}: STUN not tried: no IPv4 address")
            return
        host, port = where
        try:
            (ip, mport), rtt = await stun_query(host, port, timeout=self.timeout,
                                                family=socket.AF_INET)
        except (OSError, TimeoutError) as e:
            rep.Errors.append(f"{label}: STUN request to {host} port {port} failed: "
                              f"{describe_error(e)}")
            return
        rep.Info.append(f"{label}: STUN to {host} port {port} answered in "
                        f"{rtt * 1000:.1f} ms; this host is {ip}:{mport} from there")


async def stun_address(node: DERPNode) -> tuple[str, int] | None:
    """Where an IPv4 STUN request to ``node`` goes, as (IP, port): netcheck's target
    (``STUNTestIP``, a forced or literal IPv4, else ``HostName`` resolved); None when the node
    has no IPv4 STUN address. OSError when ``HostName`` does not resolve. derpprobe uses it too."""
    target = stun_target(node, V4)
    if target is None:
        return None
    if not target.resolve:
        return target.host, target.port
    addrs = await node_addresses(node, socket.AF_INET)
    return (addrs[0], target.port) if addrs else None


async def _one_way(src: DerpClient, dst: DerpClient) -> None:
    """Send a random packet src → dst until it arrives (a mesh peer may learn dst late)."""
    payload = b"nodeagent-derpcheck " + os.urandom(16)

    async def resend() -> None:
        while True:
            await src.send(dst.public_key, payload)
            await asyncio.sleep(0.1)

    sender = asyncio.get_running_loop().create_task(resend())
    try:
        while True:
            ev: Any = await dst.recv()
            if isinstance(ev, ReceivedPacket) and ev.data == payload:
                if ev.src != src.public_key:
                    raise ValueError("packet arrived with the wrong source key")
                return
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender


def _with_port(node: DERPNode, port: int) -> DERPNode:
    return dataclasses.replace(node, DERPPort=port)
