"""Handshake half of ``WireGuardCore``: sending initiations, admitting handshake messages
(MAC1, and under load MAC2/cookie replies plus a per-address rate limit), consuming initiations,
responses and cookie replies, and installing the resulting sessions.

Kept as a mixin so ``core`` stays readable; it shares the core's state (declared below) and is
not meant to be used on its own. None of this is on the per-packet data path.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nodeagent.engine.wireguard.config import WGConfig
from nodeagent.engine.wireguard.cookie import CookieChecker, address_bytes
from nodeagent.engine.wireguard.crypto import generate_private_key, tai64n
from nodeagent.engine.wireguard.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_MAC1,
    RESPONSE_SIZE,
    TYPE_AND_INDEX,
    U32,
)
from nodeagent.engine.wireguard.noise import (
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    finish_initiation,
)
from nodeagent.engine.wireguard.peer import HS_INIT_SENT, HS_NONE, Endpoint, Keypair, Peer

Outgoing = list[tuple[Endpoint, bytes]]


class HandshakeMixin:
    """Handshake processing for ``WireGuardCore`` (see the module docstring)."""

    private_key: bytes
    public_key: bytes
    config: WGConfig
    drops: dict[str, int]
    counters: dict[str, int]
    _clock: Callable[[], float]
    _wallclock: Callable[[], float]
    _under_load_fn: Callable[[], bool] | None
    _own_hash0: bytes
    _checker: CookieChecker
    _peers: dict[bytes, Peer]
    _keypairs: dict[int, Keypair]
    _handshakes: dict[int, Peer]
    _last_ts: bytes
    _load_window: float
    _load_count: int
    _load_until: float
    _buckets: dict[bytes, list[float]]
    _rng: Callable[[int], bytes]
    _rand: random.Random

    def _flush(self, peer: Peer, now: float, out: Outgoing) -> None:
        raise NotImplementedError  # provided by WireGuardCore

    def _new_index(self) -> int:
        while True:
            i = int.from_bytes(self._rng(4), "little")
            if i not in self._keypairs and i not in self._handshakes:
                return i

    def _clear_handshake(self, peer: Peer) -> None:
        if peer.hs_state == HS_INIT_SENT:
            self._handshakes.pop(peer.hs_index, None)
        peer.hs_state = HS_NONE
        peer.hs_init = None

    def _timestamp(self) -> bytes:
        ts = tai64n(self._wallclock())
        if ts <= self._last_ts:  # keep our initiations strictly increasing for the peer's check
            ts = (int.from_bytes(self._last_ts, "big") + 1).to_bytes(12, "big")
        self._last_ts = ts
        return ts

    def _initiate(self, peer: Peer, now: float, out: Outgoing, retry: bool) -> None:
        cfg = self.config
        if not retry:
            if now - peer.last_sent_handshake < cfg.rekey_timeout:
                return  # one initiation per REKEY_TIMEOUT unless the retransmit timer fires
            peer.attempts = 0
        peer.last_sent_handshake = now
        self._clear_handshake(peer)
        index = self._new_index()
        made = create_initiation(self.public_key, peer.hash0, peer.public_key,
                                 peer.static_static, index, self._timestamp(),
                                 generate_private_key(self._rng))
        if made is None:
            return
        body, state = made
        msg = peer.cookies.add_macs(body, now)
        peer.hs_state = HS_INIT_SENT
        peer.hs_init = state
        peer.hs_index = index
        self._handshakes[index] = peer
        if peer.endpoint is not None:
            out.append((peer.endpoint, msg))
            self.handshakes_sent[MSG_INITIATION] += 1
            peer.tx_bytes += len(msg)
        peer.keepalive_at = 0.0
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        peer.retransmit_at = now + cfg.rekey_timeout + self._rand.uniform(
            0.0, cfg.rekey_timeout_jitter)

    def _handshake_complete(self, peer: Peer) -> None:
        peer.retransmit_at = 0.0
        peer.attempts = 0
        peer.sent_last_minute_handshake = False
        peer.last_handshake = self._wallclock()
        peer.handshakes += 1
        self.counters["handshakes"] += 1

    def _session_derived(self, peer: Peer, now: float) -> None:
        peer.zero_at = now + 3 * self.config.reject_after_time
        peer.new_handshake_at = 0.0
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive

    def _under_load(self, now: float) -> bool:
        if self._under_load_fn is not None:
            return bool(self._under_load_fn())
        cfg = self.config
        if now - self._load_window >= 1.0:
            self._load_window = now
            self._load_count = 0
        self._load_count += 1
        if self._load_count > cfg.under_load_handshakes_per_s:
            self._load_until = now + cfg.under_load_after_time
        return now < self._load_until

    def _admit(self, msg: bytes, mac1_at: int, sender: int, src: Endpoint, now: float,
               to_send: Outgoing) -> bool:
        """MAC1 always; under load MAC2 (else a cookie reply) and a per-address rate limit."""
        if not self._checker.check_mac1(msg, mac1_at):
            self.drops["bad_mac1"] += 1
            return False
        if not self._under_load(now):
            return True
        addr = address_bytes(src)
        if not self._checker.check_mac2(msg, mac1_at, addr, now):
            to_send.append((src, self._checker.make_reply(msg, mac1_at, sender, addr, now)))
            self.handshakes_sent[MSG_COOKIE_REPLY] += 1
            self.drops["cookie_sent"] += 1
            return False
        if not self._rate_ok(addr[:-2], now):
            self.drops["rate_limited"] += 1
            return False
        return True

    def _rate_ok(self, host: bytes, now: float) -> bool:
        cfg = self.config
        b = self._buckets.get(host)
        if b is None:
            self._buckets[host] = [cfg.ratelimit_burst - 1.0, now]
            return True
        tokens = min(float(cfg.ratelimit_burst), b[0] + (now - b[1]) * cfg.ratelimit_per_s)
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True

    def _receive_initiation(self, msg: bytes, src: Endpoint, to_send: Outgoing) -> None:
        drops = self.drops
        if len(msg) != INITIATION_SIZE:
            drops["bad_length"] += 1
            return
        now = self._clock()
        sender = TYPE_AND_INDEX.unpack_from(msg)[1]
        if not self._admit(msg, INITIATION_MAC1, sender, src, now, to_send):
            return
        opened = consume_initiation(self.private_key, self._own_hash0, msg)
        if opened is None:
            drops["handshake_failed"] += 1
            return
        peer = self._peers.get(opened[0].remote_static)
        if peer is None:
            drops["unknown_peer"] += 1
            return
        init = finish_initiation(opened[0], peer.static_static)
        if init is None:
            drops["handshake_failed"] += 1
            return
        if init.timestamp <= peer.last_timestamp:
            drops["handshake_replay"] += 1
            return
        if now - peer.last_init_consumed < self.config.handshake_initiation_rate:
            drops["rate_limited"] += 1
            return
        index = self._new_index()
        made = create_response(init, peer.psk, index, generate_private_key(self._rng))
        if made is None:
            drops["handshake_failed"] += 1
            return
        peer.last_timestamp = init.timestamp
        peer.last_init_consumed = now
        body, recv_key, send_key = made
        reply = peer.cookies.add_macs(body, now)
        self._clear_handshake(peer)  # crossing initiations: theirs wins, ours is abandoned
        kp = Keypair(send_key, recv_key, index, init.sender, now, False, peer,
                     self.config.reject_after_messages)
        for old in (peer.next, peer.previous):
            if old is not None:
                self._keypairs.pop(old.local_index, None)
        peer.previous = None
        peer.next = kp
        self._keypairs[index] = kp
        if peer.roaming:
            peer.endpoint = src
        peer.rx_bytes += INITIATION_SIZE
        peer.tx_bytes += len(reply)
        peer.last_sent_handshake = now  # give the initiator REKEY_TIMEOUT to confirm first
        peer.keepalive_at = 0.0
        self._session_derived(peer, now)
        to_send.append((src, reply))
        self.handshakes_sent[MSG_RESPONSE] += 1

    def _receive_response(self, msg: bytes, src: Endpoint, to_send: Outgoing) -> None:
        drops = self.drops
        if len(msg) != RESPONSE_SIZE:
            drops["bad_length"] += 1
            return
        now = self._clock()
        _t, sender, receiver = TYPE_AND_INDEX.unpack_from(msg) + U32.unpack_from(msg, 8)
        if not self._admit(msg, RESPONSE_MAC1, sender, src, now, to_send):
            return
        peer = self._handshakes.get(receiver)
        if peer is None or peer.hs_state != HS_INIT_SENT or peer.hs_init is None:
            drops["unknown_receiver"] += 1
            return
        opened = consume_response(peer.hs_init, self.private_key, peer.psk, msg)
        if opened is None:
            drops["handshake_failed"] += 1
            return
        remote_index, send_key, recv_key = opened
        self._clear_handshake(peer)
        kp = Keypair(send_key, recv_key, receiver, remote_index, now, True, peer,
                     self.config.reject_after_messages)
        stale = [peer.previous]
        if peer.next is not None:
            stale.append(peer.current)
            peer.previous = peer.next
            peer.next = None
        else:
            peer.previous = peer.current
        for old in stale:
            if old is not None:
                self._keypairs.pop(old.local_index, None)
        peer.current = kp
        self._keypairs[receiver] = kp
        if peer.roaming:
            peer.endpoint = src
        peer.rx_bytes += RESPONSE_SIZE
        self._handshake_complete(peer)
        self._session_derived(peer, now)
        self._flush(peer, now, to_send)

    def _receive_cookie(self, msg: bytes) -> None:
        if len(msg) != COOKIE_REPLY_SIZE:
            self.drops["bad_length"] += 1
            return
        idx = U32.unpack_from(msg, 4)[0]
        peer = self._handshakes.get(idx)
        if peer is None:
            kp = self._keypairs.get(idx)
            peer = kp.peer if kp is not None else None
        if peer is None:
            self.drops["unknown_receiver"] += 1
            return
        if not peer.cookies.consume_reply(msg, self._clock()):
            self.drops["cookie_failed"] += 1
            return
        self.counters["cookie_received"] += 1
