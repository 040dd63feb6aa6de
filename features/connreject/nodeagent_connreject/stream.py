"""The CLI side of the ``debug-rejects?watch=1`` stream: a blocking reader of its lines.

It opens one request with the core's :class:`~nodeagent.localapi.client.LocalAPIClient` and
yields each newline-delimited JSON object as it arrives. Every failure a user can cause is a
one-line :class:`~nodeagent.localapi.client.LocalAPIError`.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

from nodeagent.localapi.client import LocalAPIClient, LocalAPIError

# A watch stream sends a heartbeat every 10 s: this much silence means the agent is stuck.
READ_TIMEOUT = 35.0


def watch_lines(socket_path: str, query: str = "watch=1",
                timeout: float = READ_TIMEOUT) -> Iterator[dict[str, Any]]:
    """Yield the stream's JSON objects until the agent ends it (a ``closing`` line is yielded
    last when it stops)."""
    client = LocalAPIClient(socket_path, timeout)
    with client.stream("GET", f"/localapi/v0/debug-rejects?{query}") as resp:
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
