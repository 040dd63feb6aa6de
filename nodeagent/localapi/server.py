"""The LocalAPI HTTP server on a Unix socket, with per-request permissions from SO_PEERCRED.

Anyone who can connect may read; root, the agent's own user, or the configured OperatorUser may
write. The socket is 0666 inside a 0755 directory because permissions are enforced per request,
as Tailscale does. Errors are JSON objects ``{"error": "..."}``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pwd
import socket
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodeagent.ipnext.known import feature_for_localapi, not_installed_message
from nodeagent.localapi.routes import READ, WRITE

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend

log = logging.getLogger("nodeagent.localapi")

PREFIX = "/localapi/v0/"
DEFAULT_SOCKET = "/run/nodeagent/nodeagent.sock"
SOCKET_ENV = "NODEAGENT_SOCKET"
_CRED = struct.Struct("3i")


def default_socket_path() -> str:
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class SocketInUseError(Exception):
    pass


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process on the other end of the Unix socket, or None if unknown."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = _CRED.unpack(raw)
    return uid


class LocalAPIServer:
    def __init__(self, backend: LocalBackend, path: str) -> None:
        self.backend = backend
        self.path = path
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=1 << 20)
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)

    def can_write(self, uid: int | None) -> bool:
        if uid is None:
            return False
        if uid == 0 or uid == os.geteuid():
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
        route = self.backend.localapi_routes.get(name)
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
        except web.HTTPException:
            raise
        except Exception as e:
            log.exception("LocalAPI %s %s failed", request.method, name)
            return json_error(500, f"{name}: internal error: {type(e).__name__}: {e}")

    async def start(self) -> None:
        p = Path(self.path)
        d = p.parent
        if not d.exists():
            d.mkdir(parents=True, mode=0o755)
            os.chmod(d, 0o755)
        if p.exists() or p.is_symlink():
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise SocketInUseError(f"{p} exists and is not a socket; refusing to replace it")
            if _socket_alive(str(p)):
                raise SocketInUseError(f"another agent is already serving {p}")
            p.unlink()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.UnixSite(self._runner, str(p))
        await site.start()
        os.chmod(p, 0o666)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


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


def json_body(data: Any) -> bytes:
    return json.dumps(data).encode()
