"""The CLI side of the ``debug-rejects?watch=1`` stream: a blocking reader of its lines.

It opens one HTTP request on the LocalAPI Unix socket and yields each newline-delimited JSON
object as it arrives. Every failure a user can cause is a one-line
:class:`~nodeagent.localapi.client.LocalAPIError`.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from nodeagent.localapi.client import HOST, LocalAPIError

# A watch stream sends a heartbeat every 10 s: this much silence means the agent is stuck.
READ_TIMEOUT = 35.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(HOST, timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def watch_lines(socket_path: str, query: str = "watch=1",
                timeout: float = READ_TIMEOUT) -> Iterator[dict[str, Any]]:
    """Yield the stream's JSON objects until the agent ends it (a ``closing`` line is yielded
    last when it stops)."""
    path = f"/localapi/v0/debug-rejects?{query}"
    conn = _UnixConnection(socket_path, timeout)
    try:
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
        except FileNotFoundError:
            raise LocalAPIError(f"no agent socket at {socket_path} (is `nodeagent up` "
                                "running?)") from None
        except PermissionError:
            raise LocalAPIError(f"permission denied connecting to {socket_path}") from None
        except ConnectionRefusedError:
            raise LocalAPIError(f"agent not running: {socket_path} refused the "
                                "connection") from None
        except (OSError, http.client.HTTPException) as e:
            raise LocalAPIError(f"cannot talk to agent at {socket_path}: {e}") from None
        if resp.status != 200:
            data = resp.read()
            try:
                msg = json.loads(data).get("error", "")
            except (ValueError, AttributeError):
                msg = data.decode(errors="replace").strip()
            raise LocalAPIError(f"{path}: {resp.status}: {msg}".strip(), resp.status)
        while True:
            try:
                raw = resp.readline()
            except TimeoutError:
                raise LocalAPIError(f"agent at {socket_path} sent nothing for {timeout:.0f}s "
                                    "on the watch stream") from None
            except (OSError, http.client.HTTPException) as e:
                raise LocalAPIError(f"watch stream from {socket_path} broke: {e}") from None
            if not raw:
                return
            try:
                obj = json.loads(raw)
            except ValueError:
                raise LocalAPIError(f"watch stream from {socket_path}: a line is not "
                                    "JSON") from None
            if isinstance(obj, dict):
                yield obj
    finally:
        conn.close()
