"""Hook specifications: the only way features learn about and extend the agent.

Backend hooks are fired through pluggy's hook caller (``pm.hook.<name>(...)``), so call order,
``tryfirst``/``trylast`` and hook wrappers behave as pluggy documents: implementations run last
registered first. Every hook receives the :class:`~nodeagent.ipnext.api.Host`, never the
LocalBackend. Each extension's implementations are isolated: one that raises is logged once and
its extension disabled (its shutdown hook is still offered the chance to clean up); the other
extensions and the agent carry on. Hook wrappers (``wrapper=True``) are not isolated. Hooks run on
the agent's event loop thread; they must not block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from nodeagent.cli.registry import CLIRegistry
    from nodeagent.ipn.prefs import Prefs
    from nodeagent.ipnext.api import ConnRejectObservable, Host
    from nodeagent.tailcfg import Node

PROJECT = "nodeagent"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class BackendSpec:
    """Hooks fired by one LocalBackend for the extensions registered with it."""

    @hookspec
    def nodeagent_extension_init(self, host: Host) -> None:
        """Fires once per backend when the agent starts, before it serves anything. Set up
        per-backend state here; ``host.register_metrics`` belongs here. Raising disables this
        extension (logged once); the agent keeps running without it."""

    @hookspec
    def nodeagent_extension_shutdown(self, host: Host) -> None:
        """Fires once when the backend shuts down, after the engine and tundev stopping hooks,
        extension by extension in the reverse of the order their init ran. Undo everything init
        installed (callbacks on the data plane included)."""

    @hookspec
    def nodeagent_self_change(self, host: Host, node: Node) -> None:
        """Fires whenever control delivers a self node that differs from the previous one
        (addresses, key expiry or CapMap — Tailscale's OnSelfChange), and once for the first.
        ``node`` is the new self node; read node attributes with ``node.has_cap(name)``."""

    @hookspec
    def nodeagent_prefs_change(self, host: Host, prefs: Prefs, changed: list[str]) -> None:
        """Fires after prefs were edited and persisted, with the names of the fields that
        changed (ipn.Prefs names, e.g. ``ConnRejectMaxEntries``). ``prefs`` is a copy."""

    @hookspec
    def nodeagent_tundev_ready(self, host: Host, wrapper: ConnRejectObservable) -> None:
        """Fires when a TUN Wrapper is attached to the backend (again after each replacement).
        Install observers with ``wrapper.set_conn_reject_note(fn)``."""

    @hookspec
    def nodeagent_tundev_stopping(self, host: Host, wrapper: ConnRejectObservable) -> None:
        """Fires before the TUN Wrapper is detached or closed; remove what you installed."""

    @hookspec
    def nodeagent_engine_ready(self, host: Host, engine: ConnRejectObservable) -> None:
        """Fires when an engine is attached to the backend (again after each replacement)."""

    @hookspec
    def nodeagent_engine_stopping(self, host: Host, engine: ConnRejectObservable) -> None:
        """Fires before the engine is detached or closed; remove what you installed."""

    @hookspec
    def nodeagent_localapi_routes(self, host: Host) -> None:
        """Fires once when the LocalAPI server starts, after init: register endpoints with
        ``host.add_localapi_route(name, handler, {"GET": READ})`` (under /localapi/v0/)."""

    @hookspec
    def nodeagent_c2n_routes(self, host: Host) -> None:
        """Fires once at start-up, after init: register control-to-node handlers with
        ``host.add_c2n_route("GET", "/debug/x", handler)``."""


class CLISpec:
    """Hooks fired by the ``nodeagent`` command line (a separate process from the agent)."""

    @hookspec
    def nodeagent_cli_commands(self, cli: CLIRegistry) -> None:
        """Fires once when the CLI builds its parser: add commands with
        ``cli.add_command(("debug", "rejects"), help=..., setup=fn(parser), run=fn(args, ctx))``.
        Commands talk to the agent only through ``ctx.localapi`` (the LocalAPI client)."""
