"""The LocalAPI endpoints Tailscale's CLI needs to edit prefs and bring a node up: ``check-prefs``,
``start``, ``login-interactive`` and ``watch-ipn-bus`` (the IPN notification stream).

- ``POST check-prefs`` (write): a full Prefs object; always 200, ``{}`` when nodeagent would
  accept it, else ``{"Error": "<one line>"}``; a body that is not JSON is 400
  ``invalid JSON body``.
- ``POST start`` (write): ipn.Options ``{"UpdatePrefs": {...}, "AuthKey": "..."}``; applies the
  prefs nodeagent has (a full Prefs object, as ``check-prefs`` checks it) and answers 204, then
  tells every watcher the current state (as tailscaled does after Start). nodeagent logs in only
  at start (``nodeagent up --login-server --auth-key``): a ``ControlURL`` other than the
  agent's is refused (400, one line), an ``AuthKey`` for an agent already logged in is unused.
- ``POST login-interactive`` (write): nodeagent has no interactive (browser) login: 500, one line.
- ``GET watch-ipn-bus?mask=N`` (read): 200 at once, then one ipn.Notify JSON object per line:
  ``{"State": n}`` on every backend-state change (0 NoState .. 6 Running). Mask bit 2
  (NotifyInitialState) sends the current state first, bit 4 (NotifyInitialPrefs) the prefs;
  other bits are accepted and ignored. The stream ends when the client goes or the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodeagent.ipn.prefs import (
    Prefs,
    PrefsError,
    PrefsPermissionError,
    apply_masked,
    masked_from_full,
    persist_json,
)
from nodeagent.ipn.state import StateError
from nodeagent.localapi.peercred import is_privileged, peer_uid
from nodeagent.localapi.routes import READ, WRITE, LocalAPIRoutes

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend

# ipn.State numbers as Notify.State carries them.
STATE_NUMBERS = {"NoState": 0, "InUseOtherUser": 1, "NeedsLogin": 2, "NeedsMachineAuth": 3,
                 "Stopped": 4, "Starting": 5, "Running": 6}
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_INITIAL_PREFS = 1 << 2
OPERATOR_FIELDS = ("OperatorUser",)  # as for PATCH prefs: root or the agent's own user only
_POLL = 0.5  # how often an idle watcher looks whether its client or the server has gone


def _text(status: int, message: str) -> web.Response:
    """Tailscale answers these endpoints' errors as plain text (Go's http.Error)."""
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


async def _json_body(request: web.Request) -> tuple[Any, web.Response | None]:
    from nodeagent.localapi.handlers import BodyError, read_json_body

    try:
        return await read_json_body(request, request.path.rsplit("/", 1)[-1]), None
    except BodyError:
        return None, _text(400, "invalid JSON body")


def _state_json(state: str) -> dict[str, Any]:
    return {"State": STATE_NUMBERS.get(state, 0)}


def register_ipnbus_routes(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    def protected(request: web.Request) -> tuple[str, ...]:
        return () if is_privileged(peer_uid(request)) else OPERATOR_FIELDS

    async def check_prefs(request: web.Request) -> web.StreamResponse:
        body, err = await _json_body(request)
        if err is not None:
            return err
        if not isinstance(body, dict):
            return web.json_response({"Error": "prefs: want a JSON object"})
        trial = Prefs(**vars(backend.prefs))
        try:
            apply_masked(trial, masked_from_full(body), protected=protected(request))
        except PrefsError as e:
            return web.json_response({"Error": str(e)})
        return web.json_response({})

    async def start(request: web.Request) -> web.StreamResponse:
        body, err = await _json_body(request)
        if err is not None:
            return err
        if not isinstance(body, dict):
            return _text(400, "start: want a JSON object of ipn.Options")
        update = body.get("UpdatePrefs")
        if update is not None:
            if not isinstance(update, dict):
                return _text(400, "start: UpdatePrefs: want a JSON object of prefs")
            want_url, have_url = update.get("ControlURL", ""), backend.prefs.ControlURL
            if want_url and want_url != have_url:
                return _text(400, f"start: ControlURL {want_url!r}: this agent's control server "
                                  f"is {have_url or 'not set'!r}; nodeagent changes it only at "
                                  "start (nodeagent up --login-server URL)")
            masked = masked_from_full({k: v for k, v in update.items() if k != "ControlURL"})
            try:
                backend.edit_prefs(masked, protected=protected(request))
            except PrefsPermissionError as e:
                return _text(403, f"start: access denied: {e}")
            except PrefsError as e:
                return _text(400, f"start: {e}")
            except StateError as e:
                return _text(500, f"start: {e}")
        backend.notify_state()
        return web.Response(status=204)

    async def login_interactive(request: web.Request) -> web.StreamResponse:
        return _text(500, "login-interactive: nodeagent has no interactive login; log in with "
                          "an auth key (nodeagent up --login-server URL --auth-key KEY)")

    async def watch_ipn_bus(request: web.Request) -> web.StreamResponse:
        raw = request.query.get("mask", "0") or "0"
        if not raw.isdigit() or len(raw) > 20:
            return _text(400, "bad mask")
        mask = int(raw)
        queue: asyncio.Queue[str] = asyncio.Queue()
        listener = queue.put_nowait
        backend.state_listeners.append(listener)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            await resp.prepare(request)  # the header goes out now: the CLI waits for it
            first: dict[str, Any] = {}
            if mask & NOTIFY_INITIAL_STATE:
                first.update(_state_json(backend.backend_state))
            if mask & NOTIFY_INITIAL_PREFS:
                first["Prefs"] = backend.prefs.to_json(persist_json(backend.state.login))
            if first:
                await resp.write(json.dumps(first).encode() + b"\n")
            while not routes.closing.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                with contextlib.suppress(TimeoutError):
                    state = await asyncio.wait_for(queue.get(), _POLL)
                    await resp.write(json.dumps(_state_json(state)).encode() + b"\n")
            return resp
        except ConnectionError:
            return resp  # the client went
        finally:
            with contextlib.suppress(ValueError):
                backend.state_listeners.remove(listener)

    routes.add("check-prefs", check_prefs, {"POST": WRITE})
    routes.add("start", start, {"POST": WRITE})
    routes.add("login-interactive", login_interactive, {"POST": WRITE})
    routes.add("watch-ipn-bus", watch_ipn_bus, {"GET": READ})
