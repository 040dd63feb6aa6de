"""Extension framework: per-backend instances, isolation of failing extensions, hook firing."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from nodeagent.backend import LocalBackend
from nodeagent.ipnext import Feature, InstalledFeature, hookimpl
from nodeagent.tailcfg import NetworkMap, Node


class Counter:
    """A feature extension with per-instance state."""

    instances: list[Counter] = []

    def __init__(self) -> None:
        self.inits = 0
        self.selves: list[Node] = []
        self.shutdowns = 0
        self.tundevs: list[Any] = []
        Counter.instances.append(self)

    @hookimpl
    def nodeagent_extension_init(self, backend: LocalBackend) -> None:
        self.inits += 1

    @hookimpl
    def nodeagent_self_change(self, node: Node) -> None:
        self.selves.append(node)

    @hookimpl
    def nodeagent_tundev_ready(self, wrapper: Any) -> None:
        self.tundevs.append(wrapper)

    @hookimpl
    def nodeagent_tundev_stopping(self, wrapper: Any) -> None:
        self.tundevs.remove(wrapper)

    @hookimpl
    def nodeagent_extension_shutdown(self) -> None:
        self.shutdowns += 1


class BrokenInit:
    @hookimpl
    def nodeagent_extension_init(self, backend: LocalBackend) -> None:
        raise RuntimeError("boom")

    @hookimpl
    def nodeagent_self_change(self, node: Node) -> None:
        raise AssertionError("a disabled extension must not be called")


class BrokenHook:
    @hookimpl
    def nodeagent_self_change(self, node: Node) -> None:
        raise ValueError("bad hook")


def feat(name: str, factory: Any) -> InstalledFeature:
    return InstalledFeature(Feature(name, f"{name} test feature", factory), "test", "0")


def netmap(addr: str, caps: dict[str, Any] | None = None) -> NetworkMap:
    return NetworkMap(SelfNode=Node(Addresses=[addr], CapMap=caps or {}))


def test_two_backends_share_no_feature_state(tmp_path: Any) -> None:
    Counter.instances.clear()
    a = LocalBackend(tmp_path / "a", features=[feat("counter", Counter)])
    b = LocalBackend(tmp_path / "b", features=[feat("counter", Counter)])
    a.start()
    b.start()
    ea, eb = a.extensions.plugin("counter"), b.extensions.plugin("counter")
    assert ea is not eb and len(Counter.instances) == 2
    a.set_netmap(netmap("100.64.0.1/32"))
    assert [n.Addresses for n in ea.selves] == [["100.64.0.1/32"]]
    assert eb.selves == []
    assert a.extensions.pm is not b.extensions.pm


def test_discovered_features_are_per_backend(tmp_path: Any) -> None:
    a = LocalBackend(tmp_path / "a")
    b = LocalBackend(tmp_path / "b")
    a.start()
    b.start()
    assert set(a.extensions.active) == set(b.extensions.active)
    for name in a.extensions.active:
        pa, pb = a.extensions.plugin(name), b.extensions.plugin(name)
        assert pa is not pb, name


def test_failing_init_is_logged_once_and_disabled(tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    Counter.instances.clear()
    be = LocalBackend(tmp_path, features=[feat("broken", BrokenInit), feat("counter", Counter)])
    with caplog.at_level(logging.ERROR):
        be.start()
    errors = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(errors) == 1 and "init failed" in errors[0].getMessage()
    assert "broken" in be.extensions.disabled and "broken" not in be.extensions.active
    assert be.extensions.plugin("broken") is None
    # The agent keeps running: other extensions still get hooks, and none reach the broken one.
    be.set_netmap(netmap("100.64.0.9/32"))
    assert len(Counter.instances[0].selves) == 1


def test_raising_hook_is_isolated_and_counted(tmp_path: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    Counter.instances.clear()
    be = LocalBackend(tmp_path, features=[feat("bad", BrokenHook), feat("counter", Counter)])
    be.start()
    with caplog.at_level(logging.ERROR):
        be.set_netmap(netmap("100.64.0.1/32"))
        be.set_netmap(netmap("100.64.0.2/32"))
    assert be.extensions.hook_errors == 2
    assert len([r for r in caplog.records if "bad hook" in r.getMessage()]) == 1
    assert len(Counter.instances[0].selves) == 2


def test_self_change_fires_only_on_change(tmp_path: Any) -> None:
    Counter.instances.clear()
    be = LocalBackend(tmp_path, features=[feat("counter", Counter)])
    be.start()
    ext = Counter.instances[0]
    be.set_netmap(netmap("100.64.0.1/32"))
    be.set_netmap(netmap("100.64.0.1/32"))
    assert len(ext.selves) == 1
    be.set_netmap(netmap("100.64.0.1/32", {"debug-conn-reject": None}))
    assert len(ext.selves) == 2 and ext.selves[-1].has_cap("debug-conn-reject")


def test_tundev_replacement_and_shutdown(tmp_path: Any) -> None:
    Counter.instances.clear()
    be = LocalBackend(tmp_path, features=[feat("counter", Counter)])
    be.start()
    ext = Counter.instances[0]
    w1, w2 = object(), object()
    be.set_tundev(w1)
    be.set_tundev(w2)
    assert ext.tundevs == [w2]
    be.shutdown()
    assert ext.tundevs == [] and ext.shutdowns == 1
