"""LocalBackend: the agent's centre. Owns prefs, persisted identity, the netmap and self node,
the data-plane objects (TUN wrapper, engine), and fires the extension hooks.

Everything here runs on the agent's event loop thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable
from typing import Any

from nodeagent.c2n import C2NRouter
from nodeagent.ipn.prefs import Prefs, apply_masked, check_hostname
from nodeagent.ipn.state import PersistedState, StateStore
from nodeagent.ipnext.feature import InstalledFeature
from nodeagent.ipnext.host import ExtensionHost
from nodeagent.keys import DISCO_PREFIX, MACHINE_PREFIX, NODE_PREFIX
from nodeagent.localapi.routes import LocalAPIRoutes
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
        self.localapi_routes = LocalAPIRoutes()
        self.c2n = C2NRouter()
        self.extensions = ExtensionHost(features)
        self._health: dict[str, str] = {}
        self._started = False
        self._self_wire: Any = None

    # --- identity -------------------------------------------------------------------------
    @property
    def node_public_key(self) -> str:
        return self.state.node_key.public_text(NODE_PREFIX)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load extensions, run their init, and collect LocalAPI and c2n routes."""
        if self._started:
            return
        self._started = True
        from nodeagent.localapi.handlers import register_core_routes

        register_core_routes(self, self.localapi_routes)
        self.extensions.load()
        self.extensions.init(self)
        self.extensions.fire("nodeagent_localapi_routes", backend=self, routes=self.localapi_routes)
        self.extensions.fire("nodeagent_c2n_routes", backend=self, routes=self.c2n)

    def shutdown(self) -> None:
        if not self._started:
            return
        self.set_engine(None)
        self.set_tundev(None)
        self.extensions.fire("nodeagent_extension_shutdown", backend=self)
        self._started = False

    # --- netmap and self node -------------------------------------------------------------
    def set_netmap(self, nm: NetworkMap) -> None:
        """Install a new netmap; fires the self-change hook when the self node differs."""
        self.netmap = nm
        new_self = nm.SelfNode
        if not new_self.Key:
            new_self.Key = self.node_public_key
        wire = to_wire(new_self)
        self.backend_state = RUNNING
        if wire != self._self_wire:
            self._self_wire = wire
            self.self_node = new_self
            self.extensions.fire("nodeagent_self_change", backend=self, node=new_self)

    def set_backend_state(self, state: str) -> None:
        self.backend_state = state

    # --- data plane attachment ------------------------------------------------------------
    def set_tundev(self, wrapper: Any) -> None:
        if self.wrapper is wrapper:
            return
        if self.wrapper is not None:
            self.extensions.fire("nodeagent_tundev_stopping", backend=self, wrapper=self.wrapper)
        self.wrapper = wrapper
        if wrapper is not None:
            self.extensions.fire("nodeagent_tundev_ready", backend=self, wrapper=wrapper)

    def set_engine(self, engine: Any) -> None:
        if self.engine is engine:
            return
        if self.engine is not None:
            self.extensions.fire("nodeagent_engine_stopping", backend=self, engine=self.engine)
        self.engine = engine
        if engine is not None:
            self.extensions.fire("nodeagent_engine_ready", backend=self, engine=engine)

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
        if "ShieldsUp" in changed and self.wrapper is not None:
            setter = getattr(self.wrapper, "set_shields_up", None)
            if setter is not None:
                setter(self.prefs.ShieldsUp)
        if "FastFailure" in changed and self.engine is not None:
            setter = getattr(self.engine, "set_fast_failure", None)
            if setter is not None:
                setter(self.prefs.FastFailure)
        self.extensions.fire("nodeagent_prefs_change", backend=self, prefs=self.prefs,
                             changed=changed)

    # --- health ---------------------------------------------------------------------------
    def set_health(self, key: str, problem: str | None) -> None:
        if problem:
            self._health[key] = problem
        else:
            self._health.pop(key, None)

    def health(self) -> list[str]:
        return [self._health[k] for k in sorted(self._health)]
