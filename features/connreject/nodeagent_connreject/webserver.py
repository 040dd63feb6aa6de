"""The ``nodeagent web`` HTTP server: a local page of this node's rejected connections, live.

It owns the aiohttp application serving the page (``webui/`` package data: plain HTML, CSS and
JS, no build step) and its two API routes, both proxies to the agent's LocalAPI, so the
LocalAPI's permissions apply to whoever started this server:

- ``GET /api/events``: server-sent events fed from ``debug-rejects?watch=1&explain=1``:
  ``snapshot`` (the stream's line, plus ``Names``: tailnet address → host name from ``status``),
  ``heartbeat``, ``agent-closing``, ``agent-error`` (``{"error": "one line"}``) and
  ``server-closing`` (this server stops); the browser reconnects by itself after an error.
- ``POST /api/clear``: ``DELETE debug-rejects`` (LocalAPI write permission). Refused unless the
  request carries the page's token header and, when the browser says, comes from the same origin.

On loopback every request must name a loopback ``Host`` (a DNS-rebinding guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import secrets
import signal
import sys
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from nodeagent.localapi.client import HOST
from nodeagent_connreject.cli import host_names
from nodeagent_connreject.webcmd import WebError

LOCALAPI = f"http://{HOST}/localapi/v0/"
TOKEN_HEADER = "X-Nodeagent-Token"
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}
STREAM_READ_TIMEOUT = 35.0  # the LocalAPI stream sends a heartbeat every 10 s
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _asset(name: str) -> str:
    return resources.files("nodeagent_connreject").joinpath("webui", name).read_text("utf-8")


def _loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _error_text(r: aiohttp.ClientResponse) -> str:
    text = await r.text()
    try:
        msg = json.loads(text).get("error", "")
    except (ValueError, AttributeError):
        msg = text.strip()
    return " ".join(str(msg or r.reason or "error").split())


class WebUI:
    def __init__(self, socket_path: str, *, loopback_only: bool = True,
                 token: str | None = None) -> None:
        self.socket_path = socket_path
        self.loopback_only = loopback_only
        self.token = token or secrets.token_urlsafe(24)
        self._lapi: aiohttp.ClientSession | None = None
        self._streams: set[aiohttp.ClientResponse] = set()
        self._stopping = False

    # --- the application -------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/clear", self._clear)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _start(self, app: web.Application) -> None:
        self._lapi = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self.socket_path))

    async def _shutdown(self, app: web.Application) -> None:
        self._stopping = True
        for r in list(self._streams):  # open event streams end now instead of at a heartbeat
            r.close()

    async def _cleanup(self, app: web.Application) -> None:
        if self._lapi is not None:
            await self._lapi.close()

    @property
    def lapi(self) -> aiohttp.ClientSession:
        assert self._lapi is not None, "WebUI app not started"
        return self._lapi

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.loopback_only and not _loopback_host(request.host):
            return web.Response(status=403, text="forbidden: this page answers only to a "
                                                 "loopback Host (DNS-rebinding guard)\n")
        resp = await handler(request)
        if not resp.prepared:
            for k, v in SECURITY_HEADERS.items():
                resp.headers.setdefault(k, v)
        return resp

    # --- page ------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.StreamResponse:
        html = _asset("index.html").replace("{{TOKEN}}", self.token)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(text=_asset(name), content_type=STATIC[name], charset="utf-8")

    # --- API -------------------------------------------------------------------------------
    async def _names(self) -> dict[str, str]:
        try:
            async with self.lapi.get(LOCALAPI + "status") as r:
                if r.status == 200:
                    return host_names(await r.json(content_type=None))
        except (aiohttp.ClientError, OSError, ValueError):
            pass
        return {}

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           **SECURITY_HEADERS})
        await resp.prepare(request)
        try:
            await resp.write(b"retry: 1000\n\n")
            await self._relay(resp)
        except ConnectionError:
            pass  # the browser went
        return resp

    async def _relay(self, resp: web.StreamResponse) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=STREAM_READ_TIMEOUT)
        try:
            async with self.lapi.get(LOCALAPI + "debug-rejects",
                                     params={"watch": "1", "explain": "1"},
                                     timeout=timeout) as r:
                if r.status != 200:
                    await resp.write(_sse("agent-error", {"error": await _error_text(r),
                                                          "status": r.status}))
                    return
                self._streams.add(r)
                try:
                    async for raw in r.content:
                        await self._forward(resp, raw)
                finally:
                    self._streams.discard(r)
            await resp.write(_sse("server-closing", {}) if self._stopping else
                             _sse("agent-error", {"error": "the agent ended the stream"}))
        except (aiohttp.ClientConnectionError, TimeoutError, OSError) as e:
            # (a write to a browser that went lands here too; the write below then fails too)
            if self._stopping:  # we closed the agent's stream ourselves
                with contextlib.suppress(ConnectionError):
                    await resp.write(_sse("server-closing", {}))
                return
            what = (f"cannot reach the agent at {self.socket_path}: "
                    f"{getattr(e, 'strerror', None) or e or type(e).__name__}")
            with contextlib.suppress(ConnectionError):
                await resp.write(_sse("agent-error", {"error": " ".join(what.split())}))

    async def _forward(self, resp: web.StreamResponse, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        kind = msg.get("Type")
        if kind == "snapshot":
            msg["Names"] = await self._names()
            await resp.write(_sse("snapshot", msg))
        elif kind == "heartbeat":
            await resp.write(_sse("heartbeat", msg))
        elif kind == "closing":
            await resp.write(_sse("agent-closing", msg))

    def _same_origin(self, request: web.Request) -> str | None:
        """Why a state-changing request is refused, or None."""
        token = request.headers.get(TOKEN_HEADER, "")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            return "missing or wrong page token (reload the page)"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            return f"cross-origin request from {origin}"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request ({site})"
        return None

    async def _clear(self, request: web.Request) -> web.StreamResponse:
        why = self._same_origin(request)
        if why is not None:
            return web.json_response({"error": f"clear refused: {why}"}, status=403)
        try:
            async with self.lapi.delete(LOCALAPI + "debug-rejects") as r:
                if r.status in (200, 204):
                    return web.json_response({"ok": True})
                return web.json_response({"error": await _error_text(r)}, status=r.status)
        except (aiohttp.ClientError, OSError) as e:
            return web.json_response({"error": f"cannot reach the agent at "
                                               f"{self.socket_path}: {e}"}, status=502)


async def check_agent(socket_path: str) -> None:
    """Fail with one line when the agent is absent or does not serve ``debug-rejects``."""
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path)) as s, \
                s.get(LOCALAPI + "debug-rejects") as r:
            if r.status != 200:
                raise WebError(f"agent at {socket_path}: debug-rejects: {r.status}: "
                               f"{await _error_text(r)}")
    except (aiohttp.ClientConnectionError, OSError) as e:
        raise WebError(f"no agent answering at {socket_path} (is `nodeagent up` running?): "
                       f"{getattr(e, 'strerror', None) or e}") from None


async def serve(socket_path: str, addr: str, port: int, *, loopback_only: bool = True) -> int:
    """Run until SIGINT/SIGTERM; print the URL once listening."""
    await check_agent(socket_path)
    ui = WebUI(socket_path, loopback_only=loopback_only)
    runner = web.AppRunner(ui.app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, addr, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise WebError(f"cannot listen on {addr}:{port}: {e.strerror or e}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    host = f"[{addr}]" if ":" in addr else addr
    print(f"nodeagent web: serving http://{host}:{bound}/ for the agent at {socket_path}",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    print("nodeagent web: stopped", file=sys.stderr)
    return 0
