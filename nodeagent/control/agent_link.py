"""The agent's side of control: log in, follow the map stream, feed netmaps to the agent.

``ControlLink(backend, apply_netmap, wg_port, url, auth_key)`` binds a
:class:`~nodeagent.control.client.ControlClient` to one running agent:
registration with the auth key (persisting the login in the state file, so a restart keeps the
identity and addresses), the netmap stream applied through ``apply_netmap`` (the agent's), c2n
requests dispatched through the backend's c2n router, the node's endpoints (local addresses with the
WireGuard port, at most ``tailcfg.MAX_ENDPOINTS``) reported, and the backend state
(``NeedsLogin``/``Starting``/``Running``) kept true for ``/localapi/v0/status``. The hostname is
reported as a DNS label (``validate.hostname_label``), the form control accepts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nodeagent.control.client import (
    ControlClient,
    ControlError,
    ControlFatalError,
    c2n_handler_from_router,
)
from nodeagent.control.validate import hostname_label
from nodeagent.errors import ConfigError
from nodeagent.ipnext.api import ControlUnavailable
from nodeagent.magicsock.localaddrs import local_endpoints
from nodeagent.tailcfg import MAX_ENDPOINTS

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend
    from nodeagent.tailcfg import NetworkMap

log = logging.getLogger("nodeagent.control")


class ControlLink:
    def __init__(self, backend: LocalBackend, apply_netmap: Callable[[NetworkMap], None],
                 wg_port: int, server_url: str, auth_key: str | None) -> None:
        self.backend = backend
        self.apply_netmap = apply_netmap
        self.wg_port = wg_port  # 0: no data plane, no endpoints to report
        self.url = server_url
        self.auth_key = auth_key or ""
        self.client: ControlClient | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        backend = self.backend
        st = backend.state
        self.client = ControlClient(
            self.url, st.machine_key, st.node_key,
            hostname=hostname_label(backend.prefs.Hostname or socket.gethostname()),
            state=st.login, on_state_change=lambda: backend.store.save(st),
            disco_key=st.disco_key.public, endpoints=self._endpoints())
        backend.set_backend_state("Starting")
        try:
            await self.client.register(self.auth_key)
        except ControlError as e:
            backend.set_backend_state("NeedsLogin")
            raise ControlLoginError(str(e)) from None
        backend.store.save(st)
        self.task = asyncio.create_task(self._run(), name="control-stream")
        backend.control_link = self

    async def _run(self) -> None:
        assert self.client is not None
        backend = self.backend
        try:
            await self.client.run(self.apply_netmap, c2n_handler_from_router(backend.c2n),
                                  on_status=self._status)
        except ControlFatalError as e:
            log.error("control: %s", e)
            backend.set_health("control", str(e))
            backend.set_backend_state("NeedsLogin")

    def _status(self, state: str, detail: str) -> None:
        backend = self.backend
        if state == "connected":
            backend.set_health("control", None)
        else:
            backend.set_health("control", f"not connected to control: {detail}")

    def _endpoints(self) -> list[str]:
        """Local unicast addresses with the WireGuard port: direct paths peers can try."""
        return local_endpoints(self.wg_port)

    def update_endpoints(self, endpoints: list[str], home_derp: int) -> None:
        """Report new endpoints and home DERP region (from magicsock's endpoint updates)."""
        if self.client is not None:
            self.client.update_endpoints(endpoints[:MAX_ENDPOINTS])
            self.client.set_home_derp(home_derp)

    async def explain(self, src: str, dst: str, port: int, proto: int,
                      timeout: float = 5.0) -> dict[str, Any]:
        """Control's explanation of a flow this node took part in; ``ControlUnavailable``
        (one line) when control cannot be asked or refuses."""
        if self.client is None:
            raise ControlUnavailable("not logged in to control")
        try:
            return await self.client.explain(src, dst, port, proto, timeout)
        except ControlError as e:
            raise ControlUnavailable(str(e)) from None

    async def stop(self) -> None:
        if self.backend.control_link is self:
            self.backend.control_link = None
        if self.client is not None:
            await self.client.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None


class ControlLoginError(ConfigError):
    """Login was refused or the server could not be reached at start: one line."""

