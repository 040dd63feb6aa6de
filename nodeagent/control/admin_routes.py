"""The coordination server's admin HTTP API (JSON, ``Authorization: Bearer <admin token>``).

Owns request parsing and error rendering for administrators; the operations themselves are
methods of ``ControlServer``. Endpoints::

    GET    /admin/nodes                 → [node, ...]
    DELETE /admin/nodes/{node}          → node
    POST   /admin/nodes/{node}/expire   → node
    GET    /admin/authkeys              → [key, ...]   (secrets are never shown again)
    POST   /admin/authkeys  {"user", "reusable", "ephemeral", "tags", "expiry"} → {"key", ...}
    GET    /admin/policy                → policy text
    PUT    /admin/policy    (text)      → {"ok": true, "warnings": ["line:col: ..."]}
                                          | 400 {"error": "line:col: ..."}
    POST   /admin/c2n  {"node", "method", "path", "body_b64", "timeout"}
                                        → {"status", "headers", "body_b64"}
    GET    /admin/explain?src=S&dst=D&port=N&proto=P
                                        → explanation (``nodeagent.control.explain``), + "Text"

Errors are ``{"error": "<one line>"}`` with a fitting status.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodeagent.control.adminops import AdminError
from nodeagent.control.policy import PolicyError

if TYPE_CHECKING:
    from nodeagent.control.server import ControlServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def add_routes(app: web.Application, srv: ControlServer) -> None:

    def guarded(fn: Callable[[web.Request], Awaitable[Any]]) -> Handler:
        async def handler(req: web.Request) -> web.StreamResponse:
            auth = req.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            if not token or not hmac.compare_digest(token.encode(), srv.admin_token.encode()):
                return _error(401, "admin token missing or wrong")
            try:
                out = await fn(req)
            except AdminError as e:
                return _error(e.status, str(e))
            except PolicyError as e:
                return _error(400, str(e))
            if isinstance(out, web.StreamResponse):
                return out
            return web.json_response(out)
        return handler

    async def body_json(req: web.Request) -> dict[str, Any]:
        try:
            v = json.loads(await req.read() or b"{}")
        except ValueError:
            raise AdminError(400, "request body is not JSON") from None
        if not isinstance(v, dict):
            raise AdminError(400, "request body must be a JSON object")
        return v

    async def nodes(req: web.Request) -> Any:
        return [srv.node_json(n) for n in srv.store.list_nodes()]

    async def delete(req: web.Request) -> Any:
        return srv.node_json(await srv.delete_node(req.match_info["node"]))

    async def expire(req: web.Request) -> Any:
        return srv.node_json(srv.expire_node(req.match_info["node"]))

    async def list_keys(req: web.Request) -> Any:
        return [{"ID": k.id, "Prefix": k.prefix, "User": k.user, "Reusable": k.reusable,
                 "Ephemeral": k.ephemeral, "Tags": k.tags, "Created": k.created,
                 "Expires": k.expires, "Used": k.used, "Revoked": k.revoked}
                for k in srv.store.list_authkeys()]

    async def create_key(req: web.Request) -> Any:
        b = await body_json(req)
        tags = b.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise AdminError(400, "tags must be a list of strings")
        expiry = b.get("expiry", 90 * 86400.0)
        if not isinstance(expiry, int | float) or expiry < 0:
            raise AdminError(400, "expiry must be a non-negative number of seconds")
        secret, rec = srv.create_authkey(user=str(b.get("user") or "admin"),
                                         reusable=bool(b.get("reusable")),
                                         ephemeral=bool(b.get("ephemeral")), tags=tags,
                                         expiry=float(expiry))
        return {"key": secret, "ID": rec.id, "User": rec.user, "Reusable": rec.reusable,
                "Ephemeral": rec.ephemeral, "Tags": rec.tags, "Expires": rec.expires}

    async def get_policy(req: web.Request) -> Any:
        return web.Response(text=srv.policy.text, content_type="text/plain")

    async def put_policy(req: web.Request) -> Any:
        raw = await req.read()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise AdminError(400, "policy is not UTF-8 text") from None
        return {"ok": True, "warnings": srv.set_policy(text)}

    async def c2n(req: web.Request) -> Any:
        b = await body_json(req)
        node, method, path = b.get("node"), b.get("method", "GET"), b.get("path")
        if not isinstance(node, str) or not isinstance(path, str) or not isinstance(method, str):
            raise AdminError(400, "c2n needs string fields node, method and path")
        try:
            body = base64.b64decode(b.get("body_b64") or "", validate=True)
        except ValueError:
            raise AdminError(400, "body_b64 is not base64") from None
        timeout = b.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise AdminError(400, "timeout must be a positive number of seconds")
        status, headers, out = await srv.c2n(node, method, path, body, timeout=timeout)
        return {"status": status, "headers": headers,
                "body_b64": base64.b64encode(out).decode()}

    async def explain(req: web.Request) -> Any:
        from nodeagent.control import explain as ex

        q = req.query
        port = q.get("port", "0")
        if not (port.isdecimal() and port.isascii()):
            raise AdminError(400, f"port {port!r} is not a number")
        try:
            e = ex.explain(srv.policy, srv.policy_nodes(), q.get("src", ""), q.get("dst", ""),
                           int(port), ex.parse_proto(q.get("proto", "tcp")),
                           file=srv.policy_source())
        except ex.ExplainError as err:
            raise AdminError(400, str(err)) from None
        return {**e.to_json(), "Text": e.text()}

    app.router.add_get("/admin/nodes", guarded(nodes))
    app.router.add_delete("/admin/nodes/{node}", guarded(delete))
    app.router.add_post("/admin/nodes/{node}/expire", guarded(expire))
    app.router.add_get("/admin/authkeys", guarded(list_keys))
    app.router.add_post("/admin/authkeys", guarded(create_key))
    app.router.add_get("/admin/policy", guarded(get_policy))
    app.router.add_put("/admin/policy", guarded(put_policy))
    app.router.add_post("/admin/c2n", guarded(c2n))
    app.router.add_get("/admin/explain", guarded(explain))
