"""The WireGuard UDP send path with an unusable destination in the middle of a batch: the bad
datagrams are dropped and counted, nothing raises, and the rest of the batch arrives on real
loopback sockets (with and without UDP GSO). Also: a peer's invalid endpoints are skipped when
the transport is configured."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from nacl.public import PrivateKey

from nodeagent.engine.core import PeerConfig
from nodeagent.engine.udpbatch import BadDestination, UdpOffload
from nodeagent.engine.wgtransport import WireGuardTransport
from nodeagent.keys import NODE_PREFIX


@pytest.fixture
def receivers() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def _drain(sock: socket.socket, n: int) -> list[bytes]:
    return [sock.recv(65535) for _ in range(n)]


def _nothing_more(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(65535)
    except BlockingIOError:
        return True
    return False


@pytest.mark.asyncio
@pytest.mark.parametrize("offload", [True, False])
async def test_a_bad_destination_mid_batch_drops_only_its_datagrams(
        offload: bool, receivers: list[socket.socket],
        caplog: pytest.LogCaptureFixture) -> None:
    r1, r2 = receivers
    ep1, ep2 = r1.getsockname(), r2.getsockname()
    t = WireGuardTransport(bytes(PrivateKey.generate()), port=0, bind="127.0.0.1",
                           udp_offload=offload)
    t.start(asyncio.get_running_loop(), lambda _p, _k: None)
    try:
        bad_port, bad_shape = ("127.0.0.1", 99999), ("127.0.0.1",)
        batch: list[tuple[Any, bytes]] = [
            (ep1, b"a" * 100), (ep1, b"b" * 100),          # one GSO group
            (bad_port, b"c" * 100), (bad_port, b"d" * 100),  # a group to a port > 65535
            (ep2, b"e" * 100),
            (bad_shape, b"f" * 100),
            (ep1, b"g" * 100),
        ]
        with caplog.at_level(logging.WARNING, "nodeagent.wireguard"):
            t._sendto(batch)
            t._sendto(batch)  # the same bad destinations again: counted, not logged again
        assert _drain(r1, 6) == [b"a" * 100, b"b" * 100, b"g" * 100] * 2
        assert _drain(r2, 2) == [b"e" * 100] * 2
        assert _nothing_more(r1) and _nothing_more(r2)
        assert t.counters["bad_destination"] == 6
        assert t.counters["tx_datagrams"] == 8 and t.counters["send_errors"] == 0
        logged = [r.getMessage() for r in caplog.records]
        assert len(logged) == 2 and all("bad destination" in m for m in logged)
        assert ("nodeagent_wireguard_bad_destination_total",
                "UDP datagrams dropped because their destination address was unusable", {},
                6) in t.metrics_samples()
        if offload:
            assert t.offload is not None and t.offload.counters["gso_sends"] >= 2
    finally:
        t.close()


def test_offload_send_returns_bad_destination_instead_of_raising() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        for enabled in (True, False):
            off = UdpOffload(s, enabled=enabled)
            for ep in (("127.0.0.1", 99999), ("127.0.0.1", -1), ("127.0.0.1", "x"), ("::1", 5)):
                failed, err = off.send(s, ep, [b"x" * 10, b"y" * 10, b"z" * 3])
                assert failed == 3 and isinstance(err, BadDestination)
                assert "bad destination" in str(err)
            assert off.counters["bad_destination"] == 12


def test_configure_skips_invalid_endpoints(caplog: pytest.LogCaptureFixture) -> None:
    t = WireGuardTransport(bytes(PrivateKey.generate()), port=0, bind="127.0.0.1")
    t.sock = t._open_socket()  # an IPv4 socket: IPv6 endpoints cannot be used from it
    try:
        raw = bytes(PrivateKey.generate().public_key)
        peer = PeerConfig(key=NODE_PREFIX + raw.hex(),
                          endpoints=["1.2.3.4:99999", "junk", "[2001:db8::1]:5",
                                     "127.0.0.1:41641"])
        with caplog.at_level(logging.WARNING, "nodeagent.wireguard"):
            t.configure([peer])
        assert t.core.peer_stats(raw)["endpoint"] == ("127.0.0.1", 41641)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "ignored 2 invalid peer endpoint(s)" in lines[0]
        other = bytes(PrivateKey.generate().public_key)
        t.configure([peer, PeerConfig(key=NODE_PREFIX + other.hex(), endpoints=["1.2.3.4:0"])])
        assert t.core.peer_stats(other)["endpoint"] is None
    finally:
        t.close()
