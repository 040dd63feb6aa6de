"""Running the agent: build the LocalBackend, serve the LocalAPI, stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

from nodeagent.backend import LocalBackend
from nodeagent.localapi.server import LocalAPIServer

log = logging.getLogger("nodeagent")

DEFAULT_STATE_DIR = "/var/lib/nodeagent"


@dataclass
class AgentOptions:
    socket: str
    state_dir: str = DEFAULT_STATE_DIR
    hostname: str | None = None
    tun: str | None = None  # TUN device name; None runs without a data plane
    port: int = 41641  # WireGuard UDP port (0 picks a free one)
    netmap_file: str | None = None  # a static netmap (JSON) instead of a control server
    login_server: str | None = None
    auth_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Agent:
    """One running agent: backend + LocalAPI (+ data plane and control once configured)."""

    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.backend = LocalBackend(opts.state_dir, hostname=opts.hostname)
        self.localapi = LocalAPIServer(self.backend, opts.socket)
        self.stopped = asyncio.Event()
        self.dataplane: Any = None
        self.control: Any = None

    async def start(self) -> None:
        self.backend.start()
        await self.localapi.start()
        try:
            if self.opts.tun:
                self._start_dataplane()
            if self.opts.netmap_file:
                self.apply_netmap(load_netmap_file(self.opts.netmap_file))
            if self.opts.login_server:
                await self._start_control()
        except BaseException:
            await self.stop()
            raise
        log.info("nodeagent %s: LocalAPI on %s, node key %s",
                 self.backend.capability_version, self.opts.socket, self.backend.node_public_key)

    def _start_dataplane(self) -> None:
        from nodeagent.dataplane import DataPlane
        from nodeagent.engine.wgtransport import WireGuardTransport

        transport = WireGuardTransport(self.backend.state.node_key.private, port=self.opts.port)
        dp = DataPlane(self.backend, transport, tun_name=self.opts.tun or "")
        loop = asyncio.get_running_loop()
        dp.start(loop)
        assert dp.engine is not None
        transport.start(loop, dp.engine.deliver_from)
        self.dataplane = dp
        log.info("WireGuard: listening on UDP port %d", transport.port)

    async def _start_control(self) -> None:
        from nodeagent.control.agent_link import ControlLink

        self.control = ControlLink(self, self.opts.login_server or "", self.opts.auth_key)
        await self.control.start()

    def apply_netmap(self, nm: Any) -> None:
        """A netmap from control (or the static file): backend first, then the data plane."""
        self.backend.set_netmap(nm)
        if self.dataplane is not None:
            self.dataplane.apply_netmap(nm)

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.dataplane is not None:
            self.dataplane.close()
            self.dataplane = None
        await self.localapi.stop()
        self.backend.shutdown()
        self.stopped.set()


class ConfigError(Exception):
    """A bad option or file given to the agent: one line, printed by the CLI."""


def load_netmap_file(path: str) -> Any:
    """A netmap in the tailcfg JSON shape (SelfNode, Peers, PacketFilter, DERPMap)."""
    import json

    from nodeagent.tailcfg import WireError, netmap_from_wire

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"netmap file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"netmap file {path}: not JSON: {e}") from None
    try:
        return netmap_from_wire(data)
    except WireError as e:
        raise ConfigError(f"netmap file {path}: {e}") from None


async def run_agent(opts: AgentOptions) -> int:
    agent = Agent(opts)
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("nodeagent: shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await agent.stop()
    return 0


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
