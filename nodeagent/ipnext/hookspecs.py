"""Hook specifications: the only way features learn about and extend the agent.

Backend hooks are called by the LocalBackend with each extension isolated: an exception raised by
one extension is logged and counted, and the other extensions and the agent carry on. Hooks run on
the agent's event loop thread; they must not block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend
    from nodeagent.c2n import C2NRouter
    from nodeagent.localapi.routes import LocalAPIRoutes
    from nodeagent.tailcfg import Node

PROJECT = "nodeagent"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BackendSpec:
    """Hooks fired by one LocalBackend for the extensions registered with it."""

    @hookspec
    def nodeagent_extension_init(self, backend: LocalBackend) -> None:
        """Fires once per backend, right after the extension is registered and before the agent
        serves anything. Set up per-backend state here. Raising disables this extension (logged
        once); the agent keeps running without it."""

    @hookspec
    def nodeagent_extension_shutdown(self, backend: LocalBackend) -> None:
        """Fires once when the backend shuts down, after the engine and tundev stopping hooks.
        Undo everything init installed (callbacks on the data plane included)."""

    @hookspec
    def nodeagent_self_change(self, backend: LocalBackend, node: Node) -> None:
        """Fires whenever control delivers a self node that differs from the previous one
        (addresses, key expiry or CapMap — Tailscale's OnSelfChange), and once for the first.
        ``node`` is the new self node; read node attributes with ``node.has_cap(name)``."""

    @hookspec
    def nodeagent_prefs_change(self, backend: LocalBackend, prefs: Any, changed: list[str]) -> None:
        """Fires after prefs were edited and persisted, with the names of the fields that
        changed (ipn.Prefs names, e.g. ``ConnRejectMaxEntries``)."""

    @hookspec
    def nodeagent_tundev_ready(self, backend: LocalBackend, wrapper: Any) -> None:
        """Fires when a TUN Wrapper is attached to the backend (again after each replacement).
        The wrapper exposes setters such as ``set_conn_reject_note(fn)``."""

    @hookspec
    def nodeagent_tundev_stopping(self, backend: LocalBackend, wrapper: Any) -> None:
        """Fires before the TUN Wrapper is detached or closed; remove anything installed on it."""

    @hookspec
    def nodeagent_engine_ready(self, backend: LocalBackend, engine: Any) -> None:
        """Fires when an engine is attached to the backend (again after each replacement)."""

    @hookspec
    def nodeagent_engine_stopping(self, backend: LocalBackend, engine: Any) -> None:
        """Fires before the engine is detached or closed; remove anything installed on it."""

    @hookspec
    def nodeagent_localapi_routes(self, backend: LocalBackend, routes: LocalAPIRoutes) -> None:
        """Fires once at start-up, after init: register LocalAPI endpoints with
        ``routes.add(name, handler, methods={"GET": "read"})`` (paths under /localapi/v0/); a
        handler taking a JSON body reads it with ``nodeagent.localapi.handlers.read_json_body``."""

    @hookspec
    def nodeagent_c2n_routes(self, backend: LocalBackend, routes: C2NRouter) -> None:
        """Fires once at start-up, after init: register control-to-node handlers with
        ``routes.add("GET", "/debug/x", handler)``."""

    @hookspec
    def nodeagent_metrics(
        self, backend: LocalBackend
    ) -> list[tuple[str, str, dict[str, str], float]]:
        """Fires when the LocalAPI renders metrics. Return samples as
        ``(name, help, labels, value)``; counters' names end in ``_total``."""


class CLISpec:
    """Hooks fired by the ``nodeagent`` command line (a separate process from the agent)."""

    @hookspec
    def nodeagent_cli_commands(self, cli: Any) -> None:
        """Fires once when the CLI builds its parser: add commands with
        ``cli.add_command(("debug", "rejects"), help=..., setup=fn(parser), run=fn(args, ctx))``.
        Commands talk to the agent only through ``ctx.localapi`` (the LocalAPI client)."""
