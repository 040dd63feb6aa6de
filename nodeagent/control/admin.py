"""Blocking client of the coordination server's admin API (see ``admin_routes``), for the CLI.

Owns finding a server (``--state-dir`` holds ``control-url`` and ``admin-token``; or an explicit
URL and token) and turning every failure into :class:`AdminClientError` with a one-line message.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


class AdminClientError(Exception):
    """An admin request failed; the message is one line."""


class AdminClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_state_dir(cls, state_dir: str | Path) -> AdminClient:
        d = Path(state_dir)
        try:
            url = (d / "control-url").read_text().strip()
            token = (d / "admin-token").read_text().strip()
        except OSError as e:
            raise AdminClientError(f"cannot find a control server in {d}: {e.strerror} "
                                   f"({e.filename}); is `nodeagent control serve` running "
                                   "there?") from None
        return cls(url, token)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                data = r.read()
                ctype = r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise AdminClientError(_error_text(e)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminClientError(f"cannot reach control server {self.url}: {reason}") from None
        if ctype.startswith("application/json"):
            return json.loads(data)
        return data.decode(errors="replace")

    def nodes(self) -> list[dict[str, Any]]:
        return self.request("GET", "/admin/nodes")

    def delete(self, node: str) -> dict[str, Any]:
        return self.request("DELETE", "/admin/nodes/" + urllib.parse.quote(node, safe=""))

    def expire(self, node: str) -> dict[str, Any]:
        return self.request("POST", "/admin/nodes/" + urllib.parse.quote(node, safe="")
                            + "/expire")

    def create_authkey(self, *, user: str = "admin", reusable: bool = False,
                       ephemeral: bool = False, tags: list[str] | None = None,
                       expiry: float | None = None) -> dict[str, Any]:
        b: dict[str, Any] = {"user": user, "reusable": reusable, "ephemeral": ephemeral,
                             "tags": list(tags or [])}
        if expiry is not None:
            b["expiry"] = expiry
        return self.request("POST", "/admin/authkeys", json.dumps(b).encode())

    def authkeys(self) -> list[dict[str, Any]]:
        return self.request("GET", "/admin/authkeys")

    def get_policy(self) -> str:
        return self.request("GET", "/admin/policy")

    def set_policy(self, text: str) -> list[str]:
        """Install a policy; returns its warnings (``line:column: what``)."""
        out = self.request("PUT", "/admin/policy", text.encode(), content_type="text/plain")
        return [str(w) for w in out.get("warnings", [])] if isinstance(out, dict) else []

    def explain(self, src: str, dst: str, port: int, proto: int) -> dict[str, Any]:
        """Why the policy allows or denies SRC → DST:PORT/PROTO (``nodeagent.control.explain``
        JSON plus ``Text``, the explanation for a person)."""
        q = urllib.parse.urlencode({"src": src, "dst": dst, "port": port, "proto": proto})
        return self.request("GET", "/admin/explain?" + q)

    def c2n(self, node: str, method: str, path: str, body: bytes = b"",
            timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        b: dict[str, Any] = {"node": node, "method": method, "path": path,
                             "body_b64": base64.b64encode(body).decode()}
        if timeout is not None:
            b["timeout"] = timeout
        out = self.request("POST", "/admin/c2n", json.dumps(b).encode(),
                           timeout=(timeout or 10.0) + 10.0)
        return int(out["status"]), dict(out["headers"]), base64.b64decode(out["body_b64"])


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        msg = json.loads(e.read()).get("error")
    except (ValueError, AttributeError, OSError):
        msg = None
    return str(msg) if msg else f"control server answered HTTP {e.code} {e.reason}"
