"""The control protocol's sans-IO parts: the sealed channel, envelopes, messages, deltas."""

from __future__ import annotations

import time

import pytest

from nodeagent.control import mapper, proto
from nodeagent.keys import KeyPair
from nodeagent.tailcfg import NetworkMap, Node


def _pair() -> tuple[proto.Channel, proto.Channel, KeyPair, KeyPair]:
    m, s = KeyPair.generate(), KeyPair.generate()
    return (proto.Channel(m.private, s.public, server=False),
            proto.Channel(s.private, m.public, server=True), m, s)


def test_channel_round_trip_both_ways() -> None:
    c, s, _, _ = _pair()
    assert s.open(c.seal({"Type": "keepalive"})) == {"Type": "keepalive"}
    assert c.open(s.seal({"x": b"\x00" * 3})) == {"x": b"\x00" * 3}


def test_channel_ciphertext_hides_content() -> None:
    c, _, _, _ = _pair()
    assert b"secret-endpoint" not in c.seal({"E": "secret-endpoint"})


def test_other_machine_cannot_open_or_forge() -> None:
    _, s, _, srv = _pair()
    other = KeyPair.generate()
    # A third party sealing towards the server, claiming to be machine m, fails to decrypt.
    forged = proto.Channel(other.private, srv.public, server=False).seal({"Type": "map"})
    with pytest.raises(proto.ProtoError, match="cannot decrypt"):
        s.open(forged)
    # A server message to m cannot be read with another machine key.
    spy = proto.Channel(other.private, srv.public, server=False)
    with pytest.raises(proto.ProtoError, match="cannot decrypt"):
        spy.open(s.seal({"secret": 1}))


def test_replay_and_reflection_refused() -> None:
    c, s, _, _ = _pair()
    first = c.seal({"n": 1})
    second = c.seal({"n": 2})
    assert s.open(second) == {"n": 2}
    with pytest.raises(proto.ProtoError, match="replayed"):
        s.open(first)  # older sequence number
    with pytest.raises(proto.ProtoError, match="replayed"):
        s.open(second)
    # A client→server message bounced back at the client is refused.
    with pytest.raises(proto.ProtoError, match="direction"):
        c.open(c.seal({"n": 3}))


def test_stale_request_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    c, s, _, _ = _pair()
    real = time.time
    monkeypatch.setattr(proto.time, "time", lambda: real() - 3600)
    old = c.seal({"n": 1})
    monkeypatch.setattr(proto.time, "time", real)
    with pytest.raises(proto.ProtoError, match="clock"):
        s.open(old, max_skew=proto.MAX_CLOCK_SKEW)


def test_envelope_round_trip_and_version_refusal() -> None:
    mk = KeyPair.generate().public
    env = proto.decode_envelope(proto.encode_envelope(proto.MIN_CAPABILITY_VERSION, mk, b"x"))
    assert (env.version, env.machine_key, env.sealed) == (proto.MIN_CAPABILITY_VERSION, mk, b"x")
    with pytest.raises(proto.VersionError, match=r"100 is too old.*139 or newer"):
        proto.decode_envelope(proto.encode_envelope(100, mk, b"x"))
    with pytest.raises(proto.VersionError, match="missing"):
        proto.decode_envelope(proto.pack({"MachineKey": mk, "Sealed": b""}))
    assert proto.version_problem(proto.MIN_CAPABILITY_VERSION + 5) is None


def test_check_message_types() -> None:
    ok = proto.msg("update", Endpoints=["1.2.3.4:5"])
    assert proto.check_message(ok, proto.CLIENT_TYPES) is ok
    with pytest.raises(proto.ProtoError, match="unexpected message type"):
        proto.check_message(proto.msg("netmap", NetMap={}, KeepAlive=1), proto.CLIENT_TYPES)
    with pytest.raises(proto.ProtoError, match="NodeKey"):
        proto.check_message(proto.msg("map", NodeKey=b"short", Challenge=b"", Hostname="",
                                      OS="", Endpoints=[], HomeDERP=0), proto.CLIENT_TYPES)
    with pytest.raises(proto.ProtoError, match="Endpoints"):
        proto.check_message(proto.msg("update", Endpoints=[1]), proto.CLIENT_TYPES)


def test_reply_and_hello_decoding() -> None:
    with pytest.raises(proto.ServerError, match="invalid auth key"):
        proto.decode_reply(proto.encode_error("invalid auth key"))
    assert proto.decode_reply(proto.pack({"Sealed": b"abc"})) == b"abc"
    ch, sk = proto.new_challenge(), KeyPair.generate().public
    assert proto.decode_hello(proto.encode_hello(ch, sk)) == (ch, sk)


def _peer(i: int, ep: str = "") -> dict:
    return {"ID": i, "Key": f"nodekey:{i:064x}", "Endpoints": [ep] if ep else [],
            "Addresses": [f"100.64.0.{i}/32"]}


def test_diff_full_delta_and_apply() -> None:
    base = {"SelfNode": {"ID": 1}, "Peers": [_peer(2), _peer(3)], "PacketFilter": [],
            "DERPMap": None, "UserProfiles": {}, "Domain": "d"}
    assert mapper.diff(None, base)["Type"] == "netmap"
    assert mapper.diff(base, base) is None
    moved = dict(base, Peers=[_peer(2, "1.1.1.1:41641"), _peer(4)])
    d = mapper.diff(base, moved)
    assert d == {"Type": "delta", "PeersChanged": [_peer(2, "1.1.1.1:41641"), _peer(4)],
                 "PeersRemoved": [3]}
    newfilter = dict(base, PacketFilter=[{"SrcIPs": ["*"], "DstPorts": []}])
    assert mapper.diff(base, newfilter)["Type"] == "netmap"
    nm = proto.decode_netmap(base)
    nm2 = mapper.apply_delta(nm, mapper.peers_from_wire(d["PeersChanged"]), d["PeersRemoved"])
    assert [(p.ID, p.Endpoints) for p in nm2.Peers] == [(2, ["1.1.1.1:41641"]), (4, [])]
    assert [p.ID for p in nm.Peers] == [2, 3]  # the old map is untouched


def test_apply_delta_keeps_self_and_filter() -> None:
    nm = NetworkMap(SelfNode=Node(ID=1), Peers=[Node(ID=2)], PacketFilter=[{"x": 1}])
    out = mapper.apply_delta(nm, [], [2])
    assert out.Peers == [] and out.SelfNode.ID == 1 and out.PacketFilter == [{"x": 1}]


def test_dns_label() -> None:
    assert mapper.dns_label("My Laptop.local") == "my-laptop"
    assert mapper.dns_label("---") == "node"
    assert len(mapper.dns_label("x" * 100)) == 63
