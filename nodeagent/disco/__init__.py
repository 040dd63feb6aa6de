"""Disco (path discovery): the sans-IO codec magicsock uses to find and verify direct paths.

``codec`` seals/opens disco packets and encodes/decodes Ping, Pong and CallMeMaybe. The names
re-exported here are loaded on first use, so importing the package loads neither the codec's
crypto nor (ever) asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodeagent.lazy import lazy_exports

if TYPE_CHECKING:
    from nodeagent.disco.codec import (
        DERP_MAGIC_IP,
        HEADER_LEN,
        KEY_LEN,
        MAGIC,
        NONCE_LEN,
        CallMeMaybe,
        DiscoBox,
        DiscoError,
        Message,
        Ping,
        Pong,
        decode_endpoint,
        decode_message,
        encode_endpoint,
        encode_message,
        looks_like_disco,
        open_packet,
        seal,
        sender_key,
    )

__all__ = [
    "DERP_MAGIC_IP",
    "HEADER_LEN",
    "KEY_LEN",
    "MAGIC",
    "NONCE_LEN",
    "CallMeMaybe",
    "DiscoBox",
    "DiscoError",
    "Message",
    "Ping",
    "Pong",
    "decode_endpoint",
    "decode_message",
    "encode_endpoint",
    "encode_message",
    "looks_like_disco",
    "open_packet",
    "seal",
    "sender_key",
]

__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "codec"))
