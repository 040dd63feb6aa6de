"""What a feature distribution declares, and discovery through the entry-point group."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

ENTRY_POINT_GROUP = "nodeagent.features"
log = logging.getLogger("nodeagent.ipnext")


@dataclass(frozen=True)
class Feature:
    """A feature's registration: entry points in ``nodeagent.features`` name one of these.

    ``extension`` makes a fresh extension object (a pluggy plugin with ``BackendSpec`` hookimpls)
    for one LocalBackend; ``cli`` is an object or module with ``CLISpec`` hookimpls, or None.
    """

    name: str
    description: str
    extension: Callable[[], Any] | None = None
    cli: Any = None


@dataclass(frozen=True)
class InstalledFeature:
    feature: Feature
    distribution: str
    version: str


def discover() -> list[InstalledFeature]:
    """Load every feature of the entry-point group; broken ones are logged and skipped."""
    found: dict[str, InstalledFeature] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # a broken feature must not take the agent down
            log.error("feature %s: cannot load %s: %s", ep.name, ep.value, e)
            continue
        if not isinstance(obj, Feature):
            log.error("feature %s: %s is not a nodeagent.ipnext.Feature", ep.name, ep.value)
            continue
        dist = ep.dist.name if ep.dist is not None else "?"
        ver = ep.dist.version if ep.dist is not None else "?"
        found.setdefault(obj.name, InstalledFeature(obj, dist, ver))
    return sorted(found.values(), key=lambda f: f.feature.name)
