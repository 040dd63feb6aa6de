"""Extension framework: per-backend instances, pluggy's call order, isolation of failing
extensions (and strictness in tests), shutdown order, and the Host surface."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest

from nodeagent.backend import LocalBackend
from nodeagent.c2n import C2NRequest, C2NResponse
from nodeagent.ipnext import Feature, InstalledFeature, hookimpl
from nodeagent.ipnext.api import READ, Host
from nodeagent.ipnext.feature import discover
from nodeagent.ipnext.known import KNOWN_FEATURES
from nodeagent.tailcfg import NetworkMap, Node
from tests.conftest import expected_features

CALLS: list[tuple[str, str]] = []


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
    def nodeagent_extension_init(self, host: Host) -> None:
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
    def nodeagent_extension_init(self, host: Host) -> None:
        raise RuntimeError("boom")

    @hookimpl
    def nodeagent_self_change(self, node: Node) -> None:
        raise AssertionError("a disabled extension must not be called")


class BrokenHook:
    shutdowns = 0

    @hookimpl
    def nodeagent_self_change(self, node: Node) -> None:
        raise ValueError("bad hook")

    @hookimpl
    def nodeagent_extension_shutdown(self) -> None:
        BrokenHook.shutdowns += 1


def recorder(name: str, **marks: bool) -> type:
    """A toy extension that records the order in which its hooks run."""

    class Recorder:
        @hookimpl(**marks)
        def nodeagent_extension_init(self) -> None:
            CALLS.append(("init", name))

        @hookimpl(**marks)
        def nodeagent_self_change(self) -> None:
            CALLS.append(("self", name))

        @hookimpl
        def nodeagent_extension_shutdown(self) -> None:
            CALLS.append(("shutdown", name))

    return Recorder


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
    with_extension = {i.feature.name for i in discover() if i.feature.extension is not None}
    assert set(a.extensions.active) == set(b.extensions.active) == with_extension
    expected = expected_features()
    if expected is not None:
        # A feature serving LocalAPI or c2n routes does so from an extension: where the
        # environment expects one, the loop below must not run zero times.
        serving = {n for n in expected if KNOWN_FEATURES[n].localapi or KNOWN_FEATURES[n].c2n}
        assert serving <= with_extension, (serving, with_extension)
    for name in a.extensions.active:
        pa, pb = a.extensions.plugin(name), b.extensions.plugin(name)
        assert pa is not pb, name


def test_hooks_run_in_pluggys_order_and_shutdown_in_reverse_init_order(tmp_path: Any) -> None:
    CALLS.clear()
    be = LocalBackend(tmp_path, features=[feat("first", recorder("first")),
                                          feat("second", recorder("second")),
                                          feat("early", recorder("early", tryfirst=True))])
    be.start()
    # pluggy: last registered first, tryfirst before everything.
    assert [n for k, n in CALLS if k == "init"] == ["early", "second", "first"]
    be.set_netmap(netmap("100.64.0.1/32"))
    assert [n for k, n in CALLS if k == "self"] == ["early", "second", "first"]
    be.shutdown()
    assert [n for k, n in CALLS if k == "shutdown"] == ["first", "second", "early"]


def test_failing_init_is_logged_once_and_disabled(tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    Counter.instances.clear()
    be = LocalBackend(tmp_path, features=[feat("broken", BrokenInit), feat("counter", Counter)],
                      strict_hooks=False)
    with caplog.at_level(logging.ERROR):
        be.start()
    errors = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(errors) == 1 and "init failed" in errors[0].getMessage()
    assert "broken" in be.extensions.disabled and "broken" not in be.extensions.active
    assert be.extensions.plugin("broken") is None
    # The agent keeps running: other extensions still get hooks, and none reach the broken one.
    be.set_netmap(netmap("100.64.0.9/32"))
    assert len(Counter.instances[0].selves) == 1 and Counter.instances[0].inits == 1


def test_raising_hook_disables_its_extension_only(tmp_path: Any,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    Counter.instances.clear()
    BrokenHook.shutdowns = 0
    be = LocalBackend(tmp_path, features=[feat("bad", BrokenHook), feat("counter", Counter)],
                      strict_hooks=False)
    be.start()
    with caplog.at_level(logging.ERROR):
        be.set_netmap(netmap("100.64.0.1/32"))
        be.set_netmap(netmap("100.64.0.2/32"))
    assert be.extensions.hook_errors == 1
    assert len([r for r in caplog.records if "bad hook" in r.getMessage()]) == 1
    assert "bad" in be.extensions.disabled and be.extensions.plugin("bad") is None
    assert BrokenHook.shutdowns == 1  # offered the chance to clean up, once
    assert len(Counter.instances[0].selves) == 2
    be.shutdown()
    assert BrokenHook.shutdowns == 1 and Counter.instances[0].shutdowns == 1


def test_strict_hooks_let_an_assertion_fail_the_test(tmp_path: Any) -> None:
    class Asserting:
        @hookimpl
        def nodeagent_self_change(self, node: Node) -> None:
            assert node.Addresses == ["100.64.0.1/32"], node.Addresses

    be = LocalBackend(tmp_path, features=[feat("asserting", Asserting)], strict_hooks=True)
    be.start()
    be.set_netmap(netmap("100.64.0.1/32"))
    with pytest.raises(AssertionError, match=r"100\.64\.0\.2"):
        be.set_netmap(netmap("100.64.0.2/32"))


def test_suite_runs_hooks_strictly(tmp_path: Any) -> None:
    # conftest turns strictness on for every backend the suite builds without saying otherwise.
    assert LocalBackend(tmp_path).extensions.strict


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


class HostUser:
    """Touches every member of the Host, as a feature would."""

    def __init__(self) -> None:
        self.host: Host | None = None
        self.seen_prefs: list[list[str]] = []

    @hookimpl
    def nodeagent_extension_init(self, host: Host) -> None:
        self.host = host
        host.register_metrics(lambda: [("hostuser_up", "test gauge", {}, 1.0)])
        assert host.read_state("hostuser/blob") is None
        host.write_state("hostuser/blob", b"\x00kept")

    @hookimpl
    def nodeagent_prefs_change(self, prefs: Any, changed: list[str]) -> None:
        self.seen_prefs.append(changed)

    @hookimpl
    def nodeagent_localapi_routes(self, host: Host) -> None:
        async def hello(request: Any) -> Any:
            return None

        host.add_localapi_route("hostuser", hello, {"GET": READ})

    @hookimpl
    def nodeagent_c2n_routes(self, host: Host) -> None:
        async def hello(req: C2NRequest) -> C2NResponse:
            return C2NResponse.json({"hello": True})

        host.add_c2n_route("GET", "/hostuser", hello)


@pytest.mark.asyncio
async def test_host_surface(tmp_path: Any) -> None:
    be = LocalBackend(tmp_path, features=[feat("hostuser", HostUser)])
    be.start()
    ext: HostUser = be.extensions.plugin("hostuser")
    host = ext.host
    assert host is not None and host is be.host
    # prefs are a copy: changing it changes nothing; edit_prefs persists and fires the hook
    p = host.prefs
    p.ShieldsUp = True
    assert be.prefs.ShieldsUp is False
    assert host.edit_prefs({"ShieldsUpSet": True, "ShieldsUp": True}).ShieldsUp is True
    assert be.prefs.ShieldsUp is True and ext.seen_prefs == [["ShieldsUp"]]
    assert host.self_node.Key == be.node_public_key and host.netmap is None
    assert host.tundev is None and host.engine is None
    # state keys persist across backends on the same state dir
    assert LocalBackend(tmp_path).host.read_state("hostuser/blob") == b"\x00kept"
    with pytest.raises(ValueError, match="state key"):
        host.write_state("../escape", b"")
    # routes only inside their hooks
    with pytest.raises(RuntimeError, match="nodeagent_localapi_routes"):
        host.add_localapi_route("late", ext.nodeagent_localapi_routes, None)
    added: list[str] = []
    be.collect_localapi_routes(lambda name, handler, methods: added.append(name))
    assert added == ["hostuser"]
    resp = await be.c2n.dispatch(C2NRequest("GET", "/hostuser"))
    assert resp.status == 200 and b"hello" in resp.body
    assert ("hostuser_up", "test gauge", {}, 1.0) in be.metric_samples()


def test_backend_does_not_load_the_http_stack() -> None:
    code = ("import sys, nodeagent.backend; "
            "bad = [m for m in sys.modules if m == 'aiohttp' or m.startswith('aiohttp.') "
            "or m.startswith('nodeagent.localapi')]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
