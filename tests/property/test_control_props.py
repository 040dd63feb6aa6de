"""Property tests of the control protocol's decoders and the policy parser: arbitrary input
raises only the module's own error type; build → parse round-trips."""

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
