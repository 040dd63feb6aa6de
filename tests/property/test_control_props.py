"""Property tests of the control protocol's decoders and the policy parser: arbitrary input
raises only the module's own error type; build → parse round-trips. Also the checks of
node-supplied fields and endpoints (only their own error types, on both sides of the protocol)
and the replay cache (bounded; a request is admitted at most once)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeagent.control import hujson, proto
from nodeagent.control.policy import PolicyError, parse_policy
from nodeagent.keys import KeyPair

_M, _S = KeyPair.generate(), KeyPair.generate()

# msgpack-able values, so decoders see well-formed msgpack with arbitrary shapes too.
_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | \
    st.text(max_size=20) | st.binary(max_size=40)
_finite_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | \
    st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40)
_values = st.recursive(_finite_leaf, lambda kids: st.lists(kids, max_size=4)
                       | st.dictionaries(st.text(max_size=10), kids, max_size=4), max_leaves=20)
_keys = st.sampled_from(["Type", "Version", "MachineKey", "Sealed", "Error", "Challenge",
                         "ServerKey", "PublicKey", "NetMap", "SelfNode", "Peers", "ID",
                         "PacketFilter", "DERPMap", "UserProfiles", "Regions", "Addresses"])
_shaped = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=3)
                       | st.dictionaries(_keys | st.text(max_size=5), kids, max_size=5),
                       max_leaves=25)

_DECODERS = [proto.unpack, proto.decode_envelope, proto.decode_reply, proto.decode_hello,
             proto.decode_key_reply]


def _only_proto_errors(fn: Any, arg: Any) -> None:
    try:
        fn(arg)
    except proto.ProtoError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_into_decoders(data: bytes) -> None:
    for fn in _DECODERS:
        _only_proto_errors(fn, data)
    server = proto.Channel(_S.private, _M.public, server=True)
    _only_proto_errors(server.open, data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_shaped)
def test_random_msgpack_shapes_into_decoders(obj: Any) -> None:
    data = proto.pack(obj)
    for fn in _DECODERS:
        _only_proto_errors(fn, data)
    _only_proto_errors(proto.decode_netmap, obj)
    _only_proto_errors(lambda o: proto.check_message(o, proto.SERVER_TYPES), obj)
    _only_proto_errors(lambda o: proto.check_message(o, proto.CLIENT_TYPES), obj)
    if isinstance(obj, dict):
        _only_proto_errors(proto.decode_netmap, {"SelfNode": obj, "Peers": [obj]})


@settings(max_examples=200)
@given(_shaped)
def test_sealed_garbage_inside_a_valid_box(obj: Any) -> None:
    # Correctly encrypted, but the plaintext is not the channel's inner shape.
    from nacl.public import Box, PrivateKey, PublicKey
    box = Box(PrivateKey(_M.private), PublicKey(_S.public))
    sealed = bytes(box.encrypt(proto.pack(obj)))
    server = proto.Channel(_S.private, _M.public, server=True)
    _only_proto_errors(server.open, sealed)


@settings(max_examples=200)
@given(_values)
def test_seal_open_round_trip(obj: Any) -> None:
    client = proto.Channel(_M.private, _S.public, server=False)
    server = proto.Channel(_S.private, _M.public, server=True)
    msg = {"Type": "x", "V": obj}
    assert server.open(client.seal(msg)) == msg


@given(st.integers(proto.MIN_CAPABILITY_VERSION, 2**31), st.binary(min_size=32, max_size=32),
       st.binary(max_size=64))
def test_envelope_round_trip(v: int, mk: bytes, sealed: bytes) -> None:
    env = proto.decode_envelope(proto.encode_envelope(v, mk, sealed))
    assert (env.version, env.machine_key, env.sealed) == (v, mk, sealed)


_policy_chars = st.sampled_from(list('{}[]:,"/*\n \taction src dst accept tag:x *:22 acls'
                                     'nodeAttrs target attr 100.64.0.1/32 -1e\\u0')) \
    | st.characters()


@settings(max_examples=300)
@given(st.text(_policy_chars, max_size=120))
def test_random_policy_text_raises_only_policy_error(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError as e:
        assert ":" in str(e)


@settings(max_examples=200)
@given(_values)
def test_hujson_reads_what_json_writes(obj: Any) -> None:
    import json
    import math
    if _has_bad_float(obj, math):
        return  # JSON has no infinities
    text = json.dumps(obj if not isinstance(obj, bytes) else obj.hex(), default=lambda b: b.hex())
    assert hujson.parse(text).value == json.loads(text)


def _has_bad_float(o: Any, math: Any) -> bool:
    if isinstance(o, float):
        return not math.isfinite(o)
    if isinstance(o, list):
        return any(_has_bad_float(x, math) for x in o)
    if isinstance(o, dict):
        return any(_has_bad_float(x, math) for x in o.values())
    return False


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_shaped)
def test_netmap_file_shapes_raise_only_wire_or_filter_errors(obj: Any) -> None:
    # What `--netmap-file` checks before applying: the tailcfg shape, then the packet filter.
    from nodeagent.filter import FilterRuleError, parse_rules
    from nodeagent.tailcfg import WireError, netmap_from_wire

    for candidate in (obj, {"SelfNode": obj, "Peers": [obj], "PacketFilter": [obj],
                            "UserProfiles": obj}):
        try:
            parse_rules(netmap_from_wire(candidate).PacketFilter or [])
        except (WireError, FilterRuleError):
            pass


# --- node-supplied fields, endpoints and replay protection ------------------------------------

_endpointish = st.text(st.sampled_from(list("0123456789abcdef.:[]%- ")) | st.characters(),
                       max_size=70)


@settings(max_examples=400)
@given(_endpointish | _leaf)
def test_check_endpoint_raises_only_value_error(text: Any) -> None:
    from nodeagent.tailcfg import MAX_ENDPOINT_LEN, check_endpoint

    try:
        host, port = check_endpoint(text)
    except ValueError:
        return
    assert isinstance(text, str) and len(text) <= MAX_ENDPOINT_LEN
    assert 1 <= port <= 65535 and ("%" not in host)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_unicast_endpoints_are_accepted(ip: Any, port: int) -> None:
    from nodeagent.tailcfg import check_endpoint

    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    if ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255":
        return
    assert check_endpoint(text) == (str(ip), port)


_client_keys = st.sampled_from(["Type", "NodeKey", "AuthKey", "Hostname", "OS", "DiscoKey",
                                "ReqID", "Challenge", "Endpoints", "HomeDERP", "ID", "Status",
                                "Headers", "Body"])
_client_shaped = st.recursive(
    _leaf | st.sampled_from(["register", "map", "update", "c2n-response", "1.2.3.4:99999"]),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_client_keys | st.text(max_size=5),
                                                              kids, max_size=8),
    max_leaves=30)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(_client_shaped)
def test_client_message_checks_raise_only_proto_errors(obj: Any) -> None:
    from nodeagent.control.validate import check_node_fields

    _only_proto_errors(lambda o: check_node_fields(proto.check_message(o, proto.CLIENT_TYPES)),
                       obj)


@settings(max_examples=300)
@given(st.fixed_dictionaries({
    "Type": st.sampled_from(["register", "map", "update"]),
    "NodeKey": st.binary(min_size=32, max_size=32), "AuthKey": st.text(max_size=10),
    "Hostname": st.text(max_size=70), "OS": st.text(max_size=40),
    "DiscoKey": st.none() | st.binary(max_size=40), "ReqID": st.binary(max_size=70),
    "Challenge": st.binary(max_size=16), "Endpoints": st.lists(_endpointish, max_size=40),
    "HomeDERP": st.integers(-(2**63), 2**64 - 1)}))
def test_well_typed_client_messages_are_checked_without_surprises(m: dict[str, Any]) -> None:
    from nodeagent.control.validate import check_node_fields

    _only_proto_errors(lambda o: check_node_fields(proto.check_message(o, proto.CLIENT_TYPES)),
                       m)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(_shaped, st.lists(_endpointish, max_size=40))
def test_dropping_bad_peer_endpoints_never_raises(obj: Any, eps: list[str]) -> None:
    from nodeagent.tailcfg import (
        MAX_ENDPOINTS,
        WireError,
        check_endpoint,
        drop_bad_endpoints,
        netmap_from_wire,
    )

    peer = dict(obj) if isinstance(obj, dict) else {}
    peer["Endpoints"] = eps
    try:
        nm = netmap_from_wire({"Peers": [peer, obj]})
    except WireError:
        return
    out, dropped, why = drop_bad_endpoints(nm)
    kept = [ep for p in out.Peers for ep in p.Endpoints]
    assert dropped + len(kept) == sum(len(p.Endpoints) for p in nm.Peers)
    assert bool(dropped) == bool(why)
    for p in out.Peers:
        assert len(p.Endpoints) <= MAX_ENDPOINTS
        for ep in p.Endpoints:
            check_endpoint(ep)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), _shaped)
def test_open_request_raises_only_proto_errors(data: bytes, obj: Any) -> None:
    from nacl.public import Box, PrivateKey, PublicKey

    server = proto.Channel(_S.private, _M.public, server=True)
    _only_proto_errors(server.open_request, data)
    inner = {"D": proto.C2S, "S": 1, "T": obj, "M": obj}
    sealed = bytes(Box(PrivateKey(_M.private), PublicKey(_S.public)).encrypt(proto.pack(inner)))
    _only_proto_errors(proto.Channel(_S.private, _M.public, server=True).open_request, sealed)


@settings(max_examples=200)
@given(st.integers(1, 20), st.lists(st.tuples(st.integers(0, 60), st.floats(-400, 100),
                                              st.floats(0, 50)), max_size=200))
def test_nonce_cache_is_bounded_and_admits_each_request_once(
        cap: int, ops: list[tuple[int, float, float]]) -> None:
    from nodeagent.control.replay import NonceCache

    now = [1000.0]
    cache = NonceCache(300.0, max_entries=cap, clock=lambda: now[0])
    stamp_of: dict[int, float] = {}
    admitted: set[int] = set()
    for key, offset, advance in ops:
        now[0] += advance
        stamp = stamp_of.setdefault(key, now[0] + offset)  # one request = one timestamp
        if cache.admit(key.to_bytes(2, "big"), stamp) is None:
            assert key not in admitted, "a request was accepted twice"
            admitted.add(key)
        assert len(cache) <= cap


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_hostname_label_is_always_accepted(text: str) -> None:
    from nodeagent.control.validate import check_hostname, hostname_label

    assert check_hostname(hostname_label(text)) is None
