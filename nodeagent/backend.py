"""LocalBackend: the agent's centre. Owns prefs, persisted identity, the netmap and self node,
the data-plane objects (TUN wrapper, engine), and fires the extension hooks with a
:class:`BackendHost` — the :class:`~nodeagent.ipnext.api.Host` extensions see.

The backend is the domain side: it imports no HTTP library and no adapter. The LocalAPI server
owns its route table and asks the backend (:meth:`LocalBackend.collect_localapi_routes`) for the
features' routes; the c2n router is transport-neutral and lives here. Everything runs on the
agent's event loop thread.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from nodeagent.c2n import C2NRouter
from nodeagent.ipn.prefs import Prefs, apply_masked, check_hostname
from nodeagent.ipn.state import PersistedState, StateStore
from nodeagent.ipnext.api import (
    C2NHandler,
    ConnRejectObservable,
    ControlUnavailable,
    LocalAPIHandler,
    Sample,
)
from nodeagent.ipnext.feature import InstalledFeature
from nodeagent.ipnext.host import ExtensionHost
from nodeagent.keys import DISCO_PREFIX, MACHINE_PREFIX, NODE_PREFIX, parse_public
from nodeagent.tailcfg import NetworkMap, Node, to_wire
from nodeagent.version import CAPABILITY_VERSION

log = logging.getLogger("nodeagent.backend")

# Backend states, as Tailscale's ipn.State renders them.
NO_STATE = "NoState"
NEEDS_LOGIN = "NeedsLogin"
STOPPED = "Stopped"
STARTING = "Starting"
RUNNING = "Running"


class LocalBackend:
    capability_version = CAPABILITY_VERSION

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        features: Iterable[InstalledFeature] | None = None,
        hostname: str | None = None,
        strict_hooks: bool | None = None,
    ) -> None:
        if hostname:
            check_hostname(hostname)  # PrefsError: the caller's option is bad, not the state
        self.store = StateStore(state_dir)
        self.state: PersistedState = self.store.load_or_create()  # StateError on a bad file
        self.prefs = Prefs.from_dict(self.state.prefs)  # checked by load: cannot fail here
        if hostname:
            self.prefs.Hostname = hostname
        self.netmap: NetworkMap | None = None
        self.self_node = Node(
            Key=self.node_public_key,
            Machine=self.state.machine_key.public_text(MACHINE_PREFIX),
            DiscoKey=self.state.disco_key.public_text(DISCO_PREFIX),
            HostName=self.prefs.Hostname or os.uname().nodename,
        )
        self.backend_state = NEEDS_LOGIN
        self.wrapper: Any = None
        self.engine: Any = None
        self.paths: Any = None  # magicsock's PathLayer (pings, home region), with the data plane
        self.control_link: Any = None  # the ControlLink while logged in to control
        self.c2n = C2NRouter()
        self.extensions = ExtensionHost(features, strict=strict_hooks)
        self.host = BackendHost(self)
        self._health: dict[str, str] = {}
        self._started = False
        self._self_wire: Any = None
        # Called with the new state on every backend-state change (the LocalAPI's IPN bus).
        self.state_listeners: list[Callable[[str], None]] = []
        # Called with the changed pref names after an edit is persisted (the agent, to bring
        # the node down or up on WantRunning).
        self.prefs_listeners: list[Callable[[list[str]], None]] = []

    # --- identity -------------------------------------------------------------------------
    @property
    def node_public_key(self) -> str:
        return self.state.node_key.public_text(NODE_PREFIX)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load extensions, run their init, and collect their c2n routes."""
        if self._started:
            return
        self._started = True
        self.extensions.load()
        self.extensions.init(self.host)
        with self.host.accepting("c2n", self.c2n.add):
            self.extensions.fire("nodeagent_c2n_routes", host=self.host)

    def collect_localapi_routes(self, add: Callable[[str, LocalAPIHandler,
                                                     Mapping[str, str] | None], None]) -> None:
        """Ask the extensions for their LocalAPI endpoints; ``add(name, handler, methods)``
        registers one with the server that calls this (after :meth:`start`)."""
        with self.host.accepting("localapi", add):
            self.extensions.fire("nodeagent_localapi_routes", host=self.host)

    def metric_samples(self) -> list[Sample]:
        """Samples of the data plane and of every extension's registered collector."""
        samples: list[Sample] = []
        for obj in (self.wrapper, self.engine):
            fn: Any = getattr(obj, "metrics_samples", None)
            if fn is not None:
                samples.extend(fn())
        for collect in list(self.host.metric_collectors):
            try:
                samples.extend(collect())
            except Exception as e:
                self.extensions.hook_errors += 1
                log.error("metrics collector %r raised %s: %s", collect, type(e).__name__, e)
        samples.append(("nodeagent_extension_hook_errors_total",
                        "Exceptions raised by extension hooks and metric collectors", {},
                        self.extensions.hook_errors))
        return samples

    def shutdown(self) -> None:
        if not self._started:
            return
        self.set_engine(None)
        self.set_tundev(None)
        self.extensions.shutdown()
        self._started = False

    # --- netmap and self node -------------------------------------------------------------
    def set_netmap(self, nm: NetworkMap) -> None:
        """Install a new netmap; fires the self-change hook when the self node differs."""
        self.netmap = nm
        new_self = nm.SelfNode
        if not new_self.Key:
            new_self.Key = self.node_public_key
        wire = to_wire(new_self)
        self.set_backend_state(RUNNING if self.prefs.WantRunning else STOPPED)
        self._remember_login(nm)
        if wire != self._self_wire:
            self._self_wire = wire
            self.self_node = new_self
            self.extensions.fire("nodeagent_self_change", host=self.host, node=new_self)

    def set_backend_state(self, state: str) -> None:
        """Set the state; the state listeners hear of a change."""
        if state != self.backend_state:
            self.backend_state = state
            self.notify_state()

    def notify_state(self) -> None:
        """Tell the state listeners the current state (also when it did not change)."""
        for listener in list(self.state_listeners):
            listener(self.backend_state)

    def _remember_login(self, nm: NetworkMap) -> None:
        """Persist who this node is logged in as (Tailscale's persist: user profile and stable
        node ID, for ``Config`` in the prefs) when the netmap says something new."""
        me = nm.SelfNode
        up = nm.UserProfiles.get(me.User)
        summary: dict[str, Any] = {"NodeID": me.StableID or (str(me.ID) if me.ID else "")}
        if up is not None:
            summary["UserProfile"] = {"ID": up.ID, "LoginName": up.LoginName,
                                      "DisplayName": up.DisplayName,
                                      "ProfilePicURL": up.ProfilePicURL}
        login = self.state.login
        if all(login.get(k) == v for k, v in summary.items()):
            return
        login.update(summary)
        try:
            self.store.save(self.state)
        except Exception as e:  # the login stays in memory; the next netmap tries again
            log.warning("cannot persist the login summary: %s", e)

    # --- data plane attachment ------------------------------------------------------------
    def set_tundev(self, wrapper: Any) -> None:
        if self.wrapper is wrapper:
            return
        if self.wrapper is not None:
            self.extensions.fire("nodeagent_tundev_stopping", host=self.host, wrapper=self.wrapper)
        self.wrapper = wrapper
        if wrapper is not None:
            self.extensions.fire("nodeagent_tundev_ready", host=self.host, wrapper=wrapper)

    def set_engine(self, engine: Any) -> None:
        if self.engine is engine:
            return
        if self.engine is not None:
            self.extensions.fire("nodeagent_engine_stopping", host=self.host, engine=self.engine)
        self.engine = engine
        if engine is not None:
            self.extensions.fire("nodeagent_engine_ready", host=self.host, engine=engine)

    def peer_stats(self, node_key: str) -> dict[str, Any]:
        """Engine figures for one peer (LastHandshake, RxBytes, TxBytes, CurAddr, ...)."""
        eng = self.engine
        if eng is None or not hasattr(eng, "peer_stats"):
            return {}
        return eng.peer_stats(node_key) or {}

    # --- prefs ----------------------------------------------------------------------------
    def edit_prefs(self, body: Any, *, protected: Collection[str] = ()) -> Prefs:
        """Apply masked prefs (PrefsError on bad input, nothing changed) and persist them.

        Changing a field named in ``protected`` raises PrefsPermissionError, nothing changed.
        """
        trial = Prefs(**vars(self.prefs))
        changed = apply_masked(trial, body, protected=protected)
        if changed:
            old_state = self.state.prefs
            self.state.prefs = {k: v for k, v in vars(trial).items()}
            try:
                self.store.save(self.state)
            except Exception:
                self.state.prefs = old_state
                raise
            self.prefs = trial
            self._apply_prefs(changed)
        return self.prefs

    def _apply_prefs(self, changed: list[str]) -> None:
        if "WantRunning" in changed:
            if not self.prefs.WantRunning:
                self.set_backend_state(STOPPED)
            else:
                self.set_backend_state(STARTING if self.netmap is not None else NEEDS_LOGIN)
        if "ShieldsUp" in changed and self.wrapper is not None:
            setter = getattr(self.wrapper, "set_shields_up", None)
            if setter is not None:
                setter(self.prefs.ShieldsUp)
        if "FastFailure" in changed and self.engine is not None:
            setter = getattr(self.engine, "set_fast_failure", None)
            if setter is not None:
                setter(self.prefs.FastFailure)
        self.extensions.fire("nodeagent_prefs_change", host=self.host,
                             prefs=copy.deepcopy(self.prefs), changed=changed)
        for listener in list(self.prefs_listeners):
            listener(changed)

    # --- health ---------------------------------------------------------------------------
    def set_health(self, key: str, problem: str | None) -> None:
        if problem:
            self._health[key] = problem
        else:
            self._health.pop(key, None)

    def health(self) -> list[str]:
        return [self._health[k] for k in sorted(self._health)]


