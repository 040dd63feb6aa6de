"""magicsock's sans-IO path logic between two cores on a simulated network with a fake clock:
discovery pings, CallMeMaybe via DERP, trust and its expiry, heartbeats, timeouts, user pings."""

from __future__ import annotations

from typing import Any

from nacl.public import PrivateKey

from nodeagent.disco import codec as disco
from nodeagent.magicsock.core import (
    DERP_MAGIC_IP,
    MagicCore,
    PeerInfo,
    PongEvent,
    SendDERP,
    SendUDP,
)
from nodeagent.magicsock.endpoint import (
    HEARTBEAT_INTERVAL,
    TRUST_UDP_ADDR_DURATION,
    DerpAddr,
    better_addr,
)

A_ADDR = ("192.0.2.1", 41641)
B_ADDR = ("198.51.100.2", 41641)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Net:
    """Two cores, A and B, each with a node key, a disco key, a UDP address and home DERP 1."""

    def __init__(self, b_endpoints: tuple[tuple[str, int], ...] = (B_ADDR,),
                 a_endpoints: tuple[tuple[str, int], ...] = (A_ADDR,)) -> None:
        self.clock = Clock()
        keys = {n: (bytes(PrivateKey.generate()), bytes(PrivateKey.generate().public_key))
                for n in "ab"}
        self.node = {n: keys[n][1] for n in "ab"}
        self.a = MagicCore(keys["a"][0], self.node["a"], clock=self.clock)
        self.b = MagicCore(keys["b"][0], self.node["b"], clock=self.clock)
        self.a.set_local_endpoints(a_endpoints)
        self.b.set_local_endpoints(b_endpoints)
        self.a.set_peers([PeerInfo(self.node["b"], self.b.disco_public, 1, b_endpoints)])
        self.b.set_peers([PeerInfo(self.node["a"], self.a.disco_public, 1, a_endpoints)])
        self.udp_ok = True

    def deliver(self, frm: str, actions: list[Any]) -> list[Any]:
        """Carry ``frm``'s disco sends to the other core; return what the receiver answered."""
        to = self.b if frm == "a" else self.a
        src_addr = A_ADDR if frm == "a" else B_ADDR
        out: list[Any] = []
        for act in actions:
            if isinstance(act, SendUDP):
                if self.udp_ok:
                    out += to.handle_disco(act.data, src_addr)
            elif isinstance(act, SendDERP):
                out += to.handle_disco(act.data, DerpAddr(DERP_MAGIC_IP, act.region,
                                                          self.node[frm]))
        return out

    def exchange(self, frm: str, actions: list[Any]) -> list[Any]:
        """Deliver, then deliver the answers back; return the events left on ``frm``'s side."""
        back = self.deliver(frm, actions)
        other = "b" if frm == "a" else "a"
        sends = [x for x in back if isinstance(x, SendUDP | SendDERP)]
        return self.deliver(other, sends)


def test_first_send_goes_via_derp_and_pings_candidates_with_call_me_maybe() -> None:
    n = Net()
    udp, region, actions = n.a.plan_send(n.node["b"])
    assert (udp, region) == (None, 1)
    assert [type(a) for a in actions] == [SendUDP, SendDERP]
    assert actions[0].addr == B_ADDR
    cmm = n.b.handle_disco(actions[1].data, DerpAddr(DERP_MAGIC_IP, 1, n.node["a"]))
    # B answers the CallMeMaybe by pinging A's endpoints (hole punching from both sides).
    assert [a.addr for a in cmm if isinstance(a, SendUDP)] == [A_ADDR]
    assert n.b.counters["call_me_maybe_received"] == 1


def test_pong_makes_the_direct_path_trusted_then_trust_expires() -> None:
    n = Net()
    _, _, actions = n.a.plan_send(n.node["b"])
    n.exchange("a", actions)
    assert n.a.plan_send(n.node["b"])[:2] == (B_ADDR, 0)
    st = n.a.status(n.node["b"])
    assert st is not None and st.cur_addr == "198.51.100.2:41641" and st.active
    n.clock.t += TRUST_UDP_ADDR_DURATION + 0.1
    udp, region, actions = n.a.plan_send(n.node["b"])
    assert (udp, region) == (B_ADDR, 1)  # untrusted: UDP plus a DERP copy
    assert any(isinstance(a, SendUDP) for a in actions)  # and a fresh full ping
    assert n.a.status(n.node["b"]).cur_addr == ""


