"""A small synchronous LocalAPI client over the Unix socket, for the CLI and tools.

Every failure a user can cause (no agent, no socket, no permission, an error answer) becomes a
:class:`LocalAPIError` whose message is one line fit to print.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import socket
from collections.abc import Iterator
from typing import Any

from nodeagent.errors import UserError

HOST = "local-tailscaled.sock"


class LocalAPIError(UserError):
    def __init__(self, message: str, status: int = 0, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def _full_path(path: str) -> str:
    return path if path.startswith("/") else "/localapi/v0/" + path


def _send(conn: http.client.HTTPConnection, method: str, path: str,
          body: Any) -> http.client.HTTPResponse:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=headers)
    return conn.getresponse()


def _answer_error(path: str, status: int, data: bytes) -> LocalAPIError:
    """The one-line error for an error answer (its JSON ``error`` field, else its text)."""
    try:
        obj = json.loads(data) if data else None
    except ValueError:
        obj = None
    msg = obj.get("error") if isinstance(obj, dict) else data.decode(errors="replace").strip()
    return LocalAPIError(f"{path}: {status}: {msg}".strip(), status, obj)


class _UnixHTTPConnection(http.client.HTTPConnection):
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


class LocalAPIClient:
    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, str]:
        """Send one request; return (status, body bytes, content type)."""
        path = _full_path(path)
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            with self._user_errors():
                resp = _send(conn, method, path, body)
                return resp.status, resp.read(), resp.getheader("Content-Type", "")
        finally:
            conn.close()

    @contextlib.contextmanager
    def stream(self, method: str, path: str,
               body: Any = None) -> Iterator[http.client.HTTPResponse]:
        """Open a request whose answer is read as it arrives (a watch stream) and yield the
        response once it answered below 400; an error answer raises :class:`LocalAPIError`.
        Each read of the body waits at most ``timeout``; the caller maps its own read errors."""
        path = _full_path(path)
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            with self._user_errors():
                resp = _send(conn, method, path, body)
                if resp.status >= 400:
                    raise _answer_error(path, resp.status, resp.read())
            yield resp
        finally:
            conn.close()

    @contextlib.contextmanager
    def _user_errors(self) -> Iterator[None]:
        """Turn the failures of reaching the agent into one-line :class:`LocalAPIError`s."""
        try:
            yield
        except FileNotFoundError:
            raise LocalAPIError(
                f"no agent socket at {self.socket_path} (is `nodeagent up` running?)"
            ) from None
        except PermissionError:
            raise LocalAPIError(f"permission denied connecting to {self.socket_path}") from None
        except ConnectionRefusedError:
            raise LocalAPIError(
                f"agent not running: {self.socket_path} refused the connection"
            ) from None
        except TimeoutError:
            raise LocalAPIError(f"agent at {self.socket_path} did not answer in time") from None
        except OSError as e:
            if e.errno == errno.ENOTSOCK:
                raise LocalAPIError(f"{self.socket_path} is not a socket") from None
            raise LocalAPIError(f"cannot talk to agent at {self.socket_path}: {e}") from None
        except http.client.HTTPException as e:
            raise LocalAPIError(f"bad answer from agent at {self.socket_path}: {e}") from None

    def json(self, method: str, path: str, body: Any = None) -> Any:
        status, data, _ = self.request(method, path, body)
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            obj = None
        if status >= 400:
            raise _answer_error(path, status, data)
        if obj is None and data:
            raise LocalAPIError(f"{path}: answer is not JSON")
        return obj

    def get(self, path: str) -> Any:
        return self.json("GET", path)

    def patch(self, path: str, body: Any) -> Any:
        return self.json("PATCH", path, body)
