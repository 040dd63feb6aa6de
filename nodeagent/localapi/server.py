"""The LocalAPI HTTP server on a Unix socket, with per-request permissions from SO_PEERCRED.

Anyone who can connect may read; root, the agent's own user, or the configured OperatorUser may
write (handlers may keep some changes to root and the agent's user: :func:`is_privileged`). The
socket is 0666 inside a 0755 directory because permissions are enforced per request, as Tailscale
does. Errors are JSON objects ``{"error": "..."}``, including aiohttp's own HTTP errors raised
inside a handler (413 for a body over ``client_max_size``, ...).

Resource limits: at most ``MAX_CONNS_PER_UID`` simultaneous connections per non-root peer uid (one
user holding idle sockets cannot lock root out), a connection that has not sent a whole request
within :func:`nodeagent.netguard.request_timeout` is closed, and the open-file limit is raised at
start.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from nodeagent.errors import UserError
from nodeagent.ipnext.known import feature_for_localapi, not_installed_message
from nodeagent.localapi.handlers import register_core_routes
from nodeagent.localapi.peercred import is_privileged, peer_uid, socket_uid
from nodeagent.localapi.routes import CLOSING, READ, WRITE, LocalAPIRoutes, json_error
from nodeagent.netguard import (
    ConnLimiter,
    raise_nofile_limit,
    request_timeout,
    throttle_accept_errors,
)

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend

log = logging.getLogger("nodeagent.localapi")

PREFIX = "/localapi/v0/"
DEFAULT_SOCKET = "/run/nodeagent/nodeagent.sock"
SOCKET_ENV = "NODEAGENT_SOCKET"
# Simultaneous LocalAPI connections per non-root peer uid (a CLI needs one; a GUI a few).
MAX_CONNS_PER_UID = 64


def default_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class SocketInUseError(UserError):
    pass


def _limited_uid(transport: asyncio.BaseTransport) -> int | None:
    """The key of the per-uid connection limit: the peer's uid, None (unlimited) for root."""
    uid = socket_uid(transport.get_extra_info("socket"))
    return None if uid == 0 else (-1 if uid is None else uid)


def http_error_json(name: str, e: web.HTTPException) -> web.StreamResponse:
    """aiohttp's HTTP error (e.g. 413 from ``request.read()``) as a LocalAPI JSON error."""
    if e.status < 400:
        raise e  # a redirect or success raised by a handler is passed on as it is
    what = (e.reason or "error").lower()
    text = " ".join((e.text or "").split())  # one line
    if text and text != f"{e.status}: {e.reason}":  # aiohttp's default text adds nothing
        what = f"{what}: {text}"
    resp = json_error(e.status, f"{name}: {what}")
    for h in ("Allow", "Retry-After"):
        if h in e.headers:
            resp.headers[h] = e.headers[h]
    return resp


class LocalAPIServer:
    def __init__(self, backend: LocalBackend, path: str) -> None:
        self.backend = backend
        self.path = path
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        # One user (say nobody, holding idle sockets) must not starve root or anyone else.
        self.conn_limiter = ConnLimiter(MAX_CONNS_PER_UID, log, "uid",
                                        key_of=_limited_uid)
        self.app = web.Application(client_max_size=1 << 20)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # The server owns its route table: the core's endpoints now, the features' at start.
        self.routes = LocalAPIRoutes()
        self.app[CLOSING] = self.routes.closing  # for streams: routes.server_closing(request)
        register_core_routes(backend, self.routes)
        self._feature_routes_loaded = False

    def load_feature_routes(self) -> None:
        """Ask the extensions for their endpoints (once, after ``backend.start()``)."""
        if not self._feature_routes_loaded:
            self._feature_routes_loaded = True
            self.backend.collect_localapi_routes(self.routes.add)

    def can_write(self, uid: int | None) -> bool:
        if uid is None:
            return False
        if is_privileged(uid):
            return True
        op = self.backend.prefs.OperatorUser
        if op:
            try:
                return pwd.getpwnam(op).pw_uid == uid
            except KeyError:
                return False
        return False

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if not path.startswith(PREFIX):
            return json_error(404, f"not found: {path} (LocalAPI paths start with {PREFIX})")
        name = path[len(PREFIX):].strip("/")
        route = self.routes.get(name)
        if route is None:
            known = feature_for_localapi(name)
            if known is not None:
                return json_error(404, not_installed_message(known.name),
                                  feature=known.name, install=known.install)
            return json_error(404, f"unknown LocalAPI endpoint {name!r}")
        perm = route.methods.get(request.method)
        if perm is None:
            allowed = ", ".join(sorted(route.methods))
            resp = json_error(405, f"{allowed} required")
            resp.headers["Allow"] = allowed
            return resp
        uid = peer_uid(request)
        if perm == WRITE and not self.can_write(uid):
            return json_error(403, f"{name} access denied: write permission required")
        if perm == READ and uid is None:
            return json_error(403, f"{name} access denied: unknown peer")
        try:
            return await route.handler(request)
        except web.HTTPException as e:
            return http_error_json(name, e)
        except Exception as e:
            log.exception("LocalAPI %s %s failed", request.method, name)
            return json_error(500, f"{name}: internal error: {type(e).__name__}: {e}")

    async def start(self) -> None:
        self.load_feature_routes()
        p = Path(self.path)
        d = p.parent
        if not d.exists():
            try:
                d.mkdir(parents=True, mode=0o755)
                os.chmod(d, 0o755)
            except OSError as e:
                raise SocketInUseError(_socket_error(p, f"cannot create {d}", e)) from None
        if p.exists() or p.is_symlink():
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise SocketInUseError(f"{p} exists and is not a socket; refusing to replace it")
            if _socket_alive(str(p)):
                raise SocketInUseError(f"another agent is already serving {p}")
            p.unlink()
        raise_nofile_limit()
        loop = asyncio.get_running_loop()
        throttle_accept_errors(loop, log)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=request_timeout())
        await self._runner.setup()
        assert self._runner.server is not None
        try:
            self._server = await loop.create_unix_server(
                self.conn_limiter.wrap(self._runner.server), str(p), backlog=1024)
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise SocketInUseError(_socket_error(p, "cannot listen", e)) from None
        os.chmod(p, 0o666)

    async def stop(self) -> None:
        self.routes.closing.set()  # streams (watch-ipn-bus) end instead of holding up cleanup
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _socket_error(p: Path, what: str, e: OSError) -> str:
    """One line for a LocalAPI socket that cannot be created."""
    msg = f"LocalAPI socket {p}: {what}: {e.strerror or e}"
    if isinstance(e, PermissionError):
        msg += (f" (run as root, or choose a socket you can create with --socket or "
                f"{SOCKET_ENV})")
    return msg


def _socket_alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        s.close()


