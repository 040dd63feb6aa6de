"""WireGuardCore with injected randomness and clocks: the same inputs give the same bytes.

Everything random in the core (ephemeral keys, sender indices, retransmit jitter, cookie secrets
and nonces) comes from its ``rng``; timestamps come from its ``wallclock``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nodeagent.engine.wireguard import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    PeerSpec,
    WGConfig,
    WireGuardCore,
    generate_private_key,
    public_key,
)
from tests.unit.wg_helpers import EP_A, EP_B, Clock, udp

KEY_A = generate_private_key(random.Random("a").randbytes)
KEY_B = generate_private_key(random.Random("b").randbytes)


def seeded(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def core(key: bytes, peer_key: bytes, endpoint: tuple[str, int], seed: int,
         under_load: Callable[[], bool] | None = None) -> WireGuardCore:
    clock = Clock()
    c = WireGuardCore(key, clock=clock, wallclock=clock.wall, rng=seeded(seed),
                      under_load=under_load, config=WGConfig(rekey_timeout_jitter=0.3))
    c.set_peers([PeerSpec(public_key(peer_key), endpoint=endpoint)])
    return c


def initiation(c: WireGuardCore) -> bytes:
    [(ep, msg)] = c.encrypt(c.peers()[0], [udp(b"x")])
    assert ep == EP_B and msg[0] == MSG_INITIATION and len(msg) == INITIATION_SIZE
    return msg


def test_generate_private_key_from_rng_is_clamped_and_reproducible() -> None:
    k = generate_private_key(lambda n: b"\xff" * n)
    assert k[0] == 0xF8 and k[31] == 0x7F and k[1:31] == b"\xff" * 30
    assert generate_private_key(seeded(7)) == generate_private_key(seeded(7))
    assert generate_private_key(seeded(7)) != generate_private_key(seeded(8))


def test_same_rng_and_clock_give_byte_identical_initiations() -> None:
    one, two = core(KEY_A, KEY_B, EP_B, 1), core(KEY_A, KEY_B, EP_B, 1)
    assert initiation(one) == initiation(two)
    # The retransmit jitter comes from the rng too: the timers agree.
    assert one.next_deadline() == two.next_deadline()
    # Another seed: another sender index and ephemeral key (the rest of the message differs).
    other = initiation(core(KEY_A, KEY_B, EP_B, 2))
    assert other[4:8] != initiation(core(KEY_A, KEY_B, EP_B, 1))[4:8]
    assert other[8:40] != initiation(core(KEY_A, KEY_B, EP_B, 1))[8:40]


def test_same_rng_gives_identical_responses_and_cookie_replies() -> None:
    init = initiation(core(KEY_A, KEY_B, EP_B, 1))
    replies = []
    for _ in range(2):
        b = core(KEY_B, KEY_A, EP_A, 5)
        [(_ep, resp)] = b.receive(init, EP_A).to_send
        assert resp[0] == MSG_RESPONSE
        replies.append(resp)
    assert replies[0] == replies[1]
    cookies = []
    for _ in range(2):
        loaded = core(KEY_B, KEY_A, EP_A, 9, under_load=lambda: True)
        [(_ep, reply)] = loaded.receive(init, EP_A).to_send
        assert reply[0] == MSG_COOKIE_REPLY and len(reply) == COOKIE_REPLY_SIZE
        cookies.append(reply)
    assert cookies[0] == cookies[1]


def test_whole_exchange_is_reproducible() -> None:
    def transcript() -> list[bytes]:
        a, b = core(KEY_A, KEY_B, EP_B, 11), core(KEY_B, KEY_A, EP_A, 12)
        wire: list[bytes] = []
        pending = [(EP_A, m) for _ep, m in a.encrypt(b.public_key, [udp(b"hello")])]
        while pending:
            src, msg = pending.pop(0)
            wire.append(msg)
            dst, dst_ep = (b, EP_B) if src == EP_A else (a, EP_A)
            pending += [(dst_ep, m) for _ep, m in dst.receive(msg, src).to_send]
        return wire

    first = transcript()
    assert [m[0] for m in first] == [MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT]
    assert transcript() == first
