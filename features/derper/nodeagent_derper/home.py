"""The derper's small HTTP endpoints besides DERP itself and ``/debug/``.

Owns ``/`` (``--home``: default page, ``blank`` or a redirect URL), ``/robots.txt``,
``/generate_204`` with Tailscale's captive-portal challenge/response headers, ``/derp/probe`` and
``/derp/latency-check``, ``/bootstrap-dns`` (names from ``--bootstrap-dns-names``, re-resolved every
10 minutes), and the plain ``--http-port`` listener's behaviour in TLS mode (ACME HTTP-01 tokens,
``/generate_204``, debug pages, otherwise a redirect to HTTPS).
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import random
import re
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from nodeagent_derper.debug import debug_allowed

log = logging.getLogger("derper.http")

NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE_RE = re.compile(r"[A-Za-z0-9._:\-]{0,64}")
BOOTSTRAP_REFRESH = 600.0
BROWSER_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'self'; block-all-mixed-content; "
                               "object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def challenge_response(challenge: str | None) -> str | None:
    """The ``X-Tailscale-Response`` value for a request's ``X-Tailscale-Challenge``, or None
    when the challenge is absent, too long or has characters outside ``[A-Za-z0-9._:-]``."""
    if challenge is None or not _CHALLENGE_RE.fullmatch(challenge):
        return None
    return "response " + challenge


async def generate_204(request: web.Request) -> web.StreamResponse:
    headers = {"Cache-Control": NO_CACHE}
    resp = challenge_response(request.headers.get("X-Tailscale-Challenge"))
    if resp is not None:
        headers["X-Tailscale-Response"] = resp
    return web.Response(status=204, headers=headers)


async def probe(request: web.Request) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD"):
        return web.Response(status=405, text="bogus probe method\n")
    return web.Response(status=200, headers={"Access-Control-Allow-Origin": "*"})


async def robots(request: web.Request) -> web.StreamResponse:
    return web.Response(text="User-agent: *\nDisallow: /\n", headers=BROWSER_HEADERS)


class HomePage:
    """``/`` according to ``--home``."""

    def __init__(self, home: str, hostname: str | Callable[[], str],
                 derp_enabled: bool) -> None:
        self.home = home
        self._hostname = hostname  # or a function: the listen port is known only once bound
        self.derp_enabled = derp_enabled

    @property
    def hostname(self) -> str:
        return self._hostname if isinstance(self._hostname, str) else self._hostname()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.home == "blank":
            return web.Response(text="", content_type="text/html", headers=BROWSER_HEADERS)
        if self.home.startswith(("http://", "https://")):
            raise web.HTTPFound(self.home, headers=BROWSER_HEADERS)
        parts = ["<!doctype html><html><head><title>DERP</title></head><body>",
                 "<h1>DERP</h1><p>This is a DERP relay server (Designated Encrypted Relay for "
                 "Packets), compatible with Tailscale's, run by nodeagent's derper. It relays "
                 "end-to-end encrypted WireGuard packets between nodes that cannot reach each "
                 "other directly; it cannot read them.</p>",
                 f"<p>Host name: {html.escape(self.hostname)}</p>",
                 '<p>Documentation: <a href="https://tailscale.com/kb/1232/derp-servers">'
                 "DERP servers</a>, <a href=\"https://tailscale.com/kb/1118/custom-derp-servers"
                 '">running your own</a>.</p>']
        if not self.derp_enabled:
            parts.append("<p>Status: the DERP relay is disabled on this server.</p>")
        if debug_allowed(request):
            parts.append('<p><a href="/debug/">Debug info</a></p>')
        parts.append("</body></html>")
        return web.Response(text="".join(parts), content_type="text/html",
                            headers=BROWSER_HEADERS)


class BootstrapDNS:
    """``/bootstrap-dns``: the configured names' current addresses as tab-indented JSON."""

    def __init__(self, names: list[str], on_request: Callable[[], None] | None = None) -> None:
        self.names = names
        self.table: dict[str, list[str]] = {}
        self._on_request = on_request

    async def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        table: dict[str, list[str]] = {}
        for name in self.names:
            try:
                infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except OSError as e:
                log.warning("bootstrap-dns: cannot resolve %s: %s", name, e)
                if name in self.table:
                    table[name] = self.table[name]  # keep the last good answer
                continue
            ips = list(dict.fromkeys(i[4][0] for i in infos))
            table[name] = ips
        self.table = table

    async def run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(BOOTSTRAP_REFRESH)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._on_request is not None:
            self._on_request()
        headers = {**BROWSER_HEADERS, "Connection": "close"}
        if not self.names:
            return web.Response(body=b"", content_type="application/json", headers=headers)
        # Shuffle per answer so clients spread over a name's addresses.
        out: dict[str, Any] = {k: random.sample(v, len(v)) for k, v in self.table.items()}
        return web.Response(text=json.dumps(out, indent="\t") + "\n",
                            content_type="application/json", headers=headers)


class PlainPortHandler:
    """The ``--http-port`` listener in TLS mode: ACME tokens, 204, debug, else to HTTPS."""

    def __init__(self, acme_tokens: dict[str, str] | None, https_port: int,
                 hostname: str) -> None:
        self.acme_tokens = acme_tokens
        self.https_port = https_port
        self.hostname = hostname

    async def acme_challenge(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        val = self.acme_tokens.get(token) if self.acme_tokens is not None else None
        if val is None:
            return web.Response(status=404, text="no such ACME challenge\n")
        return web.Response(text=val, content_type="text/plain")

    async def other(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=400, text="Use HTTPS\n")
        if request.path == "/" and debug_allowed(request):
            raise web.HTTPFound("/debug/")
        try:
            host = request.url.host or self.hostname
        except ValueError:
            host = self.hostname
        if ":" in host:
            host = f"[{host}]"
        port = "" if self.https_port == 443 else f":{self.https_port}"
        raise web.HTTPFound(f"https://{host}{port}{request.path_qs}")
