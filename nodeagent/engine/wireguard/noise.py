"""The Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s handshake of WireGuard, as pure functions.

Each step takes the chaining key and transcript hash it continues from and returns the new ones,
so the caller (``core``) owns all state. Message bodies end before MAC1; ``cookie`` appends MACs.
A step that fails authentication returns ``None`` — never raises on network input. The steps
that make an ephemeral key take it as an argument when the caller wants to choose it (tests);
otherwise they draw a fresh one from the OS.
"""

from __future__ import annotations

from typing import NamedTuple

from nodeagent.engine.wireguard.crypto import (
    aead_decrypt,
    aead_encrypt,
    dh,
    generate_private_key,
    hash2,
    hash_,
    kdf1,
    kdf2,
    kdf3,
    public_key,
)
from nodeagent.engine.wireguard.messages import (
    CONSTRUCTION,
    IDENTIFIER,
    INITIATION_HEAD,
    RESPONSE_HEAD,
    pack_initiation_body,
    pack_response_body,
)

CHAIN0 = hash_(CONSTRUCTION)
HASH0 = hash2(CHAIN0, IDENTIFIER)
ZERO_PSK = bytes(32)


def initial_hash(responder_public: bytes) -> bytes:
    """The transcript hash both sides start from: it already commits to the responder's key."""
    return hash2(HASH0, responder_public)


class InitiationState(NamedTuple):
    """What the initiator keeps between sending an initiation and consuming the response."""

    chain: bytes
    hash: bytes
    eph_private: bytes


class ConsumedInitiation(NamedTuple):
    sender: int
    remote_static: bytes
    remote_ephemeral: bytes
    timestamp: bytes
    chain: bytes
    hash: bytes


def create_initiation(
    own_public: bytes, peer_hash0: bytes, peer_public: bytes, static_static: bytes,
    sender: int, timestamp: bytes, ephemeral: bytes | None = None,
) -> tuple[bytes, InitiationState] | None:
    """Body (up to MAC1) of an initiation to ``peer_public`` and the state to keep.
    ``ephemeral``: the ephemeral private key to use (default: a fresh one)."""
    eph = generate_private_key() if ephemeral is None else ephemeral
    eph_pub = public_key(eph)
    c = kdf1(CHAIN0, eph_pub)
    h = hash2(peer_hash0, eph_pub)
    es = dh(eph, peer_public)
    if es is None:
        return None
    c, k = kdf2(c, es)
    enc_static = aead_encrypt(k, own_public, h)
    h = hash2(h, enc_static)
    c, k = kdf2(c, static_static)
    enc_ts = aead_encrypt(k, timestamp, h)
    h = hash2(h, enc_ts)
    return pack_initiation_body(sender, eph_pub, enc_static, enc_ts), InitiationState(c, h, eph)


def consume_initiation(own_private: bytes, own_hash0: bytes,
                       msg: bytes) -> tuple[ConsumedInitiation, bytes, bytes] | None:
    """Open an initiation up to the static key: returns the partial result plus the chain key
    and hash needed to finish with ``finish_initiation`` once the peer is known."""
    _t, sender, eph, enc_static, enc_ts = INITIATION_HEAD.unpack_from(msg)
    c = kdf1(CHAIN0, eph)
    h = hash2(own_hash0, eph)
    es = dh(own_private, eph)
    if es is None:
        return None
    c, k = kdf2(c, es)
    static = aead_decrypt(k, enc_static, h)
    if static is None:
        return None
    h = hash2(h, enc_static)
    return ConsumedInitiation(sender, static, eph, enc_ts, c, h), c, h


def finish_initiation(part: ConsumedInitiation, static_static: bytes) -> ConsumedInitiation | None:
    """Second half: with the static-static DH of the now-known peer, open the timestamp."""
    c, k = kdf2(part.chain, static_static)
    ts = aead_decrypt(k, part.timestamp, part.hash)
    if ts is None:
        return None
    h = hash2(part.hash, part.timestamp)
    return part._replace(timestamp=ts, chain=c, hash=h)


def create_response(init: ConsumedInitiation, psk: bytes, sender: int,
                    ephemeral: bytes | None = None) -> tuple[bytes, bytes, bytes] | None:
    """Body (up to MAC1) of the response, and the responder's (receive_key, send_key).
    ``ephemeral``: the ephemeral private key to use (default: a fresh one)."""
    eph = generate_private_key() if ephemeral is None else ephemeral
    eph_pub = public_key(eph)
    c = kdf1(init.chain, eph_pub)
    h = hash2(init.hash, eph_pub)
    ee = dh(eph, init.remote_ephemeral)
    se = dh(eph, init.remote_static)
    if ee is None or se is None:
        return None
    c = kdf1(c, ee)
    c = kdf1(c, se)
    c, tau, k = kdf3(c, psk)
    h = hash2(h, tau)
    empty = aead_encrypt(k, b"", h)
    recv_key, send_key = kdf2(c, b"")
    return pack_response_body(sender, init.sender, eph_pub, empty), recv_key, send_key


def consume_response(state: InitiationState, own_private: bytes, psk: bytes,
                     msg: bytes) -> tuple[int, bytes, bytes] | None:
    """Open a response to our initiation: (remote sender index, send_key, receive_key)."""
    _t, sender, _receiver, eph, empty = RESPONSE_HEAD.unpack_from(msg)
    c = kdf1(state.chain, eph)
    h = hash2(state.hash, eph)
    ee = dh(state.eph_private, eph)
    se = dh(own_private, eph)
    if ee is None or se is None:
        return None
    c = kdf1(c, ee)
    c = kdf1(c, se)
    c, tau, k = kdf3(c, psk)
    h = hash2(h, tau)
    if aead_decrypt(k, empty, h) is None:
        return None
    send_key, recv_key = kdf2(c, b"")
    return sender, send_key, recv_key
