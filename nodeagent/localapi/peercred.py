"""Who is on the other end of a LocalAPI connection (SO_PEERCRED) and what that uid may do."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

_CRED = struct.Struct("3i")


def socket_uid(sock: socket.socket | None) -> int | None:
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except (OSError, AttributeError):
        return None
    return int(_CRED.unpack(raw)[1])


def is_privileged(uid: int | None) -> bool:
    """Root or the agent's own user: may write anything, including who the operator is."""
    return uid is not None and (uid == 0 or uid == os.geteuid())


def peer_uid(request: Any) -> int | None:
    """The uid of the process on the other end of the Unix socket, or None if unknown."""
    return socket_uid(request.transport.get_extra_info("socket") if request.transport else None)
