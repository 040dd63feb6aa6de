"""Sans-IO WireGuard (Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s): handshake, sessions, timers.

``core.WireGuardCore`` is the entry point; ``config.WGConfig`` overrides the whitepaper timers;
``handshake`` (a mixin of the core), ``messages``, ``noise``, ``cookie``, ``replay`` and ``crypto``
are the pieces it is built from.
This package re-exports the public API.
"""

from nodeagent.engine.wireguard.config import WGConfig
from nodeagent.engine.wireguard.core import DROP_REASONS, PeerSpec, Result, WireGuardCore
from nodeagent.engine.wireguard.crypto import generate_private_key, public_key
from nodeagent.engine.wireguard.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
    message_type,
)
from nodeagent.engine.wireguard.replay import ReplayWindow

__all__ = [
    "COOKIE_REPLY_SIZE",
    "DROP_REASONS",
    "INITIATION_SIZE",
    "MSG_COOKIE_REPLY",
    "MSG_INITIATION",
    "MSG_RESPONSE",
    "MSG_TRANSPORT",
    "RESPONSE_SIZE",
    "TRANSPORT_HEADER_SIZE",
    "PeerSpec",
    "ReplayWindow",
    "Result",
    "WGConfig",
    "WireGuardCore",
    "generate_private_key",
    "message_type",
    "public_key",
]
