"""STUN (RFC 5389 subset used by Tailscale): sans-IO codec and an asyncio one-shot client.

``codec`` builds/parses binding requests and responses; ``client.stun_query`` asks a server for
this host's mapped address.
"""

from nodeagent.stun.client import DEFAULT_PORT, StunTimeout, stun_query
from nodeagent.stun.codec import (
    StunError,
    build_binding_request,
    build_binding_response,
    is_stun,
    new_txid,
    parse_binding_request,
    parse_binding_response,
)

__all__ = [
    "DEFAULT_PORT",
    "StunError",
    "StunTimeout",
    "build_binding_request",
    "build_binding_response",
    "is_stun",
    "new_txid",
    "parse_binding_request",
    "parse_binding_response",
    "stun_query",
]
