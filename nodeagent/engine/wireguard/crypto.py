"""Cryptographic primitives of WireGuard: BLAKE2s hash/MAC/HMAC/KDF, X25519, the AEADs, TAI64N.

Backends were chosen by measurement (``benchmarks/wg_crypto.py``): ``cryptography``'s
ChaCha20Poly1305 is several times faster per 1400-byte packet than PyNaCl's binding, so it carries
transport data; PyNaCl's X25519 is slightly faster and it alone offers XChaCha20-Poly1305, so it
carries the handshake DH and cookie replies. BLAKE2s comes from hashlib.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _nacl
from nacl.exceptions import CryptoError

__all__ = [
    "AEAD",
    "CryptoError",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "dh",
    "generate_private_key",
    "hash2",
    "hash_",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

AEAD = ChaCha20Poly1305
_blake2s = hashlib.blake2s
_hmac_new = hmac.new
_ZERO_NONCE = bytes(12)
_TAI64_BASE = 0x400000000000000A  # 2^62 + 10 s, as the Linux and Go implementations use
_TAI64N = struct.Struct(">QI")
_WHITEN = (1 << 24) - 1  # initiation timestamps are rounded to ~16.7 ms (hides timing)


def hash_(data: bytes) -> bytes:
    return _blake2s(data).digest()


def hash2(a: bytes, b: bytes) -> bytes:
    """Hash(a || b) without building the concatenation."""
    h = _blake2s(a)
    h.update(b)
    return h.digest()


def mac(key: bytes, data: bytes | memoryview) -> bytes:
    """Keyed BLAKE2s with a 16-byte output (MAC1, MAC2, cookie values)."""
    return _blake2s(data, digest_size=16, key=key).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return _hmac_new(key, data, _blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    return _hmac(_hmac(key, data), b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = _hmac(key, data)
    t1 = _hmac(t0, b"\x01")
    return t1, _hmac(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = _hmac(key, data)
    t1 = _hmac(t0, b"\x01")
    t2 = _hmac(t0, t1 + b"\x02")
    return t1, t2, _hmac(t0, t2 + b"\x03")


def generate_private_key(rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """A clamped X25519 private key, the form ``wg genkey`` prints, from 32 bytes of ``rng``."""
    k = bytearray(rng(32))
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def public_key(private: bytes) -> bytes:
    return _nacl.crypto_scalarmult_base(private)


def dh(private: bytes, public: bytes) -> bytes | None:
    """X25519; ``None`` for a low-order peer point (all-zero shared secret) or bad input."""
    try:
        return _nacl.crypto_scalarmult(private, public)
    except Exception:  # libsodium refuses an all-zero result; PyNaCl wraps it oddly
        return None


def aead_encrypt(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """Handshake AEAD: fresh key, counter 0."""
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, ad)


def aead_decrypt(key: bytes, ciphertext: bytes | memoryview, ad: bytes) -> bytes | None:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, ciphertext, ad)
    except InvalidTag:
        return None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return _nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except CryptoError:
        return None


def tai64n(unix_time: float) -> bytes:
    """12-byte TAI64N label of ``unix_time`` with the nanoseconds whitened."""
    secs = int(unix_time)
    nanos = int((unix_time - secs) * 1e9) & ~_WHITEN
    return _TAI64N.pack(_TAI64_BASE + secs, nanos)