def test_ping_back_at_once_right_after_our_own_lost_ping() -> None:
    # Behind NATs: A's first ping to B is dropped by B's router (no mapping yet), its
    # CallMeMaybe reaches B via DERP, and B's answering ping gets through A's router. A's own
    # (lost) ping a moment ago must not hold back its ping back: A trusts the direct path one
    # round trip later, not at B's next heartbeat 3 s on.
    n = Net()
    _, _, actions = n.a.plan_send(n.node["b"])
    n.udp_ok = False
    from_b = n.deliver("a", actions)  # the UDP ping is lost; the CallMeMaybe arrives
    n.udp_ok = True
    n.clock.t += 0.01
    from_a = n.deliver("b", from_b)  # B's pings reach A: a pong and a ping back
    assert sum(isinstance(x, SendUDP) for x in from_a) == 2
    n.deliver("b", n.deliver("a", from_a))
    assert n.b.plan_send(n.node["a"])[:2] == (A_ADDR, 0)
    assert n.a.plan_send(n.node["b"])[:2] == (B_ADDR, 0)
    # and no storm: another ping from B within the second is answered with a pong only
    n.clock.t += HEARTBEAT_INTERVAL
    n.a._peers[n.node["b"]].paths.trust_until = 0.0
    again = n.deliver("b", n.b.tick())
    n.clock.t += 0.1
    twice = n.deliver("b", n.b.tick() + n.b.ping(n.node["a"])[1])
    assert sum(isinstance(x, SendUDP) for x in again) == 2
    assert sum(isinstance(x, SendUDP) for x in twice) == 1


def test_heartbeats_keep_trust_while_active_and_stop_when_idle() -> None:
    n = Net()
    n.exchange("a", n.a.plan_send(n.node["b"])[2])
    for _ in range(5):
        n.clock.t += HEARTBEAT_INTERVAL
        n.exchange("a", n.a.tick())
        assert n.a.plan_send(n.node["b"])[:2] == (B_ADDR, 0)
    n.clock.t += 46
    n.a.tick()  # idle: heartbeat disarmed
    n.clock.t += HEARTBEAT_INTERVAL
    assert [a for a in n.a.tick() if isinstance(a, SendUDP)] == []


def test_lost_pings_clear_an_untrusted_best_address() -> None:
    n = Net()
    n.exchange("a", n.a.plan_send(n.node["b"])[2])
    n.udp_ok = False
    n.clock.t += TRUST_UDP_ADDR_DURATION + 0.1
    n.deliver("a", n.a.plan_send(n.node["b"])[2])  # pings are lost
    n.clock.t += 5.1
    n.a.tick()
    assert n.a.plan_send(n.node["b"])[:2] == (None, 1)  # back to DERP only
    assert n.a.counters["ping_timeouts"] >= 1


def test_call_me_maybe_only_via_derp_from_its_owner() -> None:
    n = Net()
    pkt = disco.DiscoBox(n.a.disco_private, n.b.disco_public).seal(disco.CallMeMaybe((A_ADDR,)))
    assert n.b.handle_disco(pkt, A_ADDR) == []  # over UDP: ignored
    assert n.b.handle_disco(pkt, DerpAddr(DERP_MAGIC_IP, 1, b"\x01" * 32)) == []  # wrong key
    assert n.b.counters["disco_dropped"] == 2
    assert n.b.handle_disco(pkt, DerpAddr(DERP_MAGIC_IP, 1, n.node["a"]))


