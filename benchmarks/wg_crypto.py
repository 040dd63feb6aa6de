"""WireGuard crypto backends and the core's per-packet paths, measured in one run.

Prints packets/s for ChaCha20-Poly1305 on 1400-byte packets through PyNaCl (libsodium binding)
and through ``cryptography`` (OpenSSL), their ratio, the two ways of laying out a transport
message, the full ``WireGuardCore.encrypt`` / ``receive_into`` paths per packet, X25519 through
both libraries and complete handshakes per second. Usage: ``python3 benchmarks/wg_crypto.py [-n N]``
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as nacl

from nodeagent.engine.wireguard import (
    PeerSpec,
    WireGuardCore,
    generate_private_key,
)
from nodeagent.packet import build_udp

SIZE = 1400
_HDR = struct.Struct("<IIQ")
_NONCE = struct.Struct("<4xQ")


def rate(n: int, fn: Callable[[int], None]) -> float:
    """Best of three runs of ``fn(n)``, as operations per second."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def bench_aead(n: int) -> dict[str, float]:
    key = os.urandom(32)
    pt = os.urandom(SIZE)
    box = ChaCha20Poly1305(key)
    enc_n = nacl.crypto_aead_chacha20poly1305_ietf_encrypt
    dec_n = nacl.crypto_aead_chacha20poly1305_ietf_decrypt
    ct = box.encrypt(bytes(12), pt, None)

    def nacl_enc(k: int) -> None:
        for i in range(k):
            enc_n(pt, None, _NONCE.pack(i), key)

    def crypt_enc(k: int) -> None:
        enc = box.encrypt
        for i in range(k):
            enc(_NONCE.pack(i), pt, None)

    def nacl_dec(k: int) -> None:
        nonce = bytes(12)
        for _ in range(k):
            dec_n(ct, None, nonce, key)

    def crypt_dec(k: int) -> None:
        dec = box.decrypt
        nonce = bytes(12)
        for _ in range(k):
            dec(nonce, ct, None)

    def concat_layout(k: int) -> None:  # header + encrypt() result: two buffers and a join
        enc = box.encrypt
        for i in range(k):
            _HDR.pack(4, 1, i) + enc(_NONCE.pack(i), pt, None)

    def into_layout(k: int) -> None:  # one buffer, ciphertext written after the header
        enc = box.encrypt_into
        for i in range(k):
            buf = bytearray(SIZE + 32)
            _HDR.pack_into(buf, 0, 4, 1, i)
            enc(_NONCE.pack(i), pt, None, memoryview(buf)[16:])

    return {
        "nacl_encrypt": rate(n, nacl_enc),
        "cryptography_encrypt": rate(n, crypt_enc),
        "nacl_decrypt": rate(n, nacl_dec),
        "cryptography_decrypt": rate(n, crypt_dec),
        "layout_concat": rate(n, concat_layout),
        "layout_encrypt_into": rate(n, into_layout),
    }


def _pair() -> tuple[WireGuardCore, WireGuardCore]:
    a = WireGuardCore(generate_private_key())
    b = WireGuardCore(generate_private_key())
    a.set_peers([PeerSpec(b.public_key, endpoint=("100.64.0.2", 2))])
    b.set_peers([PeerSpec(a.public_key, endpoint=("100.64.0.1", 1))])
    return a, b


def _handshake(a: WireGuardCore, b: WireGuardCore, first: bytes) -> None:
    init = a.encrypt(b.public_key, [first])
    resp = b.receive(init[0][1], ("100.64.0.1", 1))
    confirm = a.receive(resp.to_send[0][1], ("100.64.0.2", 2))
    b.receive(confirm.to_send[0][1], ("100.64.0.1", 1))


