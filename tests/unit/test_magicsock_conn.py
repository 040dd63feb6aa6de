"""MagicConn wired to two real WireGuard transports on loopback, with an in-memory DERP between
them: traffic flows via DERP when UDP cannot, upgrades to the direct path after disco pongs,
falls back to DERP when the direct path dies, and the WireGuard session survives every switch."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from nodeagent.engine.core import PeerConfig
from nodeagent.engine.wgtransport import WireGuardTransport
from nodeagent.keys import DISCO_PREFIX, NODE_PREFIX, KeyPair
from nodeagent.magicsock.conn import MagicConn
from nodeagent.magicsock.core import MagicCore
from nodeagent.packet.build import build_udp

REGION = 1


class FakeDerp:
    """Delivers DERP sends to the other side's MagicConn on the next loop iteration."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, MagicConn] = {}
        self.keys: dict[int, bytes] = {}  # id(conn) → its node key
        self.up = True
        self.sent = 0

    def sender(self, me: bytes) -> Callable[[int, bytes, bytes], bool]:
        def send(region: int, dst: bytes, pkt: bytes) -> bool:
            target = self.nodes.get(dst)
            if target is None or not self.up:
                return False
            self.sent += 1
            asyncio.get_running_loop().call_soon(target.on_derp_packet, region, me, pkt)
            return True
        return send


class _Derp:
    def __init__(self, fn: Callable[[int, bytes, bytes], bool]) -> None:
        self.send = fn

    def send_many(self, region: int, dst: bytes, pkts: list[bytes]) -> bool:
        return all([self.send(region, dst, p) for p in pkts])


class Side:
    def __init__(self, derp: FakeDerp) -> None:
        self.node = KeyPair.generate()
        self.disco = KeyPair.generate()
        self.transport = WireGuardTransport(self.node.private, port=0, bind="127.0.0.1",
                                            udp_offload=False)
        self.core = MagicCore(self.disco.private, self.node.public)
        self.conn = MagicConn(self.transport, self.core, _Derp(derp.sender(self.node.public)))
        derp.nodes[self.node.public] = self.conn
        self.received: list[bytes] = []
        self.got = asyncio.Event()

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(_peer: str, pkts: list[bytes]) -> None:
            self.received += pkts
            self.got.set()

        self.transport.start(loop, deliver)
        self.conn.start(loop)

    def peer_config(self, endpoint_port: int | None) -> PeerConfig:
        return PeerConfig(key=self.node.public_text(NODE_PREFIX),
                          allowed_ips=["100.64.0.1/32"],
                          endpoints=[f"127.0.0.1:{endpoint_port}"] if endpoint_port else [],
                          disco_key=self.disco.public_text(DISCO_PREFIX), home_derp=REGION)

    def close(self) -> None:
        self.conn.close()
        self.transport.close()


def block(transport: WireGuardTransport) -> None:
    """Drop every UDP datagram this transport sends from now on (DERP is unaffected)."""
    transport.send_udp = lambda host, port, segs: None  # type: ignore[method-assign]


def dead_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def send_until_received(a: Side, b: Side, payload: bytes, timeout: float = 10.0) -> None:
    pkt = build_udp(4, 0x64400001, 0x64400002, 1000, 2000, payload)
    key = b.node.public_text(NODE_PREFIX)

    async def loop() -> None:
        while pkt not in b.received:
            b.got.clear()
            a.transport.send(key, [pkt])
            try:
                await asyncio.wait_for(b.got.wait(), 0.5)
            except TimeoutError:
                pass

    await asyncio.wait_for(loop(), timeout)


