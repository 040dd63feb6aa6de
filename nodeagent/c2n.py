"""The control-to-node (c2n) router: method + path in, status + headers + body out.

Control asks a node an HTTP-like question through its map stream; the node dispatches it here.
Features register routes through the ``nodeagent_c2n_routes`` hook. The transport lives in the
control client; this module only routes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from nodeagent.ipnext.known import feature_for_c2n, not_installed_message

log = logging.getLogger("nodeagent.c2n")


@dataclass
class C2NRequest:
    method: str
    path: str  # may carry a query string
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def route_path(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)


@dataclass
class C2NResponse:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> C2NResponse:
        return cls(status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    @classmethod
    def error(cls, status: int, message: str) -> C2NResponse:
        return cls.json({"error": message}, status)


C2NHandler = Callable[[C2NRequest], Awaitable[C2NResponse]]


class C2NRouter:
    def __init__(self) -> None:
        self._routes: dict[str, dict[str, C2NHandler]] = {}

    def add(self, method: str, path: str, handler: C2NHandler) -> None:
        methods = self._routes.setdefault(path, {})
        if method.upper() in methods:
            raise ValueError(f"c2n route {method} {path} is already registered")
        methods[method.upper()] = handler

    def routes(self) -> list[tuple[str, str]]:
        return sorted((m, p) for p, ms in self._routes.items() for m in ms)

    async def dispatch(self, req: C2NRequest) -> C2NResponse:
        path = req.route_path
        methods = self._routes.get(path)
        if methods is None:
            known = feature_for_c2n(path)
            if known is not None:
                return C2NResponse.json(
                    {"error": not_installed_message(known.name), "feature": known.name,
                     "install": known.install}, 404)
            return C2NResponse.error(404, f"no c2n handler for {path}")
        handler = methods.get(req.method.upper())
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return C2NResponse(405, {"Content-Type": "application/json", "Allow": allowed},
                               json.dumps({"error": f"{allowed} required"}).encode())
        try:
            return await handler(req)
        except Exception as e:  # one broken handler must not break the control stream
            log.exception("c2n %s %s failed", req.method, path)
            return C2NResponse.error(500, f"c2n handler failed: {type(e).__name__}: {e}")
