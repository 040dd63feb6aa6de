"""derpprobe's service mode: a probe round every interval, the HTML status page at ``/`` and
Prometheus metrics at ``/metrics``.

Owns :class:`ProbeService` (the latest result per node and probe, counts of results, the last
error per node) and its HTTP server. Each round after the first fetches the DERP map again (a
map that fails to load keeps the previous one and shows the error on the page and as
``derpprobe_map_ok 0``); a round starts ``interval`` seconds after the previous one started, or
at once when a round took longer. Results of nodes that left the map vanish with the next round.

Metrics (labels ``region``, ``node``, and ``probe``/``peer`` per probe; ``peer`` is the other
node of a mesh pair, "" otherwise):

- ``derpprobe_probe_ok`` 1/0 per probe of the latest round (skipped probes are absent)
- ``derpprobe_probe_latency_seconds`` per probe that passed
- ``derpprobe_probe_results_total{result="ok|fail|skip"}`` per probe, since start
- ``derpprobe_node_ok`` 1 when every probe of the node passed in the latest round
- ``derpprobe_tls_cert_days_left``, ``derpprobe_rounds_total``,
  ``derpprobe_round_duration_seconds``, ``derpprobe_last_round_timestamp_seconds``,
  ``derpprobe_map_ok``, ``derpprobe_map_nodes``
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodeagent.tailcfg import DERPMap
from nodeagent_derper.derpprobe.mapload import MapError, load_derp_map
from nodeagent_derper.derpprobe.probes import (
    FAIL,
    OK,
    PROBES,
    ProbeResult,
    node_id,
    run_round,
)
from nodeagent_derper.derpprobe.report import (
    node_rows,
    probe_label,
    render_page,
    summary_line,
)

__all__ = ["ProbeService", "serve"]

log = logging.getLogger("derpprobe")


class ProbeService:
    def __init__(self, dm: DERPMap, *, source: str, socket_path: str, interval: float,
                 timeout: float, verbose: bool = False) -> None:
        self.dm = dm
        self.verbose = verbose
        self.source = source
        self.socket_path = socket_path
        self.interval = interval
        self.timeout = timeout
        self.results: dict[tuple[int, str, str, str], ProbeResult] = {}
        self.counts: dict[tuple[int, str, str, str, str], int] = {}
        self.last_errors: dict[tuple[int, str], tuple[str, float]] = {}
        self.rounds = 0
        self.last_round: float | None = None
        self.round_seconds: float | None = None
        self.map_error = ""
        self._failing: list[str] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # type: ignore[arg-type]

    def nodes(self) -> list[tuple[int, str, str]]:
        return [(rid, node_id(n), n.HostName)
                for rid, region in sorted(self.dm.Regions.items()) for n in region.Nodes]

    async def refresh_map(self) -> None:
        try:
            self.dm = await asyncio.to_thread(load_derp_map, self.source,
                                              socket_path=self.socket_path,
                                              timeout=max(self.timeout, 5.0))
        except MapError as e:
            if str(e) != self.map_error:
                log.warning("%s; keeping the previous map", e)
            self.map_error = f"{e} (probing the previous map)"
            return
        self.map_error = ""

    async def round(self) -> list[ProbeResult]:
        if self.rounds:
            await self.refresh_map()
        t0 = time.perf_counter()
        results = await run_round(self.dm, timeout=self.timeout)
        self.round_seconds = time.perf_counter() - t0
        self.results = {r.key: r for r in results}
        errors: dict[tuple[int, str], list[ProbeResult]] = {}
        for r in results:
            k = (*r.key, r.status)
            self.counts[k] = self.counts.get(k, 0) + 1
            if r.status == FAIL:
                errors.setdefault((r.region, r.node), []).append(r)
        now = time.time()
        for node, failed in errors.items():
            first = min(failed, key=lambda r: (PROBES.index(r.probe), r.peer))
            more = f" (and {len(failed) - 1} more failing)" if len(failed) > 1 else ""
            self.last_errors[node] = (f"{probe_label(first)}: {first.error}{more}", now)
        failing = sorted(f"{r.node} {probe_label(r)}" for r in results if r.status == FAIL)
        if failing != self._failing:
            if failing:
                log.warning("round %d: failing: %s", self.rounds + 1, ", ".join(failing))
            else:
                log.info("round %d: every probe passes", self.rounds + 1)
            self._failing = failing
        if self.verbose:
            log.info("round %d in %.2f s: %s", self.rounds + 1, self.round_seconds,
                     summary_line(results))
        self.rounds += 1
        self.last_round = time.time()
        return results

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            try:
                await self.round()
            except Exception:  # a bug in one round must not stop the watching
                log.exception("probe round failed")
            await asyncio.sleep(max(0.0, start + self.interval - loop.time()))

    def page(self) -> str:
        rows = node_rows(self.nodes(), self.results.values(), self.last_errors)
        return render_page(rows, source=self.source, interval=self.interval,
                           last_round=self.last_round, round_seconds=self.round_seconds,
                           map_error=self.map_error)

    def app(self) -> web.Application:
        async def index(request: web.Request) -> web.StreamResponse:
            return web.Response(text=self.page(), content_type="text/html", charset="utf-8")

        async def metrics(request: web.Request) -> web.StreamResponse:
            return web.Response(body=generate_latest(self.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/", index)
        app.router.add_get("/metrics", metrics)
        return app


class _Collector:
    """Metric families built from the service's state at scrape time."""

    def __init__(self, svc: ProbeService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        s = self.svc
        labels = ["region", "node", "probe", "peer"]
        ok = GaugeMetricFamily("derpprobe_probe_ok", "1 if the probe passed in the latest "
                               "round, 0 if it failed", labels=labels)
        lat = GaugeMetricFamily("derpprobe_probe_latency_seconds",
                                "latency of the probe in the latest round", labels=labels)
        days = GaugeMetricFamily("derpprobe_tls_cert_days_left",
                                 "days until the node's TLS certificate expires",
                                 labels=["region", "node"])
        node_health: dict[tuple[str, str], bool] = {}
        for r in s.results.values():
            lv = [str(r.region), r.node, r.probe, r.peer]
            if r.status in (OK, FAIL):
                ok.add_metric(lv, 1.0 if r.ok else 0.0)
                k = (str(r.region), r.node)
                node_health[k] = node_health.get(k, True) and r.ok
            if r.ok and r.latency is not None:
                lat.add_metric(lv, r.latency)
            if r.cert_days_left is not None:
                days.add_metric([str(r.region), r.node], r.cert_days_left)
        node_ok = GaugeMetricFamily("derpprobe_node_ok", "1 if every probe of the node passed "
                                    "in the latest round", labels=["region", "node"])
        for k, v in sorted(node_health.items()):
            node_ok.add_metric(list(k), 1.0 if v else 0.0)
        counts = CounterMetricFamily("derpprobe_probe_results", "probe results since start",
                                     labels=[*labels, "result"])
        for (region, node, probe, peer, status), n in sorted(s.counts.items()):
            counts.add_metric([str(region), node, probe, peer, status], float(n))
        yield from (ok, lat, days, node_ok, counts)
        yield CounterMetricFamily("derpprobe_rounds", "probe rounds finished", value=s.rounds)
        yield GaugeMetricFamily("derpprobe_round_duration_seconds",
                                "how long the latest round took", value=s.round_seconds or 0.0)
        yield GaugeMetricFamily("derpprobe_last_round_timestamp_seconds",
                                "when the latest round ended (Unix time)",
                                value=s.last_round or 0.0)
        yield GaugeMetricFamily("derpprobe_map_ok", "0 if the latest DERP map fetch failed",
                                value=0.0 if s.map_error else 1.0)
        yield GaugeMetricFamily("derpprobe_map_nodes", "nodes in the DERP map",
                                value=float(len(s.nodes())))


async def serve(svc: ProbeService, host: str, port: int,
                started: Any = None) -> None:
    """Serve the page and metrics on host:port and probe until cancelled. ``started(url)`` is
    called once listening. OSError when the address cannot be bound."""
    runner = web.AppRunner(svc.app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host or None, port)
        await site.start()
        bound = runner.addresses[0][:2] if runner.addresses else (host, port)
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        if started is not None:
            started(f"http://{shown}:{bound[1]}/")
        await svc.run_forever()
    finally:
        await runner.cleanup()
