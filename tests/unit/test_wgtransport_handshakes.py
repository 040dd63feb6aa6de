"""Two WireGuard transports on loopback: the handshake-message counters (and their metric) show
which side initiated — the initiator sent one initiation and no response, the responder the
reverse."""

from __future__ import annotations

import asyncio

import pytest
from nacl.public import PrivateKey

from nodeagent.engine.core import PeerConfig
from nodeagent.engine.wgtransport import WireGuardTransport
from nodeagent.engine.wireguard import MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE
from nodeagent.keys import NODE_PREFIX
from nodeagent.packet import build_udp

NAME = "nodeagent_wireguard_handshake_messages_sent_total"


def sent(t: WireGuardTransport, kind: str) -> float:
    (n,) = [v for name, _h, labels, v in t.metrics_samples()
            if name == NAME and labels == {"type": kind}]
    return n


@pytest.mark.asyncio
async def test_counters_tell_initiator_from_responder() -> None:
    loop = asyncio.get_running_loop()
    keys = [PrivateKey.generate() for _ in range(2)]
    names = [NODE_PREFIX + bytes(k.public_key).hex() for k in keys]
    got: list[bytes] = []
    arrived = asyncio.Event()

    def deliver(_peer: str, pkts: list[bytes]) -> None:
        got.extend(pkts)
        arrived.set()

    a = WireGuardTransport(bytes(keys[0]), port=0, bind="127.0.0.1")
    b = WireGuardTransport(bytes(keys[1]), port=0, bind="127.0.0.1")
    a.start(loop, lambda _p, _k: None)
    b.start(loop, deliver)
    try:
        a.configure([PeerConfig(names[1], allowed_ips=["100.64.0.2/32"],
                                endpoints=[f"127.0.0.1:{b.port}"])])
        b.configure([PeerConfig(names[0], allowed_ips=["100.64.0.1/32"])])  # no endpoint
        pkt = build_udp(4, 0x64400001, 0x64400002, 1000, 2000, b"hello")
        a.send(names[1], [pkt])  # queued behind the handshake a starts
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [pkt]
        hs_a, hs_b = a.core.handshakes_sent, b.core.handshakes_sent
        assert (hs_a[MSG_INITIATION], hs_a[MSG_RESPONSE]) == (1, 0)
        assert (hs_b[MSG_INITIATION], hs_b[MSG_RESPONSE]) == (0, 1)
        assert hs_a[MSG_COOKIE_REPLY] == hs_b[MSG_COOKIE_REPLY] == 0
        assert (sent(a, "initiation"), sent(a, "response"), sent(a, "cookie_reply")) == (1, 0, 0)
        assert (sent(b, "initiation"), sent(b, "response"), sent(b, "cookie_reply")) == (0, 1, 0)
    finally:
        a.close()
        b.close()
