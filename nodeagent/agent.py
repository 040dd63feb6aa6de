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
    extra: dict[str, Any] = field(default_factory=dict)


class Agent:
    """One running agent: backend + LocalAPI (+ data plane and control once configured)."""

    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.backend = LocalBackend(opts.state_dir, hostname=opts.hostname)
        self.localapi = LocalAPIServer(self.backend, opts.socket)
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        self.backend.start()
        await self.localapi.start()
        log.info("nodeagent %s: LocalAPI on %s, node key %s",
                 self.backend.capability_version, self.opts.socket, self.backend.node_public_key)

    async def stop(self) -> None:
        await self.localapi.stop()
        self.backend.shutdown()
        self.stopped.set()


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