def test_unknown_or_damaged_disco_is_dropped_silently() -> None:
    n = Net()
    stranger = disco.DiscoBox(bytes(PrivateKey.generate()), n.b.disco_public)
    assert n.b.handle_disco(stranger.seal(disco.Ping(b"x" * 12, None)), A_ADDR) == []
    good = bytearray(disco.DiscoBox(n.a.disco_private, n.b.disco_public).seal(
        disco.Ping(b"y" * 12, n.node["a"])))
    good[-1] ^= 1
    assert n.b.handle_disco(bytes(good), A_ADDR) == []
    assert n.b.handle_disco(b"TS\xf0\x9f\x92\xac" + b"\x00" * 10, A_ADDR) == []
    assert n.b.counters["disco_dropped"] == 3


def test_ping_via_derp_is_answered_with_the_derp_magic_address() -> None:
    n = Net()
    ping = disco.DiscoBox(n.a.disco_private, n.b.disco_public).seal(
        disco.Ping(b"t" * 12, n.node["a"]))
    out = n.b.handle_disco(ping, DerpAddr(DERP_MAGIC_IP, 7, n.node["a"]))
    assert len(out) == 1 and isinstance(out[0], SendDERP) and out[0].region == 7
    _, msg = disco.open_packet(n.a.disco_private, out[0].data)
    assert isinstance(msg, disco.Pong) and msg.src == (DERP_MAGIC_IP, 7)
    # A duplicate ping (same TxID, same path) is not answered twice.
    assert n.b.handle_disco(ping, DerpAddr(DERP_MAGIC_IP, 7, n.node["a"])) == []


def test_user_ping_reports_the_path_that_answered() -> None:
    n = Net()
    txs, actions = n.a.ping(n.node["b"])
    assert len(txs) == 2  # via home DERP and to the one candidate
    events = n.exchange("a", actions)
    pongs = [e for e in events if isinstance(e, PongEvent)]
    assert {(p.endpoint, p.derp_region) for p in pongs} == {("", 1), ("198.51.100.2:41641", 0)}
    # Now trusted: a user ping goes to the direct address only.
    txs, actions = n.a.ping(n.node["b"])
    assert len(txs) == 1 and isinstance(actions[0], SendUDP)


def test_peer_without_disco_key_gets_derp_only() -> None:
    n = Net()
    n.a.set_peers([PeerInfo(n.node["b"], None, 3, (B_ADDR,))])
    assert n.a.plan_send(n.node["b"]) == (None, 3, [])
    assert n.a.ping(n.node["b"]) == ([], [])


def test_derp_route_learnt_from_inbound_packets() -> None:
    n = Net()
    n.a.set_peers([PeerInfo(n.node["b"], n.b.disco_public, 0, ())])
    assert n.a.plan_send(n.node["b"])[:2] == (None, 0)
    n.a.note_derp_recv(5, n.node["b"])
    assert n.a.plan_send(n.node["b"])[:2] == (None, 5)
    n.a.forget_derp_route(region=5)
    assert n.a.plan_send(n.node["b"])[:2] == (None, 0)


def test_better_addr_rules() -> None:
    lan, wan = ("192.168.1.2", 1), ("203.0.113.9", 1)
    assert better_addr(lan, 0.010, wan, 0.010)  # private bonus at equal latency
    assert not better_addr(wan, 0.010, lan, 0.010)
    assert better_addr(wan, 0.001, lan, 0.050)  # much faster wins despite the bonus
    assert not better_addr(("203.0.113.8", 1), 0.0099, wan, 0.010)  # hysteresis: 1 point
    v6 = ("2001:db8::1", 1)
    assert better_addr(v6, 0.010, wan, 0.010)  # IPv6 +10 at equal latency


def test_without_derp_the_first_packets_try_the_netmap_endpoint() -> None:
    n = Net()
    n.a.set_peers([PeerInfo(n.node["b"], n.b.disco_public, 0, (B_ADDR,))])
    udp, region, actions = n.a.plan_send(n.node["b"])
    assert (udp, region) == (B_ADDR, 0)  # not dropped while discovery runs
    assert any(isinstance(a, SendUDP) for a in actions)  # and discovery pings still go out
    assert n.a.status(n.node["b"]).cur_addr == ""  # not trusted until a pong
