"""Per-peer and per-session state of the WireGuard core: ``Keypair`` and ``Peer``.

Plain ``__slots__`` records; the behaviour lives in ``core``. A ``Peer`` holds up to three
keypairs: ``current`` (sends and receives), ``previous`` (still receives, for packets in flight
across a rekey) and ``next`` (a responder's fresh session, unused for sending until the initiator
proves it has it by sending data with it). Timer fields are monotonic deadlines, 0 = not armed.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from nodeagent.accel import ACCEL
from nodeagent.engine.wireguard.cookie import CookieGenerator
from nodeagent.engine.wireguard.crypto import AEAD
from nodeagent.engine.wireguard.noise import InitiationState
from nodeagent.engine.wireguard.replay import ReplayWindow

Endpoint = tuple[Any, ...]

HS_NONE = 0
HS_INIT_SENT = 1


class Keypair:
    """One transport session: the two cipher states, indices, counters and replay window."""

    __slots__ = (
        "send", "recv", "send_counter", "local_index", "remote_index", "created", "initiator",
        "replay", "peer", "fast",
    )

    def __init__(self, send_key: bytes, recv_key: bytes, local_index: int, remote_index: int,
                 created: float, initiator: bool, peer: Peer, reject_after_messages: int) -> None:
        self.send = AEAD(send_key)  # built once per session: no per-packet key setup
        self.recv = AEAD(recv_key)
        # The compiled session (both directions, keyed once) when the accelerator is in use; it
        # then also holds the replay window, so the UDP run (``open_run``) and single datagrams
        # (DERP) move one window. A responder's session starts as ``next``: ``confirm`` makes
        # ``open_run`` stop after its first packet, for the core to promote it.
        self.fast = (ACCEL.Session(send_key, recv_key, created, reject_after_messages)
                     if ACCEL is not None else None)
        self.send_counter = 0
        self.local_index = local_index
        self.remote_index = remote_index
        self.created = created
        self.initiator = initiator
        self.replay: ReplayWindow | Any
        if self.fast is not None:
            self.fast.confirm = not initiator
            self.replay = self.fast  # same update/check as ReplayWindow
        else:
            self.replay = ReplayWindow(reject_after_messages)
        self.peer = peer


class Peer:
    """A configured peer: identity, precomputed handshake values, sessions, timers, counters."""

    __slots__ = (
        "public_key", "psk", "endpoint", "spec_endpoint", "persistent_keepalive",
        "hash0", "static_static", "cookies",
        "hs_state", "hs_init", "hs_index", "last_timestamp", "last_init_consumed",
        "last_sent_handshake", "sent_last_minute_handshake",
        "previous", "current", "next", "queue",
        "retransmit_at", "attempts", "keepalive_at", "new_handshake_at", "zero_at",
        "persistent_at",
        "rx_bytes", "tx_bytes", "last_handshake", "handshakes", "roaming",
    )

    def __init__(self, public_key: bytes, psk: bytes, endpoint: Endpoint | None,
                 persistent_keepalive: int, hash0: bytes, static_static: bytes,
                 cookies: CookieGenerator, queue_max: int) -> None:
        self.public_key = public_key
        self.psk = psk
        self.endpoint = endpoint
        self.spec_endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive
        self.hash0 = hash0  # initial transcript hash for initiations to this peer
        self.static_static = static_static  # DH(our static, its static), fixed per peer
        self.cookies = cookies
        self.hs_state = HS_NONE
        self.hs_init: InitiationState | None = None
        self.hs_index = 0
        self.last_timestamp = b""  # greatest TAI64N accepted from this peer (replay guard)
        self.last_init_consumed = float("-inf")
        self.last_sent_handshake = float("-inf")
        self.sent_last_minute_handshake = False
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None
        self.queue: deque[bytes] = deque(maxlen=queue_max)
        self.retransmit_at = 0.0
        self.attempts = 0
        self.keepalive_at = 0.0
        self.new_handshake_at = 0.0
        self.zero_at = 0.0
        self.persistent_at = 0.0
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake = 0.0  # wall clock of the last completed handshake, 0 = never
        self.handshakes = 0
        # Roaming: answer where authenticated traffic comes from. Off when the endpoint is a
        # path chooser's handle (magicsock decides where packets go, not the last source).
        self.roaming = True