@pytest.mark.asyncio
async def test_derp_then_direct_then_derp_again_one_session() -> None:
    derp = FakeDerp()
    a, b = Side(derp), Side(derp)
    a.start()
    b.start()
    try:
        # Candidates point at dead ports: only DERP works at first.
        a.core.set_local_endpoints([("127.0.0.1", dead_port())])
        b.core.set_local_endpoints([("127.0.0.1", dead_port())])
        a.transport.configure([b.peer_config(dead_port())])
        b.transport.configure([a.peer_config(dead_port())])
        await send_until_received(a, b, b"via derp")
        assert a.conn.counters["tx_derp_packets"] > 0
        assert a.conn.counters["tx_direct_packets"] == 0
        hs = a.transport.core.peer_stats(b.node.public)["handshakes"]

        # The right endpoints arrive (a new netmap): disco pings find the direct path.
        a.transport.configure([b.peer_config(b.transport.port)])
        b.transport.configure([a.peer_config(a.transport.port)])

        async def direct() -> None:
            while a.core.status(b.node.public).cur_addr == "":
                await send_until_received(a, b, b"probe")
                await asyncio.sleep(0.05)

        await asyncio.wait_for(direct(), 10)
        before = derp.sent
        await send_until_received(a, b, b"direct now")
        assert a.core.status(b.node.public).cur_addr == f"127.0.0.1:{b.transport.port}"
        assert a.conn.counters["path_switches"] >= 1
        assert derp.sent == before  # trusted direct path: no DERP copy

        # The direct path dies (a firewall drops UDP both ways): within the trust time plus a
        # ping timeout traffic is on DERP again, on the same WireGuard session.
        for side in (a, b):
            block(side.transport)
        await send_until_received(a, b, b"back on derp", timeout=15)
        await send_until_received(b, a, b"and back", timeout=15)
        assert a.core.status(b.node.public).cur_addr == ""
        assert a.transport.core.peer_stats(b.node.public)["handshakes"] == hs  # same session
    finally:
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_user_ping_via_derp_and_direct() -> None:
    derp = FakeDerp()
    a, b = Side(derp), Side(derp)
    a.start()
    b.start()
    try:
        a.transport.configure([b.peer_config(b.transport.port)])
        b.transport.configure([a.peer_config(a.transport.port)])
        pong = await a.conn.ping(b.node.public, timeout=5)
        assert pong is not None and pong.latency >= 0
        assert pong.endpoint == f"127.0.0.1:{b.transport.port}" or pong.derp_region == REGION
        derp.up = False
        # Once trusted, a ping goes straight to the direct address.
        while not a.core.status(b.node.public).cur_addr:
            await a.conn.ping(b.node.public, timeout=1)
        pong = await a.conn.ping(b.node.public, timeout=5)
        assert pong is not None and pong.endpoint == f"127.0.0.1:{b.transport.port}"
        assert pong.derp_region == 0
    finally:
        a.close()
        b.close()


def test_peer_status_active_means_we_sent_not_that_we_received() -> None:
    # Tailscale's status: a peer is Active (and has a LastWrite) once we send it data or a
    # user's ping, whatever it sends us; the engine's receive time does not count.
    import time

    from nodeagent.magicsock.core import PeerInfo
    from nodeagent.magicsock.layer import PathLayer

    me, peer, peer_disco = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    transport = WireGuardTransport(me.private, port=0, bind="127.0.0.1", udp_offload=False)
    layer = PathLayer(transport, me, KeyPair.generate())
    layer.core.set_peers([PeerInfo(peer.public, peer_disco.public, REGION)])
    assert layer.peer_status(KeyPair.generate().public) is None  # not a magicsock peer
    assert layer.peer_status(peer.public) == {"CurAddr": "", "Active": False, "LastWrite": 0.0}
    layer.core.ping(peer.public)  # a user's ping counts as a send
    st = layer.peer_status(peer.public)
    assert st is not None and st["Active"] is True and st["CurAddr"] == ""
    assert abs(st["LastWrite"] - time.time()) < 5


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_derp_dial_to_a_forced_ipv4_does_not_wait_for_dns(loop_kind: str) -> None:
    # A DERP map node with IPv4 forced and a HostName whose lookup hangs, as on a LAN whose
    # resolver does not answer: the IPv4 dial must not wait for DNS (Tailscale races the
    # families). It used to resolve every family first, and to connect with uvloop's
    # sock_connect, which sends even a numeric address through getaddrinfo (libuv runs two
    # lookups at a time): the DERP connect, and `debug derp`'s 5 s logins, waited out the
    # resolver's timeout.
    import time

    from nodeagent.derp.manager import open_node_stream
    from nodeagent.tailcfg import DERPNode

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    node = DERPNode(Name="1a", RegionID=1, HostName="derp.example.invalid", IPv4="127.0.0.1",
                    DERPPort=srv.getsockname()[1])
    lookups: list[Any] = []

    async def slow_dns(host: Any, *args: Any, **kw: Any) -> Any:
        lookups.append((host, kw.get("family", 0)))
        await asyncio.sleep(3)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    async def dial() -> float:
        loop = asyncio.get_running_loop()
        loop.getaddrinfo = slow_dns  # type: ignore[method-assign]
        t0 = time.monotonic()
        _, writer = await open_node_stream(node, plain_http=True)
        took = time.monotonic() - t0
        writer.close()
        return took

    try:
        if loop_kind == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            took = uvloop.run(dial())
        else:
            took = asyncio.run(dial())
    finally:
        srv.close()
    assert lookups == [("derp.example.invalid", socket.AF_INET6)]  # only IPv6 needed DNS
    assert took < 1.0, took
