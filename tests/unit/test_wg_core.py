"""WireGuardCore between two in-memory peers: handshakes, data, timers, rekeys, bad input."""

from __future__ import annotations

import pytest

from nodeagent.engine.wireguard import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    PeerSpec,
    WGConfig,
    WireGuardCore,
    generate_private_key,
)
from tests.unit.wg_helpers import EP_A, EP_B, Net, udp

FAST = WGConfig(rekey_after_time=1.0, reject_after_time=3.0, rekey_timeout=0.5,
                rekey_timeout_jitter=0.0, keepalive_timeout=0.5, rekey_attempt_time=2.0)


def established(config: WGConfig | None = None) -> Net:
    net = Net(config)
    net.send_a(udp(b"first"))
    assert net.got["b"] == [udp(b"first")]
    return net


def test_a_initiates_then_data_flows_both_ways() -> None:
    net = established()
    assert net.types() == [MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT]
    sizes = [len(m) for _s, _d, m in net.wire[:2]]
    assert sizes == [INITIATION_SIZE, RESPONSE_SIZE]
    net.send_b(udp(b"back"))
    net.send_a(udp(b"again"))
    assert net.got == {"a": [udp(b"back")], "b": [udp(b"first"), udp(b"again")]}
    assert net.a.counters["handshakes"] == 1 and net.b.counters["handshakes"] == 1
    assert sum(net.a.drops.values()) == 0 and sum(net.b.drops.values()) == 0
    sa, sb = net.a.peer_stats(net.b.public_key), net.b.peer_stats(net.a.public_key)
    assert sa["tx_bytes"] == sb["rx_bytes"] > 0 and sb["tx_bytes"] == sa["rx_bytes"] > 0
    assert sa["last_handshake"] == net.clock.wall() and sa["endpoint"] == EP_B


def test_b_initiates() -> None:
    net = Net()
    net.send_b(udp(b"from-b"))
    assert net.got["a"] == [udp(b"from-b")]
    assert net.types(EP_B)[0] == MSG_INITIATION
    net.send_a(udp(b"reply"))
    assert net.got["b"] == [udp(b"reply")]


def test_crossing_initiations_converge() -> None:
    net = Net()
    out_a = net.a.encrypt(net.b.public_key, [udp(b"x")])
    out_b = net.b.encrypt(net.a.public_key, [udp(b"y")])
    net.deliver(out_a, EP_A)
    net.deliver(out_b, EP_B)
    net.run(2.0)
    net.send_a(udp(b"after-a"))
    net.send_b(udp(b"after-b"))
    assert udp(b"after-a") in net.got["b"] and udp(b"after-b") in net.got["a"]


def test_responder_sends_nothing_before_confirmation() -> None:
    net = Net()
    init = net.a.encrypt(net.b.public_key, [udp(b"q")])
    resp = net.b.receive(init[0][1], EP_A).to_send
    assert [m[0] for _e, m in resp] == [MSG_RESPONSE]
    # B has a session in "next" only: its data waits, no transport message leaves
    assert net.b.encrypt(net.a.public_key, [udp(b"early")]) == []
    assert net.b.peer_stats(net.a.public_key)["queued"] == 1
    confirm = net.a.receive(resp[0][1], EP_B).to_send
    assert [m[0] for _e, m in confirm] == [MSG_TRANSPORT]
    out = net.b.receive(confirm[0][1], EP_A)
    assert [p for _k, p in out.plaintexts] == [udp(b"q")]
    # confirmation released the queued packet
    net.deliver(out.to_send, EP_B)
    assert net.got["a"] == [udp(b"early")]


def test_keepalive_confirms_when_nothing_is_queued() -> None:
    net = Net()
    net.deliver(net.a.encrypt(net.b.public_key, []), EP_A)
    assert net.types() == [MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT]
    assert len(net.wire[-1][2]) == 32  # empty plaintext: header + tag
    assert net.b.peer_stats(net.a.public_key)["has_session"]


def test_rekey_with_short_timers_keeps_traffic_flowing() -> None:
    net = established(FAST)
    for i in range(40):  # 10 s with traffic both ways every 0.25 s
        net.clock.advance(0.25)
        net.tick()
        net.send_a(udp(b"a%d" % i))
        net.send_b(udp(b"b%d" % i))
    assert net.got["b"][-1] == udp(b"a39") and net.got["a"][-1] == udp(b"b39")
    assert len(net.got["b"]) == 41 and len(net.got["a"]) == 40  # nothing lost across rekeys
    assert net.a.counters["handshakes"] >= 5
    assert net.a.drops["decrypt_failed"] == 0 and net.b.drops["decrypt_failed"] == 0


def test_rekey_after_messages() -> None:
    net = established(WGConfig(rekey_after_messages=5))
    for i in range(12):
        net.clock.advance(6.0)  # let the one-initiation-per-REKEY_TIMEOUT limit pass
        net.send_a(udp(b"%d" % i))
    assert net.a.counters["handshakes"] >= 2
    assert len(net.got["b"]) == 13


