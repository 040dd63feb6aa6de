"""The LocalAPI route table: endpoint names under /localapi/v0/ with per-method permissions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

READ = "read"
WRITE = "write"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    name: str
    handler: Handler
    methods: dict[str, str]  # method → READ | WRITE


class LocalAPIRoutes:
    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def add(self, name: str, handler: Handler, methods: dict[str, str] | None = None) -> None:
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
