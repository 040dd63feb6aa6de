"""A small tailnet in the test's own event loop, on loopback: our control server, one agent
logged in to it (the real ``Agent``: LocalAPI socket and control link, no data plane) and any
number of extra members (bare ``ControlClient`` node keys, e.g. to log in to a derper with).

``inproc_tailnet(tmp_path, members=("a", "b"))`` is an async context manager yielding an
:class:`InprocTailnet` whose agent is Running and sees every member as a peer; everything is
stopped and removed on exit. Processes run against the agent (Tailscale's CLI, a derper) must be
started with asyncio subprocesses (:func:`run_tailscale`): the agent is served by this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.agent import Agent, AgentOptions
from nodeagent.control.client import ControlClient
from nodeagent.control.server import ControlServer, ServerConfig
from nodeagent.keys import KeyPair
from nodeagent.tailcfg import NetworkMap
from tests.agentutil import public_tempdir

TAILSCALE_CLI = Path(__file__).resolve().parents[2] / "shared/tools/tailscale/tailscale"


@dataclass
class Member:
    """A tailnet member that is only a control client: its node key is what DERP sees."""

    name: str
    mk: KeyPair = field(default_factory=KeyPair.generate)
    nk: KeyPair = field(default_factory=KeyPair.generate)
    client: ControlClient | None = None
    task: asyncio.Task[None] | None = None

    @property
    def private_key(self) -> bytes:
        return bytes(self.nk.private)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 10)


@dataclass
class InprocTailnet:
    control: ControlServer
    agent: Agent
    authkey: str
    members: dict[str, Member]

    async def until_agent(self, pred: Callable[[NetworkMap], bool], timeout: float = 20.0,
                          what: str = "the agent's netmap") -> NetworkMap:
        """Poll (every 50 ms, bounded) until the agent's netmap satisfies ``pred``."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            nm = self.agent.backend.netmap
            if nm is not None and pred(nm):
                return nm
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.05)

    async def add_member(self, name: str) -> Member:
        m = Member(name)
        m.client = ControlClient(self.control.url, m.mk, m.nk, hostname=name, state={},
                                 backoff_min=0.05, backoff_max=0.5)
        await m.client.register(self.authkey)

        async def ignore(nm: NetworkMap) -> None:
            return None

        m.task = asyncio.get_running_loop().create_task(m.client.run(ignore))
        self.members[name] = m
        return m


@contextlib.asynccontextmanager
async def inproc_tailnet(tmp_path: Path, members: tuple[str, ...] = ()) -> \
        AsyncIterator[InprocTailnet]:
    srv = ControlServer(ServerConfig(state_dir=tmp_path / "control", keepalive=0.5))
    d = public_tempdir("na-inproc-")  # the socket must be reachable by other processes
    agent: Agent | None = None
    t: InprocTailnet | None = None
    try:
        url = await srv.start("127.0.0.1", 0)
        key, _ = srv.create_authkey(reusable=True)
        agent = Agent(AgentOptions(socket=os.path.join(d, "na.sock"),
                                   state_dir=os.path.join(d, "state"), hostname="agent",
                                   login_server=url, auth_key=key))
        await agent.start()
        t = InprocTailnet(srv, agent, key, {})
        for name in members:
            await t.add_member(name)
        names = set(members)
        await t.until_agent(lambda nm: names <= {p.HostName for p in nm.Peers}
                            and agent.backend.backend_state == "Running",
                            what=f"the agent running with peers {sorted(names)}")
        yield t
    finally:
        if t is not None:
            for m in t.members.values():
                await m.stop()
        if agent is not None:
            await agent.stop()
        await srv.stop()
        shutil.rmtree(d, ignore_errors=True)


async def run_tailscale(sock: str, *args: str, timeout: float = 30) -> tuple[int, str, str]:
    """Tailscale's real CLI against ``sock`` (an asyncio subprocess: this loop keeps serving
    the in-process agent meanwhile); (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(TAILSCALE_CLI), f"--socket={sock}", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"tailscale {' '.join(args)}: no exit within {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