def test_replayed_data_is_dropped_and_counted() -> None:
    net = established()
    data = net.wire[-1][2]
    res = net.b.receive(data, EP_A)
    assert res.plaintexts == [] and net.b.drops["replay"] == 1


def test_wrong_mac1_dropped() -> None:
    net = Net()
    init = bytearray(net.a.encrypt(net.b.public_key, [udp()])[0][1])
    init[120] ^= 1
    res = net.b.receive(bytes(init), EP_A)
    assert res.to_send == [] and net.b.drops["bad_mac1"] == 1


def test_unknown_receiver_dropped() -> None:
    net = established()
    data = bytearray(net.wire[-1][2])
    data[4:8] = (int.from_bytes(data[4:8], "little") ^ 0xFFFF).to_bytes(4, "little")
    assert net.b.receive(bytes(data), EP_A).plaintexts == []
    assert net.b.drops["unknown_receiver"] == 1


def test_tampered_ciphertext_fails_decrypt() -> None:
    net = established()
    data = bytearray(net.wire[-1][2])
    data[-1] ^= 0x80
    assert net.b.receive(bytes(data), EP_A).plaintexts == []
    assert net.b.drops["decrypt_failed"] == 1


def test_under_load_cookie_then_retry_with_mac2_succeeds() -> None:
    net = Net(FAST, under_load_b=lambda: True)
    net.send_a(udp(b"hi"))
    assert net.types() == [MSG_INITIATION, MSG_COOKIE_REPLY]
    assert len(net.wire[1][2]) == COOKIE_REPLY_SIZE
    assert net.b.drops["cookie_sent"] == 1 and net.a.counters["cookie_received"] == 1
    assert net.got["b"] == []
    net.run(FAST.rekey_timeout + 0.25)  # the retransmit carries MAC2 and is accepted
    assert net.got["b"] == [udp(b"hi")]
    assert net.b.drops["cookie_sent"] == 1
    retry = [m for s, _d, m in net.wire if s == EP_A and m[0] == MSG_INITIATION][-1]
    assert retry[132:148] != bytes(16)


def test_cookie_bound_to_source_address() -> None:
    net = Net(FAST, under_load_b=lambda: True)
    net.send_a(udp())
    net.clock.advance(FAST.rekey_timeout + 0.1)
    retry = net.a.tick()
    assert retry and retry[0][1][132:148] != bytes(16)
    res = net.b.receive(retry[0][1], ("100.64.9.9", 1))  # same MAC2, other address
    assert [m[0] for _e, m in res.to_send] == [MSG_COOKIE_REPLY]


def test_keepalive_after_keepalive_timeout() -> None:
    net = established(WGConfig(keepalive_timeout=10.0))
    n = len(net.wire)
    net.run(9.5)
    assert len(net.wire) == n  # nothing before the timeout
    net.run(1.0)
    ka = [m for s, _d, m in net.wire[n:] if s == EP_B]
    assert len(ka) == 1 and len(ka[0]) == 32 and ka[0][0] == MSG_TRANSPORT
    assert net.got["a"] == []  # keepalives are not delivered as packets


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    net = established(WGConfig(keepalive_timeout=10.0, rekey_timeout=5.0))
    net.drop = lambda s, d, m: s == EP_B  # B goes silent
    net.send_a(udp(b"lost?"))
    n = len(net.wire)
    net.run(16.0)
    assert MSG_INITIATION in [m[0] for s, _d, m in net.wire[n:] if s == EP_A]


def test_reject_after_time_drops_session() -> None:
    net = established(FAST)
    stale = net.a.encrypt(net.b.public_key, [udp(b"old")])[0][1]
    net.clock.advance(FAST.reject_after_time + 0.1)
    assert net.b.receive(stale, EP_A).plaintexts == []
    assert net.b.drops["expired"] == 1
    assert not net.a.peer_stats(net.b.public_key)["has_session"]
    out = net.a.encrypt(net.b.public_key, [udp(b"new")])
    assert [m[0] for _e, m in out] == [MSG_INITIATION]  # no data on the expired session
    net.deliver(out, EP_A)
    assert net.got["b"][-1] == udp(b"new")


def test_retransmit_then_give_up() -> None:
    net = Net(FAST)
    net.drop = lambda s, d, m: True  # the network eats everything
    net.send_a(udp(b"a"))
    net.run(10.0)
    inits = [m for s, _d, m in net.wire if s == EP_A]
    assert inits == []  # dropped before delivery; count what A sent instead
    assert net.a.peer_stats(net.b.public_key)["queued"] == 0
    assert net.a.drops["no_session"] == 1
    sent = net.a.peer_stats(net.b.public_key)["tx_bytes"] // INITIATION_SIZE
    assert sent == FAST.max_handshake_attempts + 1


