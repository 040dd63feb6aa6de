"""DERP: the sans-IO frame codec (:mod:`.frames`) and the asyncio client (:mod:`.client`).

The relay server lives in the ``derper`` feature; the core only needs to speak DERP as a client.
"""

from nodeagent.derp.client import DerpClient, DerpError
from nodeagent.derp.frames import FrameError, FrameReader, FrameType, PeerGoneReason

__all__ = ["DerpClient", "DerpError", "FrameError", "FrameReader", "FrameType", "PeerGoneReason"]
