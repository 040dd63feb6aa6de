"""Prometheus text rendering of the agent's counters for ``GET /localapi/v0/metrics``.

Samples are ``(name, help, labels, value)`` tuples gathered by ``LocalBackend.metric_samples``:
the data-plane objects' ``metrics_samples()`` and the collectors extensions registered with
``Host.register_metrics``. Counters' names end in ``_total``. Rendering happens per scrape;
nothing here touches the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodeagent.ipnext.api import Sample

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend


class _Collector:
    def __init__(self, samples: Iterable[Sample]) -> None:
        self.samples = list(samples)

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, Metric] = {}
        for name, help_, labels, value in self.samples:
            fam = fams.get(name)
            if fam is None:
                keys = sorted(labels)
                if name.endswith("_total"):
                    fam = CounterMetricFamily(name[: -len("_total")], help_, labels=keys)
                else:
                    fam = GaugeMetricFamily(name, help_, labels=keys)
                fams[name] = fam
            fam.add_metric([labels[k] for k in sorted(labels)], value)
        yield from fams.values()


def render_metrics(backend: LocalBackend) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(backend.metric_samples()))  # type: ignore[arg-type]
    return generate_latest(reg).decode()
