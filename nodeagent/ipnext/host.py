"""The per-backend extension host: one PluginManager, one extension instance per feature.

Each hook implementation is called on its own so that one misbehaving extension cannot stop the
others: a failure in init disables (unregisters) that extension after one log line; a failure in
any later hook is logged once per (extension, hook) and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pluggy

from nodeagent.ipnext.feature import InstalledFeature, discover
from nodeagent.ipnext.hookspecs import PROJECT, BackendSpec

log = logging.getLogger("nodeagent.ipnext")


class ExtensionHost:
    def __init__(self, features: Iterable[InstalledFeature] | None = None) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(BackendSpec)
        self._features = list(discover() if features is None else features)
        self.active: dict[str, InstalledFeature] = {}
        self.disabled: dict[str, str] = {}  # name → why
        self.hook_errors = 0
        self._logged: set[tuple[str, str]] = set()

    def load(self) -> None:
        """Instantiate and register one extension per feature."""
        for inst in self._features:
            f = inst.feature
            if f.extension is None:
                continue
            try:
                ext = f.extension()
                self.pm.register(ext, name=f.name)
            except Exception as e:
                self._disable(f.name, f"cannot create extension: {e}")
                continue
            self.active[f.name] = inst

    def init(self, backend: Any) -> None:
        for impl in list(self.pm.hook.nodeagent_extension_init.get_hookimpls()):
            try:
                impl.function(*_args(impl, {"backend": backend}))
            except Exception as e:
                self.pm.unregister(impl.plugin)
                self.active.pop(impl.plugin_name, None)
                self._disable(impl.plugin_name, f"init failed: {type(e).__name__}: {e}")

    def _disable(self, name: str, why: str) -> None:
        self.disabled[name] = why
        log.error("feature %s disabled: %s", name, why)

    def fire(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call every implementation of ``hook``; return the non-None results."""
        results = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                r = impl.function(*_args(impl, kwargs))
            except Exception as e:
                self.hook_errors += 1
                key = (impl.plugin_name, hook)
                if key not in self._logged:
                    self._logged.add(key)
                    log.error("feature %s: %s raised %s: %s (further errors counted, not logged)",
                              impl.plugin_name, hook, type(e).__name__, e)
                continue
            if r is not None:
                results.append(r)
        return results

    def plugin(self, name: str) -> Any:
        return self.pm.get_plugin(name)


def _args(impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> list[Any]:
    return [kwargs[a] for a in impl.argnames]
