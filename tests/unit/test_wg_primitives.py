"""WireGuard building blocks: crypto primitives against published vectors, TAI64N, padding,
message type parsing and the replay window."""

from __future__ import annotations

import hashlib
import hmac

from nodeagent.engine.wireguard.crypto import dh, hash2, kdf1, kdf2, kdf3, mac, public_key, tai64n
from nodeagent.engine.wireguard.messages import message_type, padded_length
from nodeagent.engine.wireguard.noise import CHAIN0, HASH0
from nodeagent.engine.wireguard.replay import WINDOW, ReplayWindow


def test_x25519_rfc7748_vector() -> None:
    # RFC 7748 section 6.1 (Alice's and Bob's keys and the shared secret)
    a = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert public_key(a).hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert dh(a, b_pub).hex() == (  # type: ignore[union-attr]
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert dh(a, bytes(32)) is None  # low-order point refused


def test_blake2s_hash_and_construction_constants() -> None:
    assert hashlib.blake2s(b"abc").hexdigest() == (  # RFC 7693 appendix B
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")
    assert CHAIN0 == hashlib.blake2s(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s").digest()
    assert HASH0 == hashlib.blake2s(CHAIN0 + b"WireGuard v1 zx2c4 Jason@zx2c4.com").digest()
    assert hash2(b"ab", b"cd") == hashlib.blake2s(b"abcd").digest()
    assert mac(b"k" * 32, b"m") == hashlib.blake2s(b"m", digest_size=16, key=b"k" * 32).digest()


def test_kdf_is_hkdf_with_hmac_blake2s() -> None:
    def h(k: bytes, m: bytes) -> bytes:
        return hmac.new(k, m, hashlib.blake2s).digest()

    key, data = b"\x01" * 32, b"input"
    t0 = h(key, data)
    t1 = h(t0, b"\x01")
    t2 = h(t0, t1 + b"\x02")
    t3 = h(t0, t2 + b"\x03")
    assert kdf1(key, data) == t1
    assert kdf2(key, data) == (t1, t2)
    assert kdf3(key, data) == (t1, t2, t3)


def test_tai64n_layout_and_whitening() -> None:
    ts = tai64n(1_700_000_000.5)
    assert len(ts) == 12
    assert int.from_bytes(ts[:8], "big") == (1 << 62) + 10 + 1_700_000_000
    nanos = int.from_bytes(ts[8:], "big")
    assert nanos <= 500_000_000 and nanos % (1 << 24) == 0
    assert tai64n(1_700_000_001.0) > ts  # byte order is time order


def test_padded_length() -> None:
    assert padded_length(0, 1420) == 0
    assert padded_length(1, 1420) == 16
    assert padded_length(16, 1420) == 16
    assert padded_length(1410, 1420) == 1420  # capped at the MTU
    assert padded_length(1420, 1420) == 1420
    assert padded_length(1421, 1420) == 1421 + 15  # beyond the MTU: pad the last unit
    assert padded_length(17, 0) == 32  # no MTU: plain multiple of 16


def test_message_type() -> None:
    assert message_type(b"\x01\x00\x00\x00") == 1
    assert message_type(b"\x04\x00\x00\x00rest") == 4
    assert message_type(b"\x01\x00\x00\x01") == 0  # reserved bytes must be zero
    assert message_type(b"\x05\x00\x00\x00") == 0
    assert message_type(b"\x01") == 0


def test_replay_window_in_order_out_of_order_and_old() -> None:
    w = ReplayWindow(1 << 64)
    assert all(w.update(i) for i in range(100))
    assert not w.update(50) and not w.update(99)
    assert w.update(200) and w.update(150) and not w.update(150)
    assert w.update(200 + WINDOW)
    assert not w.update(199)  # now more than WINDOW behind
    assert w.update(200 + WINDOW - 1) and not w.update(200)
    assert w.update(10**9) and not w.update(10**9 - WINDOW - 1)
    assert w.update(10**9 - 5)


def test_replay_window_limit() -> None:
    w = ReplayWindow(10)
    assert w.update(9) and not w.update(10) and not w.update(2**64 - 1)
    assert not w.check(10) and w.check(8) and not w.check(9)
