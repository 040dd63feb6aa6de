"""DERP: the sans-IO frame codec (:mod:`.frames`), the sans-IO client connection state machine
(:mod:`.conn`) and the asyncio client adapter over it (:mod:`.client`).

The relay server lives in the ``derper`` feature; the core only needs to speak DERP as a client.
The names re-exported here are loaded on first use, so importing the package, ``.frames`` or
``.conn`` never imports asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nodeagent.lazy import lazy_exports

if TYPE_CHECKING:
    from nodeagent.derp.client import DerpClient
    from nodeagent.derp.conn import ClientConnection, DerpError
    from nodeagent.derp.frames import (
        FrameError,
        FrameReader,
        FrameType,
        PeerGoneReason,
        ProtocolError,
    )

_LAZY = {
    "ClientConnection": "conn",
    "DerpClient": "client",
    "DerpError": "conn",
    "FrameError": "frames",
    "FrameReader": "frames",
    "FrameType": "frames",
    "PeerGoneReason": "frames",
    "ProtocolError": "frames",
}

__all__ = ["ClientConnection", "DerpClient", "DerpError", "FrameError", "FrameReader",
           "FrameType", "PeerGoneReason", "ProtocolError"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