def test_replayed_initiation_rejected() -> None:
    net = established()
    init = net.wire[0][2]
    net.clock.advance(1.0)
    assert net.b.receive(init, EP_A).to_send == []
    assert net.b.drops["handshake_replay"] == 1


def test_initiation_flood_from_peer_rate_limited() -> None:
    net = Net(FAST)
    m1 = net.a.encrypt(net.b.public_key, [udp()])[0][1]
    net.clock.advance(FAST.rekey_timeout)
    m2 = net.a.tick()[0][1]  # the retransmit: a newer timestamp
    assert m2[0] == MSG_INITIATION
    assert net.b.receive(m1, EP_A).to_send
    net.clock.advance(FAST.handshake_initiation_rate / 5)
    assert net.b.receive(m2, EP_A).to_send == []
    assert net.b.drops["rate_limited"] == 1
    net.clock.advance(FAST.handshake_initiation_rate)
    assert net.b.receive(m2, EP_A).to_send  # later, the same message is fine


def test_roaming_updates_endpoint() -> None:
    net = established()
    moved = ("100.64.7.7", 5555)
    data = net.a.encrypt(net.b.public_key, [udp(b"moved")])[0][1]
    net.b.receive(data, moved)
    assert net.b.peer_stats(net.a.public_key)["endpoint"] == moved
    assert net.b.encrypt(net.a.public_key, [udp()])[0][0] == moved


def test_set_peers_keeps_unchanged_sessions() -> None:
    net = established()
    other = WireGuardCore(generate_private_key())
    net.b.set_peers([PeerSpec(net.a.public_key, endpoint=EP_A),
                     PeerSpec(other.public_key, endpoint=("100.64.0.3", 1))])
    net.send_a(udp(b"still"))
    assert net.got["b"][-1] == udp(b"still") and net.b.counters["handshakes"] == 1
    net.b.set_peers([PeerSpec(other.public_key)])
    data = net.a.encrypt(net.b.public_key, [udp(b"gone")])[0][1]
    assert net.b.receive(data, EP_A).plaintexts == []
    assert net.b.drops["unknown_receiver"] == 1
    with pytest.raises(ValueError):
        net.b.set_peers([PeerSpec(net.b.public_key)])


def test_persistent_keepalive_starts_handshake_and_repeats() -> None:
    net = Net(keepalive=5)
    net.run(0.25)
    assert net.types()[:3] == [MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT]
    n = len(net.wire)
    net.run(5.0)
    assert [len(m) for s, _d, m in net.wire[n:] if s == EP_A] == [32]


def test_padding_and_mtu() -> None:
    net = established(WGConfig(mtu=1420))
    for size in (1, 15, 17, 100):
        m = net.a.encrypt(net.b.public_key, [udp(bytes(size))])[0][1]
        assert (len(m) - 32) % 16 == 0
    big = udp(bytes(1420 - 28))
    m = net.a.encrypt(net.b.public_key, [big])[0][1]
    assert len(m) == 1420 + 32  # a packet at the MTU is not padded past it
    net.deliver([(EP_B, m)], EP_A)
    assert net.got["b"][-1] == big


def test_ipv6_inner_and_bad_inner() -> None:
    from nodeagent.packet import build_udp
    net = established()
    v6 = build_udp(6, 1, 2, 5, 6, b"six")
    net.send_a(v6)
    assert net.got["b"][-1] == v6
    net.send_a(b"\x00junk")
    assert net.b.drops["bad_inner"] == 1


def test_next_deadline_and_unknown_peer() -> None:
    net = Net(FAST)
    assert net.a.next_deadline() is None
    net.a.encrypt(net.b.public_key, [udp()])
    assert net.a.next_deadline() == pytest.approx(net.clock.t + FAST.rekey_timeout)
    assert net.a.encrypt(bytes(32), [udp()]) == []
    assert net.a.drops["unknown_peer"] == 1


def test_builtin_load_detector_cookies_flood_but_session_survives() -> None:
    cfg = WGConfig(under_load_handshakes_per_s=50)
    net = established(cfg)
    attacker = WireGuardCore(generate_private_key(), clock=net.clock, wallclock=net.clock.wall)
    attacker.set_peers([PeerSpec(net.b.public_key, endpoint=EP_B)])
    floods = []
    for _ in range(200):  # fresh initiations with valid MAC1, from an unknown key
        attacker.set_peers([])
        attacker.set_peers([PeerSpec(net.b.public_key, endpoint=EP_B)])
        floods.append(attacker.encrypt(net.b.public_key, [udp()])[0][1])
    for m in floods:
        net.b.receive(m, ("100.64.6.6", 9999))
    assert net.b.drops["cookie_sent"] >= 100
    assert net.b.drops["unknown_peer"] <= 51
    net.send_a(udp(b"through"))  # established session unaffected
    assert net.got["b"][-1] == udp(b"through")
