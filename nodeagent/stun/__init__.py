"""STUN (RFC 5389 subset used by Tailscale): sans-IO codec and an asyncio one-shot client.

``codec`` builds/parses binding requests and responses; ``client.stun_query`` asks a server for
this host's mapped address. The names re-exported here are loaded on first use, so importing the
package or ``codec`` never imports asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodeagent.lazy import lazy_exports

if TYPE_CHECKING:
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

_LAZY = {
    "DEFAULT_PORT": "client",
    "StunError": "codec",
    "StunTimeout": "client",
    "build_binding_request": "codec",
    "build_binding_response": "codec",
    "is_stun": "codec",
    "new_txid": "codec",
    "parse_binding_request": "codec",
    "parse_binding_response": "codec",
    "stun_query": "client",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
