"""DERP frame codec: constants and byte layouts from specs/derp.md, reader limits, boxed infos."""

from __future__ import annotations

import json
import struct

import pytest
from nacl.public import Box, PrivateKey, PublicKey

from nodeagent.derp import frames as F


def test_constants_match_spec() -> None:
    assert F.MAGIC == bytes.fromhex("44455250f09f9491")
    assert F.MAX_PACKET_SIZE == 65536 and F.MAX_INFO_LEN == 1 << 20
    assert F.PROTOCOL_VERSION == 2 and F.KEEPALIVE_INTERVAL == 60.0
    assert F.FrameType.RESTARTING == 0x15 and F.FrameType.WATCH_CONNS == 0x10
    assert F.DISCO_MIN_LEN == 62


def test_example_headers_from_reference() -> None:
    key = bytes(range(32))
    assert F.encode_server_key(key) == bytes.fromhex("0100000028") + F.MAGIC + key
    assert F.encode_keepalive() == bytes.fromhex("0600000000")
    assert F.encode_note_preferred(True) == bytes.fromhex("070000000101")
    assert F.encode_note_preferred(False) == bytes.fromhex("070000000100")
    assert F.encode_watch_conns() == bytes.fromhex("1000000000")
    assert F.encode_ping(b"abcdefgh") == bytes.fromhex("1200000008") + b"abcdefgh"
    assert F.encode_peer_gone(key, 1) == bytes.fromhex("0800000021") + key + b"\x01"
    assert F.encode_restarting(1000, 60000) == bytes.fromhex("1500000008000003e80000ea60")
    assert F.encode_health("dup") == b"\x14\x00\x00\x00\x03dup"


def test_send_and_recv_packet_layout() -> None:
    dst, src = b"\x01" * 32, b"\x02" * 32
    f = F.encode_send_packet(dst, b"pkt")
    assert f[:5] == b"\x04\x00\x00\x00\x23" and f[5:37] == dst and f[37:] == b"pkt"
    r = F.encode_recv_packet(src, b"pkt")
    assert r[0] == 5 and F.decode_recv_packet(r[5:]) == (src, b"pkt")
    fw = F.encode_forward_packet(src, dst, b"p")
    assert fw[0] == 0x0A and F.decode_forward_packet(fw[5:]) == (src, dst, b"p")
    with pytest.raises(ValueError):
        F.encode_send_packet(dst, bytes(F.MAX_PACKET_SIZE + 1))


def test_peer_present_v4_mapped_and_short_forms() -> None:
    key = b"\x07" * 32
    f = F.encode_peer_present(key, bytes([10, 0, 0, 1]), 41641, F.PEER_PRESENT_PROBER)
    assert len(f) == 5 + 51
    p = F.decode_peer_present(f[5:])
    assert p.ip == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert (p.port, p.flags) == (41641, 4)
    assert F.decode_peer_present(key) == F.PeerPresent(key, None, 0, 0)
    assert F.decode_peer_present(key + bytes(18)).ip == bytes(16)
    with pytest.raises(F.FrameError):
        F.decode_peer_present(key[:31])


def test_peer_gone_without_reason_is_disconnected() -> None:
    assert F.decode_peer_gone(b"k" * 32) == (b"k" * 32, 0)


def test_reader_incremental_and_limit() -> None:
    data = F.encode_ping(b"12345678") + F.encode_keepalive() + F.encode_health("x")
    r = F.FrameReader()
    frames = []
    for b in data:  # one byte at a time
        r.feed(bytes([b]))
        while (fr := r.next()) is not None:
            frames.append(fr)
    assert frames == [(0x12, b"12345678"), (0x06, b""), (0x14, b"x")]
    assert r.pending() == 0
    r = F.FrameReader(max_len=100)
    r.feed(struct.pack(">BI", 4, 101))
    with pytest.raises(F.FrameError):
        r.next()
    r = F.FrameReader(max_len=100)
    r.feed(struct.pack(">BI", 4, 100) + bytes(99))
    assert r.next() is None and r.pending() == 104


def test_client_info_box_opens_with_server_key() -> None:
    server, client = PrivateKey.generate(), PrivateKey.generate()
    f = F.encode_client_info(bytes(client), bytes(server.public_key),
                             {"version": 2, "CanAckPings": True, "meshKey": "ab" * 32})
    assert f[0] == 2
    payload = f[5:]
    assert payload[:32] == bytes(client.public_key)
    # Independent check with a plain Box: nonce(24) then tag+ciphertext.
    plain = Box(server, PublicKey(payload[:32])).decrypt(payload[56:], payload[32:56])
    assert json.loads(plain)["version"] == 2
    info = F.decode_client_info(bytes(server), payload)
    assert info.key == bytes(client.public_key) and info.version == 2
    assert info.can_ack_pings and not info.is_prober and info.mesh_key == b"\xab" * 32


def test_client_info_field_names_are_case_insensitive() -> None:
    server, client = PrivateKey.generate(), PrivateKey.generate()
    f = F.encode_client_info(bytes(client), bytes(server.public_key),
                             {"Version": 2, "MeshKey": "00" * 32, "IsProber": True})
    info = F.decode_client_info(bytes(server), f[5:])
    assert info.version == 2 and info.mesh_key == bytes(32) and info.is_prober


@pytest.mark.parametrize("obj", [{"meshKey": "abc"}, {"meshKey": "zz" * 32}, {"version": "2"},
                                 {"CanAckPings": 1}, [1, 2]])
def test_client_info_bad_fields_rejected(obj: object) -> None:
    server, client = PrivateKey.generate(), PrivateKey.generate()
    box = Box(client, server.public_key)
    payload = bytes(client.public_key) + bytes(box.encrypt(json.dumps(obj).encode()))
    with pytest.raises(F.FrameError):
        F.decode_client_info(bytes(server), payload)


def test_client_info_wrong_server_key_fails() -> None:
    server, other, client = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    f = F.encode_client_info(bytes(client), bytes(other.public_key), {"version": 2})
    with pytest.raises(F.FrameError):
        F.decode_client_info(bytes(server), f[5:])


def test_server_info_round_trip() -> None:
    server, client = PrivateKey.generate(), PrivateKey.generate()
    f = F.encode_server_info(bytes(server), bytes(client.public_key), {"version": 2})
    assert F.decode_server_info(bytes(client), bytes(server.public_key), f[5:]) == {"version": 2}


def test_ping_limits_and_disco_detection() -> None:
    assert F.decode_ping(b"12345678" + bytes(100)) == b"12345678"
    for bad in (b"1234567", bytes(1001)):
        with pytest.raises(F.FrameError):
            F.decode_ping(bad)
    disco = F.DISCO_MAGIC + bytes(56)
    assert F.looks_like_disco(disco) and not F.looks_like_disco(disco[:-1])
    assert F.looks_like_disco(b"k" * 32 + disco, 32)
    with pytest.raises(F.FrameError):
        F.decode_note_preferred(b"\x01\x01")
