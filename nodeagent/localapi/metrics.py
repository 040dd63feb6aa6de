"""Prometheus text rendering of the agent's counters for ``GET /localapi/v0/metrics``.

Sources provide samples as ``(name, help, labels, value)`` tuples: the data-plane objects through
a ``metrics_samples()`` method and extensions through the ``nodeagent_metrics`` hook. Counters'
names end in ``_total``. Rendering happens per scrape; nothing here touches the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend

Sample = tuple[str, str, dict[str, str], float]


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


def collect_samples(backend: LocalBackend) -> list[Sample]:
    samples: list[Sample] = [
        ("nodeagent_extension_hook_errors_total", "Exceptions raised by extension hooks", {},
         backend.extensions.hook_errors),
    ]
    for obj in (backend.wrapper, backend.engine):
        fn: Any = getattr(obj, "metrics_samples", None)
        if fn is not None:
            samples.extend(fn())
    for result in backend.extensions.fire("nodeagent_metrics", backend=backend):
        samples.extend(result)
    return samples


def render_metrics(backend: LocalBackend) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(collect_samples(backend)))  # type: ignore[arg-type]
    return generate_latest(reg).decode()
