"""The derper's client admission against real peers on loopback: ``--verify-clients`` asking a
real agent (logged in to our control server) over its LocalAPI socket, and the
``--verify-client-url`` webhook served by a small aiohttp app.

Covers: a tailnet member's key and the agent's own key are admitted; a stranger is refused and
its client sees why (the Health frame's text in the ConnectionError); refusals are counted by
reason in /debug/varz and /debug/vars and logged with the key prefix and source; a node deleted
from control is refused once the agent's netmap has dropped it (within the answer cache's TTL);
an unreachable agent fails closed with one log line (``derper`` as a process); the webhook's
allow / deny / non-200 / fail-open / fail-closed, and both checks together.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from nacl.public import PrivateKey

from tests.derptls import free_port, inproc_derpers
from tests.inproc_tailnet import InprocTailnet, inproc_tailnet

pytestmark = [pytest.mark.feature("derper"), pytest.mark.timeout(90)]

UNKNOWN = "does not admit this node key: not in its tailnet"


@pytest_asyncio.fixture
async def derper_factory() -> AsyncIterator[Callable[..., Any]]:
    async with inproc_derpers(stun=False, http_port=-1, dev=False,
                              certmode="letsencrypt") as make:
        yield make


@pytest_asyncio.fixture
async def tailnet(tmp_path: Path) -> AsyncIterator[InprocTailnet]:
    async with inproc_tailnet(tmp_path, members=("member", "victim")) as t:
        yield t


def derp_url(d: Any) -> str:
    return f"http://127.0.0.1:{d.main_port}/derp"


async def login(d: Any, key: bytes) -> Any:
    """Log in to derper ``d`` with ``key``: the client when admitted; the ConnectionError
    (whose text carries the refusal's reason) when refused."""
    from nodeagent.derp.client import DerpClient

    try:
        c = await DerpClient.connect(derp_url(d), key, timeout=15)
    except (ConnectionError, asyncio.IncompleteReadError) as e:
        return e
    return c


async def admitted(d: Any, key: bytes) -> bool:
    r = await login(d, key)
    if isinstance(r, BaseException):
        return False
    assert r.server_info["version"] == 2
    await r.close()
    return True


async def debug(d: Any, path: str) -> str:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{d.main_port}/debug/{path}") as r:
        assert r.status == 200
        return await r.text()


@pytest.mark.asyncio
async def test_members_admitted_strangers_refused(
        tailnet: InprocTailnet, derper_factory: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="derper.verify")
    d = await derper_factory(verify_clients=True, socket=tailnet.agent.opts.socket)
    assert await admitted(d, tailnet.members["member"].private_key)
    assert await admitted(d, tailnet.agent.backend.state.node_key.private)  # the agent itself
    stranger = bytes(PrivateKey.generate())
    err = await login(d, stranger)
    assert isinstance(err, ConnectionError) and UNKNOWN in str(err), err
    prefix = bytes(PrivateKey(stranger).public_key).hex()[:5]
    assert any(f"[{prefix}]" in r.getMessage() and "127.0.0.1" in r.getMessage()
               and UNKNOWN in r.getMessage() for r in caplog.records), caplog.text
    varz = await debug(d, "varz")
    assert 'derper_clients_refused_total{reason="unknown_key"} 1.0' in varz
    assert "derper_clients_admitted_total 2.0" in varz
    st = json.loads(await debug(d, "vars"))
    assert st["admission"]["refused"]["unknown_key"] == 1
    assert st["closed"]["not_admitted"] == 1
    # A second try of the stranger is answered from the cache: no new whois request.
    reqs = st["admission"]["agent_requests"]
    assert not await admitted(d, stranger)
    assert json.loads(await debug(d, "vars"))["admission"]["agent_requests"] == reqs


@pytest.mark.asyncio
async def test_deleted_node_refused_after_netmap_update(
        tailnet: InprocTailnet, derper_factory: Callable[..., Any]) -> None:
    from nodeagent_derper.verify import ALLOW_TTL

    d = await derper_factory(verify_clients=True, socket=tailnet.agent.opts.socket)
    victim = tailnet.members["victim"]
    assert await admitted(d, victim.private_key)  # and its "allow" is now cached
    await tailnet.control.delete_node("victim")
    await tailnet.until_agent(lambda nm: all(p.HostName != "victim" for p in nm.Peers),
                              what="the agent's netmap without the deleted node")
    loop = asyncio.get_running_loop()
    seen = loop.time()
    while True:  # the cached "allow" may hold for up to ALLOW_TTL
        r = await login(d, victim.private_key)
        if isinstance(r, BaseException):
            assert UNKNOWN in str(r)
            break
        await r.close()
        assert loop.time() - seen < ALLOW_TTL + 3, "deleted node still admitted"
        await asyncio.sleep(0.2)
    assert await admitted(d, tailnet.members["member"].private_key)


@pytest.mark.asyncio
async def test_unreachable_agent_fails_closed_with_one_log_line(tmp_path: Path) -> None:
    """``derper`` as a process (the command-line wiring): --socket names no agent."""
    from nodeagent.agent import Agent, AgentOptions

    port = free_port()
    sock = str(tmp_path / "agent.sock")
    errlog = tmp_path / "derper.err"
    with open(errlog, "w") as ef:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nodeagent_derper.cli", "--dev", "-a", f"127.0.0.1:{port}",
            "--stun=false", "--verify-clients", "--socket", sock, stdout=asyncio.subprocess.DEVNULL,
            stderr=ef, env={**os.environ, "NO_PROXY": "*"})

    class D:
        main_port = port

    agent = None
    try:
        async def up() -> bool:
            try:
                await debug(D, "vars")
                return True
            except (aiohttp.ClientError, OSError):
                return False

        for _ in range(300):  # 15 s
            if proc.returncode is not None or await up():
                break
            await asyncio.sleep(0.05)
        assert proc.returncode is None, errlog.read_text()
        for _ in range(4):
            err = await login(D, bytes(PrivateKey.generate()))
            assert isinstance(err, ConnectionError) and "unreachable" in str(err), err
        text = errlog.read_text()
        assert text.count("cannot reach the local nodeagent") == 1, text
        assert sock in text and "Traceback" not in text
        st = json.loads(await debug(D, "vars"))
        assert st["admission"]["refused"]["agent_unreachable"] == 4
        # The agent comes up (not logged in: it knows no key): answered, and said so once.
        agent = Agent(AgentOptions(socket=sock, state_dir=str(tmp_path / "state")))
        await agent.start()
        err = await login(D, bytes(PrivateKey.generate()))
        assert isinstance(err, ConnectionError) and UNKNOWN in str(err), err
        for _ in range(100):
            if "answers again" in errlog.read_text():
                break
            await asyncio.sleep(0.05)
        assert errlog.read_text().count("answers again") == 1
    finally:
        if agent is not None:
            await agent.stop()
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# --- the admission webhook --------------------------------------------------------------------


