"""``WireGuardCore``: the sans-IO WireGuard state machine — peers, handshakes, sessions, timers.

Bytes in, ``(endpoint, bytes)`` out; no sockets, no threads, no logging. The caller feeds received
datagrams to ``receive``/``receive_many``, outbound IP packets to ``encrypt``, and calls ``tick``
every ~0.25 s (or at ``next_deadline()``); whatever the core wants sent comes back as a list of
``(endpoint, datagram)``. Drops are counted by reason in ``drops``; no input raises out of
``receive``. Timing follows the whitepaper (section 6) with every constant in ``WGConfig``.
Everything nondeterministic is injectable: ``clock``/``wallclock`` (timers, TAI64N timestamps)
and ``rng`` (ephemeral keys, session indices, retransmit jitter, cookie secrets and nonces).
Handshake processing lives in the ``handshake`` mixin, the compiled receive run over whole GRO
buffers in the ``rxrun`` mixin; this module holds configuration, the transport-data paths (both
directions) and the timers.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from nodeagent.engine.wireguard.config import WGConfig
from nodeagent.engine.wireguard.cookie import CookieChecker, CookieGenerator
from nodeagent.engine.wireguard.crypto import InvalidTag, dh, public_key
from nodeagent.engine.wireguard.handshake import HandshakeMixin, Outgoing
from nodeagent.engine.wireguard.messages import (
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    NONCE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    U32,
    padded_length,
)
from nodeagent.engine.wireguard.noise import ZERO_PSK, initial_hash
from nodeagent.engine.wireguard.peer import Endpoint, Keypair, Peer
from nodeagent.engine.wireguard.rxrun import ReceiveRunMixin

DROP_REASONS = (
    "short", "bad_type", "bad_length", "bad_mac1", "unknown_receiver", "unknown_peer",
    "replay", "decrypt_failed", "expired", "bad_inner", "handshake_failed", "handshake_replay",
    "rate_limited", "cookie_sent", "cookie_failed", "no_endpoint", "no_session",
    "queue_overflow", "internal_error",
)

_PAD = bytes(16)


class PeerSpec(NamedTuple):
    """One peer as configured: raw 32-byte public key, optional PSK, endpoint, keepalive."""

    public_key: bytes
    preshared_key: bytes | None = None
    endpoint: Endpoint | None = None
    persistent_keepalive: int = 0
    roaming: bool = True  # False: the endpoint stays as configured (a magicsock handle)


class Result:
    """What one ``receive`` produced: datagrams to send, and decrypted packets per peer."""

    __slots__ = ("to_send", "plaintexts")

    def __init__(self) -> None:
        self.to_send: Outgoing = []
        self.plaintexts: list[tuple[bytes, bytes]] = []


class WireGuardCore(HandshakeMixin, ReceiveRunMixin):
    """One WireGuard interface's protocol state (see the module docstring)."""

    def __init__(self, private_key: bytes, *, clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time, config: WGConfig | None = None,
                 under_load: Callable[[], bool] | None = None,
                 rng: Callable[[int], bytes] = os.urandom) -> None:
        """``rng(n)`` returns ``n`` random bytes; the default is the OS's CSPRNG. A
        deterministic one (tests only!) makes the core's output a function of its inputs."""
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key is 32 bytes")
        self.private_key = bytes(private_key)
        self.public_key = public_key(self.private_key)
        self.config = cfg = config or WGConfig()
        self._clock = clock
        self._wallclock = wallclock
        self._under_load_fn = under_load
        self._rng = rng
        self._own_hash0 = initial_hash(self.public_key)
        self._checker = CookieChecker(self.public_key, cfg.cookie_refresh_time, rng)
        self._peers: dict[bytes, Peer] = {}
        self._keypairs: dict[int, Keypair] = {}  # local index → session
        self._handshakes: dict[int, Peer] = {}  # local index of our pending initiation → peer
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        # Handshake messages made, by message type (1 initiation, 2 response, 3 cookie reply):
        # shows which side initiated.
        self.handshakes_sent = [0, 0, 0, 0]
        self.counters: dict[str, int] = {"cookie_received": 0, "handshakes": 0}
        self._last_ts = b""
        self._load_window = float("-inf")
        self._load_count = 0
        self._load_until = float("-inf")
        self._buckets: dict[bytes, list[float]] = {}
        self._rand = random.Random(rng(32))  # retransmit jitter only
        # hot-path copies of config values (the config is read once, at construction)
        self._reject_after_time = cfg.reject_after_time
        self._rekey_on_receive = (cfg.reject_after_time - cfg.keepalive_timeout
                                  - cfg.rekey_timeout)

    # --- configuration --------------------------------------------------------------------------

    def set_peers(self, specs: Iterable[PeerSpec]) -> None:
        """Replace the peer set. Peers whose key and PSK are unchanged keep their sessions; a
        changed endpoint in the spec overrides the roamed one, an unchanged spec keeps it."""
        cfg = self.config
        now = self._clock()
        new: dict[bytes, Peer] = {}
        for spec in specs:
            key = bytes(spec.public_key)
            if len(key) != 32 or key == self.public_key:
                raise ValueError(f"peer key {key.hex()!r}: not a usable WireGuard public key")
            psk = bytes(spec.preshared_key) if spec.preshared_key else ZERO_PSK
            old = self._peers.get(key)
            if old is not None and old.psk == psk:
                if spec.endpoint != old.spec_endpoint:
                    old.spec_endpoint = spec.endpoint
                    if spec.endpoint is not None:
                        old.endpoint = spec.endpoint
                old.roaming = spec.roaming
                if spec.persistent_keepalive != old.persistent_keepalive:
                    old.persistent_keepalive = spec.persistent_keepalive
                    old.persistent_at = now if spec.persistent_keepalive else 0.0
                new[key] = old
                continue
            if old is not None:
                self._forget(old)
            ss = dh(self.private_key, key)
            if ss is None or ss == bytes(32):
                raise ValueError(f"peer key {key.hex()!r}: low-order point")
            peer = Peer(key, psk, spec.endpoint, spec.persistent_keepalive, initial_hash(key), ss,
                        CookieGenerator(key, cfg.cookie_refresh_time), cfg.queue_max)
            peer.roaming = spec.roaming
            if spec.persistent_keepalive:
                peer.persistent_at = now  # the first keepalive goes out at the next tick
            new[key] = peer
        for key, old in self._peers.items():
            if key not in new:
                self._forget(old)
        self._peers = new

    def peers(self) -> list[bytes]:
        return list(self._peers)

    def _forget(self, peer: Peer) -> None:
        for kp in (peer.previous, peer.current, peer.next):
            if kp is not None:
                self._keypairs.pop(kp.local_index, None)
        peer.previous = peer.current = peer.next = None
        self._clear_handshake(peer)
        peer.queue.clear()

    # --- outbound -------------------------------------------------------------------------------

    def encrypt(self, peer_key: bytes, packets: list[bytes]) -> Outgoing:
        """Encrypt IP packets for a peer. Without a usable session they are queued and a
        handshake starts; the result then holds the initiation (if one is due)."""
        out: Outgoing = []
        peer = self._peers.get(peer_key)
        if peer is None:
            self.drops["unknown_peer"] += len(packets)
            return out
        if peer.endpoint is None:
            self.drops["no_endpoint"] += len(packets)
            return out
        now = self._clock()
        kp = peer.current
        if kp is None or not self._sendable(kp, now):
            self._enqueue(peer, packets)
            self._initiate(peer, now, out, retry=False)
            return out
        self._seal(peer, kp, packets, now, out)
        cfg = self.config
        if kp.initiator and (kp.send_counter >= cfg.rekey_after_messages
                             or now - kp.created >= cfg.rekey_after_time):
            self._initiate(peer, now, out, retry=False)
        return out

    def _enqueue(self, peer: Peer, packets: list[bytes]) -> None:
        q = peer.queue
        over = len(q) + len(packets) - (q.maxlen or 0)
        if over > 0:
            self.drops["queue_overflow"] += over
        q.extend(packets)

    def _sendable(self, kp: Keypair, now: float) -> bool:
        cfg = self.config
        return (kp.send_counter < cfg.reject_after_messages
                and now - kp.created < cfg.reject_after_time)

    def _seal(self, peer: Peer, kp: Keypair, packets: Iterable[bytes], now: float,
              out: Outgoing) -> None:
        """The hot loop: pad, encrypt, prefix the 16-byte header, append to ``out``."""
        fast = kp.fast
        if fast is not None and type(packets) is list:
            ctr = kp.send_counter
            if ctr + len(packets) <= self.config.reject_after_messages:
                segs = fast.seal_many(kp.remote_index, ctr, packets, self.config.mtu)
                if segs is not None:  # None: a packet past the MTU, the loop below knows it
                    ep = peer.endpoint
                    out += [(ep, s) for s in segs]
                    kp.send_counter = ctr + len(segs)
                    self._sealed(peer, now, sum(map(len, segs)), any(packets))
                    return
        seal = kp.send.encrypt  # measured: header + encrypt() beats encrypt_into a buffer
        pack_hdr = TRANSPORT_HEADER.pack
        pack_nonce = NONCE.pack
        ridx = kp.remote_index
        ctr = kp.send_counter
        limit = self.config.reject_after_messages
        mtu = self.config.mtu
        ep = peer.endpoint
        append = out.append
        sent = 0
        data = False
        for pkt in packets:
            if ctr >= limit:
                self.drops["no_session"] += 1
                continue
            n = len(pkt)
            size = n + ((-n) & 15)
            if size > mtu:
                size = padded_length(n, mtu)
            if size != n:
                pkt = bytes(pkt) + _PAD[: size - n]
            append((ep, pack_hdr(MSG_TRANSPORT, ridx, ctr) + seal(pack_nonce(ctr), pkt, None)))
            ctr += 1
            sent += size + 32
            data = data or n > 0
        kp.send_counter = ctr
        self._sealed(peer, now, sent, data)

    def _sealed(self, peer: Peer, now: float, sent: int, data: bool) -> None:
        """Bookkeeping after a burst was sealed (``data``: it held more than keepalives)."""
        peer.tx_bytes += sent
        peer.keepalive_at = 0.0  # anything authenticated we send doubles as a keepalive
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        if data and not peer.new_handshake_at:
            cfg = self.config
            peer.new_handshake_at = now + cfg.keepalive_timeout + cfg.rekey_timeout

    def _flush(self, peer: Peer, now: float, out: Outgoing) -> None:
        """Send what waited for a session, or a keepalive to confirm the session to the peer."""
        kp = peer.current
        if kp is None or peer.endpoint is None:
            return
        if peer.queue:
            packets = list(peer.queue)
            peer.queue.clear()
            self._seal(peer, kp, packets, now, out)
        else:
            self._seal(peer, kp, (b"",), now, out)

    def _send_keepalive(self, peer: Peer, now: float, out: Outgoing) -> None:
        kp = peer.current
        if kp is not None and peer.endpoint is not None and self._sendable(kp, now):
            self._seal(peer, kp, (b"",), now, out)
        elif peer.endpoint is not None:
            if not peer.queue:
                peer.queue.append(b"")
            self._initiate(peer, now, out, retry=False)

    # --- inbound --------------------------------------------------------------------------------

    def receive(self, datagram: bytes, src: Endpoint) -> Result:
        """Process one datagram from ``src``; never raises."""
        res = Result()
        self.receive_into(datagram, src, res.to_send, res.plaintexts)
        return res

    def receive_many(self, datagrams: Iterable[tuple[bytes, Endpoint]]) -> Result:
        res = Result()
        to_send, plain = res.to_send, res.plaintexts
        for d, src in datagrams:
            self.receive_into(d, src, to_send, plain)
        return res

    def receive_into(self, datagram: bytes, src: Endpoint, to_send: Outgoing,
                     plaintexts: list[tuple[bytes, bytes]]) -> None:
        """The allocation-lean form of ``receive``: appends to the caller's lists. Transport
        data is handled inline (one call per packet); handshake messages branch out."""
        drops = self.drops
        try:
            n = len(datagram)
            if n < TRANSPORT_MIN_SIZE:
                if n < 4:
                    drops["short"] += 1
                    return
                t = U32.unpack_from(datagram)[0]
                if t == MSG_TRANSPORT:
                    drops["short"] += 1
                    return
            else:
                t, idx, ctr = TRANSPORT_HEADER.unpack_from(datagram)
            if t != MSG_TRANSPORT:
                if t == MSG_INITIATION:
                    self._receive_initiation(bytes(datagram), src, to_send)
                elif t == MSG_RESPONSE:
                    self._receive_response(bytes(datagram), src, to_send)
                elif t == MSG_COOKIE_REPLY:
                    self._receive_cookie(bytes(datagram))
                else:
                    drops["bad_type"] += 1
                return
            kp = self._keypairs.get(idx)
            if kp is None:
                drops["unknown_receiver"] += 1
                return
            now = self._clock()
            if now - kp.created >= self._reject_after_time:
                drops["expired"] += 1
                return
            fast = kp.fast
            if fast is not None:
                pt = fast.open(datagram)
                if pt is None:
                    drops["decrypt_failed"] += 1
                    return
            else:
                try:  # measured: slicing bytes beats a memoryview here
                    pt = kp.recv.decrypt(NONCE.pack(ctr), datagram[16:], None)
                except InvalidTag:
                    drops["decrypt_failed"] += 1
                    return
            if not kp.replay.update(ctr):  # after the AEAD: only authentic counters move it
                drops["replay"] += 1
                return
            peer = kp.peer
            self._authentic_rx(peer, kp, src, n, now, to_send)
            m = len(pt)
            if m == 0:
                return  # keepalive
            if not peer.keepalive_at:
                peer.keepalive_at = now + self.config.keepalive_timeout
            v = pt[0] >> 4
            if v == 4 and m >= 20:
                total = (pt[2] << 8) | pt[3]
            elif v == 6 and m >= 40:
                total = 40 + ((pt[4] << 8) | pt[5])
            else:
                drops["bad_inner"] += 1
                return
            if total > m or total < 20:
                drops["bad_inner"] += 1
                return
            if total != m:
                pt = pt[:total]  # strip the padding
            plaintexts.append((peer.public_key, pt))
        except Exception:  # a bug must cost one packet, not the receive loop
            drops["internal_error"] += 1

    def _authentic_rx(self, peer: Peer, kp: Keypair, src: Endpoint, nbytes: int, now: float,
                      to_send: Outgoing) -> None:
        """What authenticated transport data of ``kp`` (``nbytes`` on the wire, from ``src``)
        tells the peer's timers: roaming, confirming ``next``, keepalive and rekey deadlines.
        Called per datagram by ``receive_into`` and once per burst by ``receive_run``."""
        peer.rx_bytes += nbytes
        if src != peer.endpoint and peer.roaming:
            peer.endpoint = src  # roaming: answer where authenticated traffic comes from
        if kp is peer.next:
            self._confirm_next(peer, kp, now, to_send)
        peer.new_handshake_at = 0.0
        if peer.persistent_keepalive:
            peer.persistent_at = now + peer.persistent_keepalive
        if (kp.initiator and not peer.sent_last_minute_handshake
                and now - kp.created >= self._rekey_on_receive and kp is peer.current):
            peer.sent_last_minute_handshake = True
            self._initiate(peer, now, to_send, retry=False)

    def _confirm_next(self, peer: Peer, kp: Keypair, now: float, out: Outgoing) -> None:
        """A responder's new session got its first packet: it becomes current."""
        if kp.fast is not None:
            kp.fast.confirm = False
        if peer.previous is not None:
            self._keypairs.pop(peer.previous.local_index, None)
        peer.previous = peer.current
        peer.current = kp
        peer.next = None
        self._handshake_complete(peer)
        if peer.queue:
            self._flush(peer, now, out)

    # --- timers ---------------------------------------------------------------------------------

    def tick(self) -> Outgoing:
        """Run due timers: handshake retransmits, keepalives, rekeys, key expiry."""
        out: Outgoing = []
        now = self._clock()
        cfg = self.config
        for peer in self._peers.values():
            if peer.retransmit_at and now >= peer.retransmit_at:
                if peer.attempts >= cfg.max_handshake_attempts:
                    peer.retransmit_at = 0.0  # give up until new traffic asks again
                    peer.keepalive_at = 0.0
                    self.drops["no_session"] += len(peer.queue)
                    peer.queue.clear()
                    self._clear_handshake(peer)
                    if not peer.zero_at:
                        peer.zero_at = now + 3 * cfg.reject_after_time
                else:
                    peer.attempts += 1
                    self._initiate(peer, now, out, retry=True)
            if peer.keepalive_at and now >= peer.keepalive_at:
                peer.keepalive_at = 0.0
                kp = peer.current
                if kp is not None and peer.endpoint is not None and self._sendable(kp, now):
                    self._seal(peer, kp, (b"",), now, out)
            if peer.new_handshake_at and now >= peer.new_handshake_at:
                peer.new_handshake_at = 0.0  # we sent, heard nothing back: try a new session
                self._initiate(peer, now, out, retry=False)
            if peer.zero_at and now >= peer.zero_at:
                peer.zero_at = 0.0
                self._forget(peer)
            if peer.persistent_at and now >= peer.persistent_at:
                peer.persistent_at = now + peer.persistent_keepalive
                self._send_keepalive(peer, now, out)
            self._expire(peer, now)
        if len(self._buckets) > 4096 or (self._buckets and now >= self._load_until):
            self._buckets.clear()
        return out

    def _expire(self, peer: Peer, now: float) -> None:
        """Forget sessions past REJECT_AFTER_TIME so their indices stop matching."""
        limit = self.config.reject_after_time
        for name in ("previous", "current", "next"):
            kp = getattr(peer, name)
            if kp is not None and now - kp.created >= limit:
                self._keypairs.pop(kp.local_index, None)
                setattr(peer, name, None)

    def next_deadline(self) -> float | None:
        """The earliest armed timer (monotonic clock), ``None`` if nothing is armed."""
        best: float | None = None
        for p in self._peers.values():
            for t in (p.retransmit_at, p.keepalive_at, p.new_handshake_at, p.zero_at,
                      p.persistent_at):
                if t and (best is None or t < best):
                    best = t
        return best

    # --- introspection --------------------------------------------------------------------------

    def peer_stats(self, peer_key: bytes) -> dict[str, Any]:
        p = self._peers.get(peer_key)
        if p is None:
            raise KeyError(peer_key.hex())
        now = self._clock()
        kp = p.current
        return {
            "last_handshake": p.last_handshake,
            "rx_bytes": p.rx_bytes,
            "tx_bytes": p.tx_bytes,
            "endpoint": p.endpoint,
            "has_session": kp is not None and self._sendable(kp, now),
            "handshakes": p.handshakes,
            "queued": len(p.queue),
            "persistent_keepalive": p.persistent_keepalive,
        }
