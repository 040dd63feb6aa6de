"""The per-backend extension host: one PluginManager, one extension instance per feature.

Hooks fire through pluggy's own hook caller, so order (last registered first), ``tryfirst`` /
``trylast``, ``firstresult`` and hook wrappers behave as pluggy documents. Isolation is added per
extension: each of an extension's (non-wrapper) hook implementations is wrapped in a guard that,
when it raises, logs once, counts the error, marks the extension disabled and returns None, so
pluggy goes on to the other extensions. A disabled extension is offered its shutdown hook and
unregistered as soon as the hook call that failed has returned. With ``strict=True`` (the test
suite's default through ``NODEAGENT_STRICT_HOOKS=1``) the exception propagates instead, so an
assertion inside a hook fails the test that triggered it.

Init runs in pluggy's order and is remembered; shutdown runs extension by extension in the
reverse of that order (as Go's ipnext does).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from nodeagent.ipnext.feature import InstalledFeature, discover
from nodeagent.ipnext.hookspecs import PROJECT, BackendSpec

log = logging.getLogger("nodeagent.ipnext")

STRICT_ENV = "NODEAGENT_STRICT_HOOKS"
_INIT = "nodeagent_extension_init"
_SHUTDOWN = "nodeagent_extension_shutdown"


class ExtensionHost:
    def __init__(self, features: Iterable[InstalledFeature] | None = None, *,
                 strict: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(BackendSpec)
        self._features = list(discover() if features is None else features)
        self.strict = os.environ.get(STRICT_ENV) == "1" if strict is None else strict
        self.active: dict[str, InstalledFeature] = {}
        self.disabled: dict[str, str] = {}  # name → why
        self.hook_errors = 0
        self._init_order: list[str] = []
        self._failed: list[str] = []  # disabled during the current hook call
        self._host: Any = None

    def load(self) -> None:
        """Instantiate and register one extension per feature, its hooks guarded."""
        for inst in self._features:
            f = inst.feature
            if f.extension is None:
                continue
            try:
                ext = f.extension()
                self.pm.register(ext, name=f.name)
            except Exception as e:
                self._disable(f.name, f"cannot create extension: {type(e).__name__}: {e}")
                continue
            self._guard(f.name, ext)
            self.active[f.name] = inst

    def _guard(self, name: str, plugin: object) -> None:
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    impl.function = self._guarded(name, caller.name, impl.function)

    def _guarded(self, name: str, hook: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            if name in self.disabled:
                return None
            try:
                result = fn(*args)
            except Exception as e:
                self.hook_errors += 1
                if self.strict:
                    raise
                what = "init failed" if hook == _INIT else f"{hook} raised"
                self._disable(name, f"{what}: {type(e).__name__}: {e}")
                self._failed.append(name)
                return None
            if hook == _INIT:
                self._init_order.append(name)
            return result

        return call

    def _disable(self, name: str, why: str) -> None:
        if name in self.disabled:
            return
        self.disabled[name] = why
        self.active.pop(name, None)
        log.error("feature %s disabled: %s", name, why)

    def init(self, host: Any) -> None:
        """Fire ``nodeagent_extension_init`` for every registered extension."""
        self._host = host
        self.fire(_INIT, host=host)
        # Extensions without an init hook count as initialised before all the others.
        bare = [n for n in self.active if n not in self._init_order]
        self._init_order[:0] = bare

    def fire(self, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` through pluggy; its result (a list, or one value for firstresult)."""
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        finally:
            if self._failed:
                self._drop_failed()

    def _drop_failed(self) -> None:
        failed, self._failed = self._failed, []
        for name in failed:
            plugin = self.pm.get_plugin(name)
            if plugin is None:
                continue
            if name in self._init_order and self._host is not None:
                self._shutdown_one(name, plugin)
            self.pm.unregister(plugin)

    def _shutdown_one(self, name: str, plugin: object) -> None:
        self._init_order.remove(name)
        impl = next((i for i in self.pm.hook.nodeagent_extension_shutdown.get_hookimpls()
                     if i.plugin is plugin), None)
        if impl is None:
            return
        fn = getattr(impl.function, "__wrapped__", impl.function)
        try:
            fn(*[{"host": self._host}[a] for a in impl.argnames])
        except Exception as e:
            self.hook_errors += 1
            if self.strict:
                raise
            log.error("feature %s: shutdown raised %s: %s", name, type(e).__name__, e)

    def shutdown(self) -> None:
        """Fire ``nodeagent_extension_shutdown`` extension by extension, last initialised first."""
        for name in reversed(list(self._init_order)):
            plugin = self.pm.get_plugin(name)
            if plugin is None:
                continue
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            caller = self.pm.subset_hook_caller(_SHUTDOWN, remove_plugins=others)
            try:
                caller(host=self._host)
            finally:
                if self._failed:
                    self._failed.clear()  # already shutting down: nothing more to undo
        self._init_order.clear()

    def plugin(self, name: str) -> Any:
        return self.pm.get_plugin(name)