class Webhook:
    """A loopback admission controller: answers with ``status`` and ``body``; records
    requests."""

    def __init__(self) -> None:
        self.status = 200
        self.body: Any = {"Allow": True}
        self.seen: list[dict[str, Any]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(await request.json())
        if isinstance(self.body, bytes):
            return web.Response(status=self.status, body=self.body)
        return web.json_response(self.body, status=self.status)


@pytest_asyncio.fixture
async def webhook() -> AsyncIterator[Webhook]:
    w = Webhook()
    app = web.Application()
    app.router.add_post("/admit", w.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    w.url = f"http://127.0.0.1:{port}/admit"
    try:
        yield w
    finally:
        await runner.cleanup()


@pytest.mark.asyncio
async def test_webhook_allow_deny_and_errors(webhook: Webhook,
                                             derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory(verify_client_url=webhook.url)
    key = bytes(PrivateKey.generate())
    assert await admitted(d, key)
    assert webhook.seen[-1] == {"NodePublic": "nodekey:" + bytes(PrivateKey(key).public_key).hex(),
                                "Source": "127.0.0.1"}
    webhook.body = {"allow": False, "Reason": "not today"}
    err = await login(d, key)
    assert isinstance(err, ConnectionError) and "refused by its admission URL" in str(err)
    webhook.status, webhook.body = 500, {"Allow": True}  # non-200 refuses, whatever the body
    err = await login(d, key)
    assert isinstance(err, ConnectionError) and "admission URL answered 500" in str(err)
    webhook.status, webhook.body = 200, b"<html>"
    err = await login(d, key)
    assert isinstance(err, ConnectionError) and "not JSON" in str(err)
    webhook.body = {"Allow": True}
    assert await admitted(d, key)  # no caching of the webhook's answers
    st = json.loads(await debug(d, "vars"))["admission"]
    assert st["refused"]["url_denied"] == 1 and st["refused"]["url_error"] == 2
    assert st["admitted"] == 2


@pytest.mark.asyncio
async def test_webhook_unreachable_fail_open_and_closed(
        derper_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="derper.verify")
    dead = f"http://127.0.0.1:{free_port()}/admit"  # nothing listens there
    fail_open = await derper_factory(verify_client_url=dead)
    assert await admitted(fail_open, bytes(PrivateKey.generate()))
    assert await admitted(fail_open, bytes(PrivateKey.generate()))
    assert "derper_verify_url_fail_open_admits_total 2.0" in await debug(fail_open, "varz")
    fail_closed = await derper_factory(verify_client_url=dead, verify_client_url_fail_open=False)
    err = await login(fail_closed, bytes(PrivateKey.generate()))
    assert isinstance(err, ConnectionError) and "admission URL is unreachable" in str(err)
    assert 'derper_clients_refused_total{reason="url_unreachable"} 1.0' in \
        await debug(fail_closed, "varz")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings  # one line per derper, not one per client
    assert "admitting clients (fail-open)" in warnings[0] and dead in warnings[0]
    assert "refusing clients (fail-closed)" in warnings[1]


@pytest.mark.asyncio
async def test_both_checks_must_admit(tailnet: InprocTailnet, webhook: Webhook,
                                      derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory(verify_clients=True, socket=tailnet.agent.opts.socket,
                             verify_client_url=webhook.url)
    member = tailnet.members["member"].private_key
    assert await admitted(d, member) and len(webhook.seen) == 1
    err = await login(d, bytes(PrivateKey.generate()))  # the agent refuses: no webhook call
    assert isinstance(err, ConnectionError) and UNKNOWN in str(err) and len(webhook.seen) == 1
    webhook.body = {"Allow": False}
    err = await login(d, member)  # the agent admits (cached), the webhook refuses
    assert isinstance(err, ConnectionError) and "admission URL" in str(err)


# --- Tailscale's own derper asking our agent ---------------------------------------------------


@pytest.mark.skipif(not (TS_DERPER := Path(__file__).resolve().parents[3]
                         / "shared/tools/tailscale/derper").exists(),
                    reason="Tailscale's derper is not in ../shared")
@pytest.mark.asyncio
async def test_tailscale_derper_verify_clients_with_our_agent(
        tailnet: InprocTailnet, tmp_path: Path) -> None:
    """Tailscale's ``derper --verify-clients --socket`` takes our whois answers: the member in,
    the stranger out."""
    import ssl

    from nodeagent.derp.client import DerpClient

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        str(TS_DERPER), "-a", f"127.0.0.1:{port}", "-certmode", "manual",
        "-certdir", str(tmp_path / "certs"), "-hostname", "127.0.0.1", "-http-port", "-1",
        "-stun=false", "-c", str(tmp_path / "derper.key"), "-verify-clients",
        "-socket", tailnet.agent.opts.socket,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    url = f"https://127.0.0.1:{port}/derp"
    try:
        for _ in range(300):  # 15 s
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                assert proc.returncode is None, "Tailscale's derper exited"
                await asyncio.sleep(0.05)
        c = await DerpClient.connect(url, tailnet.members["member"].private_key, ssl=ctx,
                                     timeout=15)
        await c.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            c = await DerpClient.connect(url, bytes(PrivateKey.generate()), ssl=ctx, timeout=15)
            # Tailscale's derper closes without a word; a late close shows on the next read.
            await asyncio.wait_for(c.recv(), 10)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
