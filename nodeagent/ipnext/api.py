"""What an extension may touch: the :class:`Host` and the data-plane observer interfaces.

Every hook receives the Host (never the LocalBackend itself), the counterpart of Tailscale's
``ipnext.Host``/``SafeBackend``: a small, written-down surface that a second feature author can
rely on and that tests can fake. Each member says when it may be called. Everything runs on the
agent's event loop thread; nothing here may block.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from nodeagent.c2n import C2NRequest, C2NResponse
    from nodeagent.ipn.prefs import Prefs
    from nodeagent.tailcfg import NetworkMap, Node

# A metrics sample: (name, help, labels, value); counters' names end in ``_total``.
Sample = tuple[str, str, dict[str, str], float]
# The data plane's rejection observer: (direction, proto, ip version, src ip, src port, dst ip,
# dst port, reason, source, maybe_broken). Direction, reason and source use the connreject
# vocabulary; addresses are the packet parser's ints, so nothing is formatted on the data path
# unless the receiver is recording. Called on the hot path: keep it cheap.
NoteFn = Callable[[str, int, int, int, int, int, int, str, str, bool], None]
# A LocalAPI handler takes an ``aiohttp.web.Request`` and returns a ``web.StreamResponse``; the
# types stay opaque here so that the core's domain side never imports the HTTP library.
LocalAPIHandler = Callable[[Any], Awaitable[Any]]
C2NHandler = Callable[["C2NRequest"], Awaitable["C2NResponse"]]

READ = "read"
WRITE = "write"


class ControlUnavailable(Exception):
    """Control could not be asked or refused to answer; the message is one line."""


class ConnRejectObservable(Protocol):
    """A data-plane object that reports rejected connections (the TUN Wrapper, the engine)."""

    def set_conn_reject_note(self, fn: NoteFn | None) -> None:
        """Install (or with None remove) the rejection observer. Any time on the loop thread."""


class Host(Protocol):
    """The agent as an extension sees it. One Host per LocalBackend, shared by its extensions."""

    @property
    def prefs(self) -> Prefs:
        """A copy of the current prefs (changing it changes nothing). Any time."""

    def edit_prefs(self, masked: Mapping[str, Any]) -> Prefs:
        """Apply masked prefs (``{"ShieldsUpSet": true, "ShieldsUp": true}``) and persist them;
        ``PrefsError`` on bad input, nothing changed. Fires ``nodeagent_prefs_change``. Any time
        after init, but not from inside ``nodeagent_prefs_change`` itself."""

    @property
    def self_node(self) -> Node:
        """The current self node (addresses, CapMap: ``node.has_cap(name)``). Any time."""

    @property
    def netmap(self) -> NetworkMap | None:
        """The current network map, None before the first one arrives. Any time."""

    @property
    def tundev(self) -> ConnRejectObservable | None:
        """The TUN Wrapper's observer setters, None while there is no data plane. Any time."""

    @property
    def engine(self) -> ConnRejectObservable | None:
        """The engine's observer setters, None while there is no data plane. Any time."""

    def read_state(self, key: str) -> bytes | None:
        """The extension's own persisted bytes under ``key`` (``<feature>/<name>``, lowercase
        letters, digits, ``-`` and ``_``), None if never written. Any time after init."""

    def write_state(self, key: str, data: bytes) -> None:
        """Persist ``data`` under ``key`` atomically, readable by root only. Any time after
        init; ``OSError`` if the state directory cannot be written."""

    def add_localapi_route(self, name: str, handler: LocalAPIHandler,
                           methods: Mapping[str, str] | None = None) -> None:
        """Serve ``/localapi/v0/<name>``; ``methods`` maps HTTP methods to ``READ``/``WRITE``
        (default ``{"GET": READ}``). Only inside ``nodeagent_localapi_routes``. A handler
        taking a JSON body reads it with ``nodeagent.localapi.handlers.read_json_body``; a
        streaming handler ends when ``nodeagent.localapi.routes.server_closing(request)`` is
        set (the server is stopping)."""

    def add_c2n_route(self, method: str, path: str, handler: C2NHandler) -> None:
        """Answer control-to-node ``method path`` requests. Only inside
        ``nodeagent_c2n_routes``."""

    def register_metrics(self, collect: Callable[[], Iterable[Sample]]) -> None:
        """Add ``collect`` to what ``GET /localapi/v0/metrics`` renders; it is called per scrape.
        During ``nodeagent_extension_init``; an exception from ``collect`` is counted in
        ``nodeagent_extension_hook_errors_total`` and the scrape goes on."""

    async def explain_flow(self, src: str, dst: str, port: int, proto: int,
                           timeout: float = 5.0) -> dict[str, Any]:
        """Ask control why its tailnet policy allows or denies the flow ``src`` → ``dst``
        (IPs; this node must be one of them) on ``port``/``proto``: the JSON of
        ``nodeagent.control.explain`` (``Allowed``, ``Sentence``, ``Matches``, ``NearestMiss``,
        ``Suggestion``...). Any time after init, from a coroutine on the loop (LocalAPI or c2n
        handlers); waits at most ``timeout`` seconds. :class:`ControlUnavailable` when the node
        is not logged in, control is unreachable or slow, or control refuses."""

    def peer_path_status(self, peer_ip: str) -> dict[str, Any] | None:
        """What the agent knows about the path to the peer owning ``peer_ip`` (a tailnet IP):
        ``Name``, ``Online`` (control's view, None if unknown), ``HasDiscoKey``, ``HomeDERP``
        (the peer's region, 0 = none), ``SelfHomeDERP``, ``InEngine`` (a WireGuard peer here),
        ``LastHandshake`` (Unix time, 0 = never), ``CurAddr`` (the direct address in use, "" for
        none) and ``Active``. None when no peer in the netmap owns the address. Any time."""
