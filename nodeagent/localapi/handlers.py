"""The core's own LocalAPI endpoints: status, prefs, metrics, serve-config, derpmap,
debug-netcheck, debug-derp-region (and, registered from here, ping, whois and the IPN-bus group
of :mod:`nodeagent.localapi.ipnbus`); and :func:`read_json_body`, the one way a LocalAPI
handler (core or feature) reads a JSON request body.

A body that is not JSON, is not UTF-8, holds a number with more than :data:`MAX_INT_DIGITS` digits
or nests deeper than Python's recursion limit is refused with :class:`BodyError` (one line, 400);
a body over the server's ``client_max_size`` gets the server's JSON 413. Only root or the agent's
own user may change ``OperatorUser``: the operator may write prefs but not hand that right on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodeagent.ipn.prefs import PrefsError, PrefsPermissionError, persist_json
from nodeagent.ipn.state import StateError
from nodeagent.ipn.status import build_status
from nodeagent.localapi.ipnbus import register_ipnbus_routes
from nodeagent.localapi.metrics import render_metrics
from nodeagent.localapi.peercred import is_privileged, peer_uid
from nodeagent.localapi.ping import register_ping_route
from nodeagent.localapi.routes import READ, WRITE, LocalAPIRoutes, json_error
from nodeagent.localapi.whois import register_whois_route
from nodeagent.tailcfg import derpmap_to_json, marshal_json

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend
    from nodeagent.tailcfg import DERPMap

MAX_INT_DIGITS = 64  # no LocalAPI value needs more; Python itself refuses ints past 4300 digits
OPERATOR_FIELDS = ("OperatorUser",)  # prefs only root or the agent's own user may change


class BodyError(ValueError):
    """A request body that is not usable JSON; the message is one line naming the endpoint."""


class _TooManyDigits(Exception):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _TooManyDigits(digits)
    return int(text)


def parse_json_body(raw: bytes, name: str) -> Any:
    """``raw`` as JSON, or :class:`BodyError` saying why not (never ValueError/RecursionError)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"{name}: body is not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise BodyError(f"{name}: body is not JSON: {e}") from None
    except _TooManyDigits as e:
        raise BodyError(f"{name}: body has a number of {e.digits} digits "
                        f"(at most {MAX_INT_DIGITS})") from None
    except RecursionError:
        raise BodyError(f"{name}: body is not usable JSON: nested too deeply") from None
    except ValueError as e:  # any other limit of Python's json; its text is one line
        raise BodyError(f"{name}: body is not usable JSON: {' '.join(str(e).split())}") from None


async def read_json_body(request: web.Request, name: str) -> Any:
    """The request body as JSON; BodyError (answer 400) if it is not usable, and aiohttp's 413
    (answered as JSON by the server) if it is larger than the server accepts."""
    return parse_json_body(await request.read(), name)


def register_core_routes(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    async def status(request: web.Request) -> web.StreamResponse:
        peers = request.query.get("peers", "true") != "false"
        return web.json_response(build_status(backend, peers=peers))

    async def prefs(request: web.Request) -> web.StreamResponse:
        if request.method == "PATCH":
            try:
                body = await read_json_body(request, "prefs")
            except BodyError as e:
                return json_error(400, str(e))
            protected = () if is_privileged(peer_uid(request)) else OPERATOR_FIELDS
            try:
                backend.edit_prefs(body, protected=protected)
            except PrefsPermissionError as e:
                return json_error(403, f"prefs access denied: {e}")
            except PrefsError as e:
                return json_error(400, f"prefs: {e}")
            except StateError as e:
                return json_error(500, str(e))
        return web.json_response(backend.prefs.to_json(persist_json(backend.state.login)))

    async def metrics(request: web.Request) -> web.StreamResponse:
        return web.Response(text=render_metrics(backend),
                            content_type="text/plain", charset="utf-8")

    routes.add("status", status, {"GET": READ})
    routes.add("prefs", prefs, {"GET": READ, "PATCH": WRITE})
    async def serve_config(request: web.Request) -> web.StreamResponse:
        # No serve/funnel here: Tailscale's answer when nothing is configured, so that
        # `tailscale status` has nothing to report about Funnel.
        body = b"null"
        return web.Response(body=body, content_type="application/json",
                            headers={"Etag": hashlib.sha256(body).hexdigest()})

    routes.add("metrics", metrics, {"GET": READ})
    routes.add("serve-config", serve_config, {"GET": READ})
    register_netcheck_routes(backend, routes)
    register_derp_debug_routes(backend, routes)
    register_ping_route(backend, routes)
    register_whois_route(backend, routes)
    register_ipnbus_routes(backend, routes)


# Every method reaches the derpmap handler, so that a non-GET gets Tailscale's 400 "want GET".
_ANY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def register_netcheck_routes(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    """``derpmap`` (Tailscale's: the current DERP map, tab-indented, ``null`` before a netmap)
    and ``debug-netcheck`` (nodeagent's: run a netcheck from the agent, answer the Report)."""
    one_at_a_time = asyncio.Lock()

    def current() -> DERPMap | None:
        nm = backend.netmap
        return nm.DERPMap if nm is not None else None

    async def derpmap(request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return json_error(400, "want GET")
        body = marshal_json(derpmap_to_json(current()), "\t") + "\n"
        return web.Response(text=body, content_type="application/json")

    async def debug_netcheck(request: web.Request) -> web.StreamResponse:
        from nodeagent.netcheck.client import run_netcheck

        dm = current()
        if dm is None or not dm.Regions:
            return json_error(412, "no DERP map (the agent has no netmap with a DERPMap yet)")
        verbose = request.query.get("verbose", "") in ("1", "true")
        async with one_at_a_time:
            report = await run_netcheck(dm, verbose=verbose)
        return web.Response(text=marshal_json(report.to_json(), "\t") + "\n",
                            content_type="application/json")

    routes.add("derpmap", derpmap, dict.fromkeys(_ANY_METHOD, READ))
    routes.add("debug-netcheck", debug_netcheck, {"GET": READ})


def register_derp_debug_routes(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    """``debug-derp-region`` (Tailscale's ``debug derp REGION``): POST, write permission; always
    200 ``{"Info": [...], "Warnings": [...], "Errors": [...]}`` (empty lists ``null``), the checks
    of :mod:`nodeagent.derp.debugcheck` against the current DERP map."""

    async def debug_derp_region(request: web.Request) -> web.StreamResponse:
        from nodeagent.derp.debugcheck import check_region

        nm = backend.netmap
        report = await check_region(nm.DERPMap if nm is not None else None,
                                    request.query.get("region", ""))
        return web.json_response(report.to_json())

    routes.add("debug-derp-region", debug_derp_region, {"POST": WRITE})
