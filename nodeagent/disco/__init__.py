"""Disco (path discovery): the sans-IO codec magicsock uses to find and verify direct paths.

``codec`` seals/opens disco packets and encodes/decodes Ping, Pong and CallMeMaybe. The names
re-exported here are loaded on first use, so importing the package loads neither the codec's
crypto nor (ever) asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

_LAZY = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.codec"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
