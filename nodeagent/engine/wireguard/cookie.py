"""MAC1/MAC2 and cookie replies: WireGuard's DoS mitigation (whitepaper section 5.4.4 and 5.4.7).

``CookieChecker`` is the receiving side, keyed by our own public key: it checks MAC1 on every
handshake message, and under load checks MAC2 against a cookie bound to the sender's address
(a keyed hash with a secret that changes every two minutes), answering with an encrypted cookie
reply when MAC2 is missing or stale; its secrets and reply nonces come from an injectable
``rng``. ``CookieGenerator`` is the sending side, one per peer: it appends MAC1 (and MAC2 while
it holds a fresh cookie from that peer) and consumes cookie replies.
"""

from __future__ import annotations

import hmac
import os
import socket
from collections.abc import Callable
from typing import Any

from nodeagent.engine.wireguard.crypto import hash2, mac, xaead_decrypt, xaead_encrypt
from nodeagent.engine.wireguard.messages import (
    COOKIE_REPLY,
    COOKIE_REPLY_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    pack_cookie_reply,
)

_ZERO_MAC = bytes(16)
_compare = hmac.compare_digest


def address_bytes(src: tuple[Any, ...]) -> bytes:
    """The bytes a cookie is bound to: packed IP address then the big-endian port."""
    host, port = src[0], src[1]
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, TypeError):
        packed = str(host).encode()
    return packed + (int(port) & 0xFFFF).to_bytes(2, "big")


class CookieChecker:
    """Our side: verify MACs of handshake messages sent to us, and make cookie replies."""

    __slots__ = ("mac1_key", "cookie_key", "refresh", "_rng", "_secret", "_secret_time")

    def __init__(self, own_public: bytes, refresh: float,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        self.mac1_key = hash2(LABEL_MAC1, own_public)
        self.cookie_key = hash2(LABEL_COOKIE, own_public)
        self.refresh = refresh
        self._rng = rng  # n -> n random bytes: cookie secrets and reply nonces
        self._secret = b""
        self._secret_time = float("-inf")

    def check_mac1(self, msg: bytes, mac1_at: int) -> bool:
        return _compare(mac(self.mac1_key, msg[:mac1_at]), msg[mac1_at:mac1_at + 16])

    def check_mac2(self, msg: bytes, mac1_at: int, src: bytes, now: float) -> bool:
        if now - self._secret_time > self.refresh:
            return False  # a cookie from an expired secret is no cookie
        cookie = mac(self._secret, src)
        return _compare(mac(cookie, msg[:mac1_at + 16]), msg[mac1_at + 16:mac1_at + 32])

    def make_reply(self, msg: bytes, mac1_at: int, receiver: int, src: bytes, now: float) -> bytes:
        """A cookie reply to ``msg`` (whose sender index is ``receiver``) arrived from ``src``."""
        if now - self._secret_time > self.refresh:
            self._secret = self._rng(32)
            self._secret_time = now
        cookie = mac(self._secret, src)
        nonce = self._rng(24)
        sealed = xaead_encrypt(self.cookie_key, nonce, cookie, msg[mac1_at:mac1_at + 16])
        return pack_cookie_reply(receiver, nonce, sealed)


class CookieGenerator:
    """Sending side towards one peer: MACs on our handshake messages, cookies from its replies."""

    __slots__ = ("mac1_key", "cookie_key", "refresh", "cookie", "cookie_time", "last_mac1")

    def __init__(self, peer_public: bytes, refresh: float) -> None:
        self.mac1_key = hash2(LABEL_MAC1, peer_public)
        self.cookie_key = hash2(LABEL_COOKIE, peer_public)
        self.refresh = refresh
        self.cookie = b""
        self.cookie_time = float("-inf")
        self.last_mac1 = b""

    def add_macs(self, body: bytes, now: float) -> bytes:
        """``body`` (the message up to MAC1) with MAC1 and MAC2 (zeros without a fresh cookie)."""
        m1 = mac(self.mac1_key, body)
        self.last_mac1 = m1
        with_m1 = body + m1
        if self.cookie and now - self.cookie_time <= self.refresh:
            return with_m1 + mac(self.cookie, with_m1)
        return with_m1 + _ZERO_MAC

    def consume_reply(self, msg: bytes, now: float) -> bool:
        """Take the cookie out of a reply to our last message; False if it does not open."""
        if len(msg) != COOKIE_REPLY_SIZE or not self.last_mac1:
            return False
        _t, _r, nonce, sealed = COOKIE_REPLY.unpack(msg)
        cookie = xaead_decrypt(self.cookie_key, nonce, sealed, self.last_mac1)
        if cookie is None:
            return False
        self.cookie = cookie
        self.cookie_time = now
        self.last_mac1 = b""
        return True
