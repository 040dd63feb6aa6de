"""Authentication of the control protocol against a server on 127.0.0.1: machine keys bind node
keys, nobody reads another node's map, unsupported capability versions are refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from nodeagent.control import proto
from nodeagent.control.client import ControlClient, ControlFatalError
from nodeagent.control.server import ControlServer, ServerConfig
from nodeagent.keys import KeyPair
from nodeagent.tailcfg import NetworkMap


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(ServerConfig(state_dir=tmp_path, keepalive=1.0))
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()


async def _client(srv: ControlServer, mk: KeyPair, nk: KeyPair, **kw: object) -> ControlClient:
    return ControlClient(srv.url, mk, nk, hostname="h", backoff_min=0.01, **kw)  # type: ignore


@pytest.mark.asyncio
async def test_node_cannot_stream_with_another_machines_node_key(server: ControlServer) -> None:
    key, _ = server.create_authkey(reusable=True)
    a_mk, a_nk, b_mk, b_nk = (KeyPair.generate() for _ in range(4))
    a = await _client(server, a_mk, a_nk)
    b = await _client(server, b_mk, b_nk)
    await a.register(key)
    await b.register(key)
    thief = await _client(server, b_mk, a_nk)  # B's machine, A's node key
    got: list[NetworkMap] = []
    try:
        with pytest.raises(ControlFatalError, match="not registered to this machine"):
            await asyncio.wait_for(thief.run(got.append), 10)
        assert got == []
        with pytest.raises(ControlFatalError, match="registered to another machine"):
            await thief.register(key)
    finally:
        for c in (a, b, thief):
            await c.close()


@pytest.mark.asyncio
async def test_forged_machine_key_is_refused(server: ControlServer) -> None:
    key, _ = server.create_authkey()
    victim, forger = KeyPair.generate(), KeyPair.generate()
    chan = proto.Channel(forger.private, server.server_public, server=False)
    sealed = chan.seal(proto.msg("register", NodeKey=KeyPair.generate().public, AuthKey=key,
                                 Hostname="x", OS="", DiscoKey=None, ReqID=b"r"))
    body = proto.encode_envelope(proto.MIN_CAPABILITY_VERSION, victim.public, sealed)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{server.url}/machine/register?v=139", data=body) as r:
            assert r.status == 400
            with pytest.raises(proto.ServerError, match="cannot decrypt"):
                proto.decode_reply(await r.read())
    assert server.store.list_nodes() == []


@pytest.mark.asyncio
async def test_unregistered_machine_gets_no_map(server: ControlServer) -> None:
    c = await _client(server, KeyPair.generate(), KeyPair.generate())
    got: list[NetworkMap] = []
    try:
        with pytest.raises(ControlFatalError, match="not registered"):
            await asyncio.wait_for(c.run(got.append), 10)
        assert got == []
    finally:
        await c.close()


@pytest.mark.asyncio
async def test_old_capability_version_refused(server: ControlServer) -> None:
    key, _ = server.create_authkey()
    c = await _client(server, KeyPair.generate(), KeyPair.generate(), capability_version=100)
    try:
        with pytest.raises(ControlFatalError, match="capability version 100 is too old"):
            await c.register(key)
        with pytest.raises(ControlFatalError, match="capability version 100 is too old"):
            await asyncio.wait_for(c.run(lambda nm: None), 10)
    finally:
        await c.close()
    assert server.store.list_nodes() == []
    # The map endpoint refuses it too, even when the /key check is skipped.
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{server.url}/machine/map?v=100") as ws:
            msg = await ws.receive(timeout=5)
            with pytest.raises(proto.ServerError, match="too old"):
                proto.decode_hello(msg.data)


@pytest.mark.asyncio
async def test_server_key_pinned(server: ControlServer, tmp_path: Path) -> None:
    state: dict[str, object] = {"server_keys": {server.url: "00" * 32}}
    c = await _client(server, KeyPair.generate(), KeyPair.generate(), state=state)
    try:
        with pytest.raises(ControlFatalError, match="is pinned"):
            await c.register("whatever")
    finally:
        await c.close()
    fresh: dict[str, object] = {}
    c2 = await _client(server, KeyPair.generate(), KeyPair.generate(), state=fresh)
    key, _ = server.create_authkey()
    try:
        await c2.register(key)
    finally:
        await c2.close()
    assert fresh == {"server_keys": {server.url: server.server_public.hex()}}


@pytest.mark.asyncio
async def test_admin_requires_token(server: ControlServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/admin/nodes") as r:
            assert r.status == 401
        async with s.get(f"{server.url}/admin/nodes",
                         headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        async with s.get(f"{server.url}/admin/nodes",
                         headers={"Authorization": f"Bearer {server.admin_token}"}) as r:
            assert r.status == 200 and await r.json() == []
    tok = server.cfg.state_dir / "admin-token"
    assert tok.stat().st_mode & 0o777 == 0o600
