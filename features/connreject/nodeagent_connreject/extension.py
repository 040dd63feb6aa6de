"""The connreject extension: one Aggregator per LocalBackend, wired to the data plane.

It uses only the extension :class:`~nodeagent.ipnext.api.Host` and the Aggregator's public API.
It installs one note callback on the TUN Wrapper and on the engine whenever either becomes ready
(and again when replaced), removes it when they stop and at shutdown, flips its recording gate on
the ``debug-conn-reject`` node attribute at every self-node change, and serves the aggregate on
LocalAPI ``GET /localapi/v0/debug-rejects``, c2n ``GET /debug/rejects`` and in the metrics.
``GET debug-rejects?watch=1`` streams it live (:mod:`nodeagent_connreject.watch`);
``DELETE debug-rejects`` (write permission) clears it and answers 204.
``?explain=1`` adds ``Explanation`` (a sentence) and ``ExplanationDetail`` to every event
(:mod:`nodeagent_connreject.explain`); without it the answer is Tailscale's shape exactly.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from nodeagent.c2n import C2NRequest, C2NResponse
from nodeagent.ipn.prefs import Prefs
from nodeagent.ipnext import hookimpl
from nodeagent.ipnext.api import READ, WRITE, ConnRejectObservable, Host, Sample
from nodeagent.packet import addr_str
from nodeagent.tailcfg import NODE_ATTR_CONN_REJECT, Node
from nodeagent_connreject.aggregator import Aggregator, default_max_entries
from nodeagent_connreject.explain import Explainer
from nodeagent_connreject.watch import WatchHub, serve_watch

log = logging.getLogger("nodeagent.connreject")

LOCALAPI_ENDPOINT = "debug-rejects"
C2N_PATH = "/debug/rejects"
ADDR_CACHE_SIZE = 4096


class ConnRejectExtension:
    def __init__(self) -> None:
        self.aggregator = Aggregator(default_max_entries())
        self.watch_hub = WatchHub(self.aggregator)
        self._host: Host | None = None  # from init to shutdown: explanations ask through it
        self.explainer = Explainer(lambda: self._host)
        self._attached: list[ConnRejectObservable] = []  # where our callback is installed
        self._addr_names: dict[tuple[int, int], str] = {}

    # --- the callback the data plane calls -------------------------------------------------
    def note(self, direction: str, proto: int, version: int, src_ip: int, src_port: int,
             dst_ip: int, dst_port: int, reason: str, source: str, maybe_broken: bool) -> None:
        """The data plane's note callback (signature: ``nodeagent.tundev.wrapper.NoteFn``)."""
        agg = self.aggregator
        if not agg.admit():  # format nothing for an event that would be dropped anyway
            return
        names = self._addr_names
        src = names.get((version, src_ip))
        if src is None:
            src = self._name(version, src_ip)
        dst = names.get((version, dst_ip))
        if dst is None:
            dst = self._name(version, dst_ip)
        agg.note_fields(direction, proto, f"{src}:{src_port}", f"{dst}:{dst_port}", reason,
                        source, maybe_broken)

    def _name(self, version: int, ip: int) -> str:
        """Rendered address (bracketed for IPv6, ready for ``:port``), cached: rejections come
        in storms from few peers, and rendering IPv6 costs more than the rest of a note."""
        names = self._addr_names
        if len(names) >= ADDR_CACHE_SIZE:
            names.clear()
        a = addr_str(version, ip)
        s = f"[{a}]" if version == 6 else a
        names[(version, ip)] = s
        return s

    # --- lifecycle -------------------------------------------------------------------------
    @hookimpl
    def nodeagent_extension_init(self, host: Host) -> None:
        configured = host.prefs.ConnRejectMaxEntries
        if configured:
            self.aggregator.set_max_entries(configured)
        host.register_metrics(self.metrics)
        self._host = host

    @hookimpl
    def nodeagent_extension_shutdown(self, host: Host) -> None:
        self._host = None
        self.explainer.close()
        for obj in list(self._attached):
            self._detach(obj)
        self.aggregator.set_enabled(False)

    @hookimpl
    def nodeagent_prefs_change(self, host: Host, prefs: Prefs, changed: list[str]) -> None:
        if "ConnRejectMaxEntries" in changed:
            self.aggregator.set_max_entries(prefs.ConnRejectMaxEntries or default_max_entries())

    @hookimpl
    def nodeagent_self_change(self, host: Host, node: Node) -> None:
        want = bool(node.has_cap(NODE_ATTR_CONN_REJECT))
        prev = self.aggregator.set_enabled(want)
        if prev != want:
            log.info("connreject: %s via NodeAttrConnReject", "enabled" if want else "disabled")

    # --- data plane attachment ---------------------------------------------------------------
    def _attach(self, obj: ConnRejectObservable) -> None:
        obj.set_conn_reject_note(self.note)
        if obj not in self._attached:
            self._attached.append(obj)

    def _detach(self, obj: ConnRejectObservable) -> None:
        if obj in self._attached:
            self._attached.remove(obj)
            obj.set_conn_reject_note(None)

    @hookimpl
    def nodeagent_tundev_ready(self, host: Host, wrapper: ConnRejectObservable) -> None:
        self._attach(wrapper)

    @hookimpl
    def nodeagent_tundev_stopping(self, host: Host, wrapper: ConnRejectObservable) -> None:
        self._detach(wrapper)

    @hookimpl
    def nodeagent_engine_ready(self, host: Host, engine: ConnRejectObservable) -> None:
        self._attach(engine)

    @hookimpl
    def nodeagent_engine_stopping(self, host: Host, engine: ConnRejectObservable) -> None:
        self._detach(engine)

    # --- endpoints -------------------------------------------------------------------------
    @hookimpl
    def nodeagent_localapi_routes(self, host: Host) -> None:
        def body(request: web.Request) -> dict[str, Any]:
            # The answer to GET and every watch snapshot: query parameters apply to both.
            resp = self.aggregator.response()
            if request.query.get("explain", "") in ("1", "true"):
                return self.explainer.annotate_cached(resp, self._explained)
            return resp

        async def debug_rejects(request: web.Request) -> web.StreamResponse:
            if request.method == "DELETE":
                self.aggregator.clear()
                return web.Response(status=204)
            if request.query.get("watch", "") in ("1", "true"):
                return await serve_watch(request, self.watch_hub, lambda: body(request))
            if request.query.get("explain", "") in ("1", "true"):  # waits for control (bounded)
                return web.json_response(await self.explainer.annotate(
                    self.aggregator.response()))
            return web.json_response(body(request))

        host.add_localapi_route(LOCALAPI_ENDPOINT, debug_rejects,
                                {"GET": READ, "DELETE": WRITE})

    @hookimpl
    def nodeagent_c2n_routes(self, host: Host) -> None:
        async def debug_rejects(req: C2NRequest) -> C2NResponse:
            return C2NResponse.json(self.aggregator.response())

        host.add_c2n_route("GET", C2N_PATH, debug_rejects)

    def _explained(self) -> None:
        """An explanation arrived from control: open watch streams send a new snapshot."""
        notify = self.aggregator.on_change
        if notify is not None:
            notify()

    def metrics(self) -> list[Sample]:
        agg = self.aggregator
        samples: list[Sample] = [
            ("nodeagent_connreject_enabled", "Whether rejection recording is on (node attribute)",
             {}, 1.0 if agg.enabled else 0.0),
            ("nodeagent_connreject_evicted_total", "Aggregated rejections evicted by the LRU",
             {}, agg.evicted),
        ]
        for (direction, reason), n in sorted(agg.noted.items()):
            samples.append(("nodeagent_connreject_noted_total",
                            "Connection rejections recorded, by direction and reason",
                            {"direction": direction, "reason": reason}, n))
        return samples
