"""Names of the optional features the core knows exist, so it can answer "not installed".

This is the only place the core mentions a feature, and only by name and install command.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownFeature:
    name: str
    localapi: tuple[str, ...] = ()  # LocalAPI endpoint names under /localapi/v0/
    c2n: tuple[str, ...] = ()  # c2n paths
    cli: tuple[tuple[str, ...], ...] = ()  # CLI command paths

    @property
    def install(self) -> str:
        return f"pip install 'nodeagent[{self.name}]'"


KNOWN_FEATURES: dict[str, KnownFeature] = {
    "connreject": KnownFeature(
        "connreject",
        localapi=("debug-rejects",),
        c2n=("/debug/rejects",),
        cli=(("debug", "rejects"),),
    ),
    "derper": KnownFeature("derper", cli=(("derper",),)),
}


def not_installed_message(name: str) -> str:
    return f"feature {name} is not installed; install it with: {KNOWN_FEATURES[name].install}"


def feature_for_localapi(endpoint: str) -> KnownFeature | None:
    for f in KNOWN_FEATURES.values():
        if endpoint in f.localapi:
            return f
    return None


def feature_for_c2n(path: str) -> KnownFeature | None:
    for f in KNOWN_FEATURES.values():
        if path in f.c2n:
            return f
    return None
