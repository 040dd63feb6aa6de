"""Curve25519 key pairs of a node (machine key, node key, disco key) and their text forms.

Text forms follow Tailscale: ``nodekey:<64 hex>``, ``mkey:<64 hex>``, ``discokey:<64 hex>`` for
public keys; private keys never leave the state file.
"""

from __future__ import annotations

from dataclasses import dataclass

from nacl.public import PrivateKey

NODE_PREFIX = "nodekey:"
MACHINE_PREFIX = "mkey:"
DISCO_PREFIX = "discokey:"


@dataclass(frozen=True)
class KeyPair:
    private: bytes  # 32 bytes, clamped by X25519 use

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(bytes(PrivateKey.generate()))

    @property
    def public(self) -> bytes:
        return bytes(PrivateKey(self.private).public_key)

    def public_text(self, prefix: str) -> str:
        return prefix + self.public.hex()


def parse_public(text: str, prefix: str) -> bytes:
    """``nodekey:<hex>`` (or the bare hex) → 32 raw bytes; ValueError naming the problem."""
    s = text[len(prefix):] if text.startswith(prefix) else text
    if len(s) != 64:
        raise ValueError(f"key {text!r}: want {prefix}<64 hex digits>")
    try:
        return bytes.fromhex(s)
    except ValueError:
        raise ValueError(f"key {text!r}: not hex") from None