def bench_core(n: int, batch: int = 64) -> dict[str, float]:
    pkt = build_udp(4, 0x64600001, 0x64600002, 1000, 2000, os.urandom(SIZE - 28))
    a, b = _pair()
    _handshake(a, b, pkt)
    key_b = b.public_key
    packets = [pkt] * batch
    sample = a.encrypt(key_b, packets)

    def enc(k: int) -> None:
        for _ in range(k // batch):
            a.encrypt(key_b, packets)

    wire = [bytes(d) for _ep, d in a.encrypt(key_b, [pkt] * n)]
    src = ("100.64.0.1", 1)

    def dec(k: int) -> None:
        recv = b.receive_into
        to_send: list = []
        plain: list = []
        for i, d in enumerate(wire[:k]):
            recv(d, src, to_send, plain)
            if not i & 63:
                plain.clear()  # as an engine would after writing a batch to the TUN

    recv_kp = next(iter(b._keypairs.values()))

    def minimal(k: int) -> None:  # the floor: header unpack + AEAD open, nothing else
        dec = recv_kp.recv.decrypt
        unpack = _HDR.unpack_from
        for d in wire[:k]:
            dec(_NONCE.pack(unpack(d)[2]), d[16:], None)

    rates = {"core_encrypt": rate(n, enc), "minimal_receive": rate(n, minimal)}
    # each decrypt run needs fresh counters (replays are dropped): re-encrypt between runs
    best = 0.0
    for _ in range(3):
        wire[:] = [bytes(d) for _ep, d in a.encrypt(key_b, [pkt] * n)]
        t0 = time.perf_counter()
        dec(n)
        best = max(best, n / (time.perf_counter() - t0))
    rates["core_receive"] = best
    assert b.drops["replay"] == 0 and len(sample) == batch
    return rates


def bench_handshake(n: int) -> dict[str, float]:
    priv = os.urandom(32)
    pub = nacl.crypto_scalarmult_base(os.urandom(32))
    sk = X25519PrivateKey.from_private_bytes(priv)
    pk = X25519PublicKey.from_public_bytes(pub)

    def nacl_dh(k: int) -> None:
        for _ in range(k):
            nacl.crypto_scalarmult(priv, pub)

    def crypt_dh(k: int) -> None:
        for _ in range(k):
            sk.exchange(pk)

    pkt = b""

    def handshakes(k: int) -> None:
        for _ in range(k):
            a, b = _pair()
            _handshake(a, b, pkt)

    # a flood of valid-MAC1 initiations at a loaded responder: each costs a cookie reply only
    a, _b = _pair()
    loaded = WireGuardCore(generate_private_key(), under_load=lambda: True)
    a.set_peers([PeerSpec(loaded.public_key, endpoint=("100.64.0.2", 2))])
    init = a.encrypt(loaded.public_key, [pkt])[0][1]

    def flood(k: int) -> None:
        recv = loaded.receive_into
        src = ("100.64.0.9", 9)
        out: list = []
        for _ in range(k):
            recv(init, src, out, [])
            out.clear()

    return {"nacl_x25519": rate(n, nacl_dh), "cryptography_x25519": rate(n, crypt_dh),
            "handshakes_incl_setup": rate(max(1, n // 20), handshakes),
            "cookie_replies": rate(n, flood)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=50_000, help="packets per measurement")
    args = ap.parse_args()
    aead = bench_aead(args.n)
    core = bench_core(args.n)
    hs = bench_handshake(max(100, args.n // 10))
    print(f"ChaCha20-Poly1305, {SIZE}-byte packets (packets/s, best of 3):")
    for name in ("nacl_encrypt", "cryptography_encrypt", "nacl_decrypt", "cryptography_decrypt"):
        print(f"  {name:24s} {aead[name]:>12,.0f}")
    enc_ratio = aead["cryptography_encrypt"] / aead["nacl_encrypt"]
    dec_ratio = aead["cryptography_decrypt"] / aead["nacl_decrypt"]
    print(f"  ratio cryptography/nacl  encrypt {enc_ratio:.2f}x  decrypt {dec_ratio:.2f}x")
    print("Transport message layout (packets/s):")
    print(f"  header + encrypt()       {aead['layout_concat']:>12,.0f}")
    print(f"  encrypt_into(buffer)     {aead['layout_encrypt_into']:>12,.0f}"
          f"  ratio {aead['layout_encrypt_into'] / aead['layout_concat']:.2f}x")
    print("WireGuardCore full path (packets/s, Mbit/s of 1400-byte packets):")
    for name in ("core_encrypt", "core_receive"):
        r = core[name]
        print(f"  {name:24s} {r:>12,.0f}  {r * SIZE * 8 / 1e6:>8,.0f} Mbit/s")
    print(f"  core_encrypt / raw cryptography encrypt "
          f"{core['core_encrypt'] / aead['cryptography_encrypt']:.2f}x")
    print(f"  minimal receive loop     {core['minimal_receive']:>12,.0f}  (unpack + open, same"
          " distinct datagrams)")
    print("  core_receive / minimal receive loop "
          f"{core['core_receive'] / core['minimal_receive']:.2f}x")
    print("Handshake (operations/s):")
    print(f"  nacl X25519              {hs['nacl_x25519']:>12,.0f}")
    print(f"  cryptography X25519      {hs['cryptography_x25519']:>12,.0f}"
          f"  ratio nacl/cryptography {hs['nacl_x25519'] / hs['cryptography_x25519']:.2f}x")
    print(f"  full handshakes (with core setup) {hs['handshakes_incl_setup']:>8,.0f}")
    print(f"  initiations answered with cookie replies under load {hs['cookie_replies']:>8,.0f}")


if __name__ == "__main__":
    main()