class BackendHost:
    """The :class:`~nodeagent.ipnext.api.Host` of one LocalBackend (see there for each member)."""

    def __init__(self, backend: LocalBackend) -> None:
        self._b = backend
        self._sinks: dict[str, Callable[..., None]] = {}
        self.metric_collectors: list[Callable[[], Iterable[Sample]]] = []

    @property
    def prefs(self) -> Prefs:
        return copy.deepcopy(self._b.prefs)

    def edit_prefs(self, masked: Mapping[str, Any]) -> Prefs:
        return copy.deepcopy(self._b.edit_prefs(dict(masked)))

    @property
    def self_node(self) -> Node:
        return self._b.self_node

    @property
    def netmap(self) -> NetworkMap | None:
        return self._b.netmap

    @property
    def tundev(self) -> ConnRejectObservable | None:
        return self._b.wrapper  # type: ignore[no-any-return]

    @property
    def engine(self) -> ConnRejectObservable | None:
        return self._b.engine  # type: ignore[no-any-return]

    def read_state(self, key: str) -> bytes | None:
        return self._b.store.read_extension(key)

    def write_state(self, key: str, data: bytes) -> None:
        self._b.store.write_extension(key, data)

    def accepting(self, kind: str, add: Callable[..., None]) -> _Accepting:
        """While the returned context is open, ``add_<kind>_route`` calls go to ``add``."""
        return _Accepting(self._sinks, kind, add)

    def _sink(self, kind: str) -> Callable[..., None]:
        sink = self._sinks.get(kind)
        if sink is None:
            raise RuntimeError(f"add_{kind}_route may only be called from the "
                               f"nodeagent_{kind}_routes hook")
        return sink

    def add_localapi_route(self, name: str, handler: LocalAPIHandler,
                           methods: Mapping[str, str] | None = None) -> None:
        self._sink("localapi")(name, handler, dict(methods) if methods is not None else None)

    def add_c2n_route(self, method: str, path: str, handler: C2NHandler) -> None:
        self._sink("c2n")(method, path, handler)

    def register_metrics(self, collect: Callable[[], Iterable[Sample]]) -> None:
        self.metric_collectors.append(collect)

    async def explain_flow(self, src: str, dst: str, port: int, proto: int,
                           timeout: float = 5.0) -> dict[str, Any]:
        link = self._b.control_link
        if link is None:
            raise ControlUnavailable("this node is not logged in to a control server")
        return await link.explain(src, dst, port, proto, timeout)  # type: ignore[no-any-return]

    def peer_path_status(self, peer_ip: str) -> dict[str, Any] | None:
        b = self._b
        nm = b.netmap
        peer = next((p for p in (nm.Peers if nm is not None else [])
                     if peer_ip in p.tailscale_ips()), None)
        if peer is None:
            return None
        stats = b.peer_stats(peer.Key)
        out: dict[str, Any] = {
            "Name": peer.HostName or peer.Name, "Online": peer.Online,
            "HasDiscoKey": bool(peer.DiscoKey), "HomeDERP": peer.HomeDERP,
            "SelfHomeDERP": b.self_node.HomeDERP, "InEngine": bool(stats),
            "LastHandshake": float(stats.get("LastHandshake") or 0.0),
            "CurAddr": str(stats.get("CurAddr") or ""), "Active": bool(stats.get("Active")),
        }
        paths = b.paths
        if paths is not None:
            try:
                ms = paths.peer_status(parse_public(peer.Key, NODE_PREFIX))
            except ValueError:
                ms = None
            if ms:
                out["CurAddr"] = ms.get("CurAddr") or out["CurAddr"]
                out["Active"] = bool(ms.get("Active")) or out["Active"]
        return out


class _Accepting:
    def __init__(self, sinks: dict[str, Callable[..., None]], kind: str,
                 add: Callable[..., None]) -> None:
        self._sinks, self._kind, self._add = sinks, kind, add

    def __enter__(self) -> None:
        self._sinks[self._kind] = self._add

    def __exit__(self, *exc: object) -> None:
        self._sinks.pop(self._kind, None)
