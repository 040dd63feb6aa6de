"""The core's own LocalAPI endpoints: status, prefs, metrics."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from aiohttp import web

from nodeagent.ipn.prefs import PrefsError
from nodeagent.ipn.state import StateError
from nodeagent.ipn.status import build_status
from nodeagent.localapi.metrics import render_metrics
from nodeagent.localapi.routes import READ, WRITE, LocalAPIRoutes
from nodeagent.localapi.server import json_error

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend


def register_core_routes(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    async def status(request: web.Request) -> web.StreamResponse:
        peers = request.query.get("peers", "true") != "false"
        return web.json_response(build_status(backend, peers=peers))

    async def prefs(request: web.Request) -> web.StreamResponse:
        if request.method == "PATCH":
            try:
                body = await request.json(loads=json.loads)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                return json_error(400, f"prefs: body is not JSON: {e}")
            try:
                backend.edit_prefs(body)
            except PrefsError as e:
                return json_error(400, f"prefs: {e}")
            except StateError as e:
                return json_error(500, str(e))
        return web.json_response(backend.prefs.to_json(_config(backend)))

    async def metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(text=render_metrics(backend),
                            content_type="text/plain", charset="utf-8")

    routes.add("status", status, {"GET": READ})
    routes.add("prefs", prefs, {"GET": READ, "PATCH": WRITE})
    routes.add("metrics", metrics, {"GET": READ})


def _config(backend: LocalBackend) -> dict | None:
    login = backend.state.login
    if not login:
        return None
    return {
        "UserProfile": login.get("UserProfile", {}),
        "NodeID": login.get("NodeID", ""),
    }
