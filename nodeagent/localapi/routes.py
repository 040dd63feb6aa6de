"""The LocalAPI route table (endpoint names under /localapi/v0/ with per-method permissions) and
the JSON error shape every endpoint answers with."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from nodeagent.ipnext.api import READ, WRITE

__all__ = ["CLOSING", "READ", "WRITE", "Handler", "LocalAPIRoutes", "Route", "json_error",
           "server_closing"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The LocalAPI application holds its routes' ``closing`` event under this key.
CLOSING = web.AppKey("nodeagent.localapi.closing", asyncio.Event)


@dataclass(frozen=True)
class Route:
    name: str
    handler: Handler
    methods: dict[str, str]  # method → READ | WRITE


class LocalAPIRoutes:
    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        # Set when the server stops: long-lived handlers (streams) end when they see it.
        self.closing = asyncio.Event()

    def add(self, name: str, handler: Handler, methods: Mapping[str, str] | None = None) -> None:
        """Register ``/localapi/v0/<name>``; ``methods`` maps HTTP methods to READ or WRITE."""
        name = name.strip("/")
        if name in self._routes:
            raise ValueError(f"LocalAPI endpoint {name!r} is already registered")
        methods = {m.upper(): p for m, p in (methods or {"GET": READ}).items()}
        for p in methods.values():
            if p not in (READ, WRITE):
                raise ValueError(f"LocalAPI endpoint {name!r}: permission must be read or write")
        self._routes[name] = Route(name, handler, methods)

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def names(self) -> list[str]:
        return sorted(self._routes)


def server_closing(request: web.Request) -> asyncio.Event:
    """The event set when the LocalAPI server answering ``request`` stops: a long-lived handler
    (a stream, a feature's too) ends when it is set. A fresh, never-set event elsewhere."""
    ev = request.config_dict.get(CLOSING)
    return ev if ev is not None else asyncio.Event()


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """The LocalAPI's error shape: ``{"error": "one line", ...}``."""
    return web.json_response({"error": message, **extra}, status=status)
