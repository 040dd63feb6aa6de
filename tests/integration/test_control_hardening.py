"""Hardening of the coordination server against a node with a valid key, on a real server on
127.0.0.1 driven by raw protocol requests and ControlClients.

Replays: a captured registration replayed after an admin delete is refused, as is one dated far
in the future; a deleted node's key stays revoked across a server restart while a new node key
from the same machine registers. Field bounds: a 4 MiB hostname, 10 000 endpoints and port 99999
are refused (HTTP 400 / a fatal stream error naming the field) and never reach a peer's netmap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nacl.public import Box, PrivateKey, PublicKey

from nodeagent.control import proto
from nodeagent.control.adminops import AdminError
from nodeagent.control.client import ControlClient, ControlFatalError
from nodeagent.control.server import ControlServer, ServerConfig
from nodeagent.keys import KeyPair
from nodeagent.tailcfg import NetworkMap

CAP = proto.MIN_CAPABILITY_VERSION


@pytest_asyncio.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(ServerConfig(state_dir=tmp_path, keepalive=1.0))
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.stop()  # a second stop (after a test stopped it) is harmless


def _register_msg(nk: KeyPair, auth: str, **kw: Any) -> dict[str, Any]:
    m = proto.msg("register", NodeKey=nk.public, AuthKey=auth, Hostname="victim", OS="linux",
                  DiscoKey=None, ReqID=b"\x07" * 16)
    m.update(kw)
    return m


def _body(srv: ControlServer, mk: KeyPair, m: dict[str, Any], stamp: float | None = None
          ) -> bytes:
    """A registration request as a client sends it; ``stamp`` overrides the box's timestamp."""
    if stamp is None:
        sealed = proto.Channel(mk.private, srv.server_public, server=False).seal(m)
    else:
        inner = proto.pack({"D": proto.C2S, "S": 1, "T": stamp, "M": m})
        box = Box(PrivateKey(mk.private), PublicKey(srv.server_public))
        sealed = bytes(box.encrypt(inner))
    return proto.encode_envelope(CAP, mk.public, sealed)


async def _post(srv: ControlServer, body: bytes) -> tuple[int, str]:
    """POST a registration; (status, error text or "ok")."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{srv.url}/machine/register?v={CAP}", data=body) as r:
            data = await r.read()
            if r.status == 200:
                assert isinstance(proto.unpack(data).get("Sealed"), bytes)
                return 200, "ok"
            with pytest.raises(proto.ServerError) as ei:
                proto.decode_reply(data)
            return r.status, str(ei.value)


def _refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "nodeagent.control.server" and "refused" in r.getMessage()]


@pytest.mark.asyncio
async def test_replayed_registration_cannot_undo_a_delete(
        server: ControlServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nodeagent.control.server")
    key, _ = server.create_authkey(reusable=True)
    mk, nk = KeyPair.generate(), KeyPair.generate()
    captured = _body(server, mk, _register_msg(nk, key))
    assert await _post(server, captured) == (200, "ok")
    before = server.find_node("victim")
    # The same bytes again, while the node still exists: a replay.
    status, text = await _post(server, captured)
    assert (status, text) == (400, "request replayed: the server has already accepted this "
                                   "exact request")
    await server.delete_node("victim")
    assert server.store.list_nodes() == []
    # The captured request after the delete: refused, the node stays deleted.
    status, text = await _post(server, captured)
    assert status == 400 and "replayed" in text
    # A fresh request (new nonce, valid reusable key) naming the deleted node key: revoked.
    status, text = await _post(server, _body(server, mk, _register_msg(nk, key)))
    assert status == 403
    assert text == ("this node key was revoked when its node was deleted; log in again with a "
                    "new node key")
    assert server.store.list_nodes() == []
    assert len(_refusal_lines(caplog)) == 3  # one log line per refusal
    # A restarted server forgets the nonces but not the revocation.
    port = int(server.url.rsplit(":", 1)[1])
    await server.stop()
    srv2 = ControlServer(ServerConfig(state_dir=tmp_path, keepalive=1.0))
    await srv2.start("127.0.0.1", port)
    c = ControlClient(srv2.url, mk, KeyPair.generate(), hostname="victim")
    try:
        status, text = await _post(srv2, captured)
        assert status == 403 and "revoked" in text
        status, _ = await _post(srv2, _body(srv2, mk, _register_msg(nk, key)))
        assert status == 403
        # The same machine with a brand-new node key may register, and gets its address back.
        node = await c.register(key)
        assert node.Addresses[0] == f"{before.ipv4}/32"
        assert [n.name for n in srv2.store.list_nodes()] == ["victim"]
    finally:
        await c.close()
        await srv2.stop()


@pytest.mark.asyncio
async def test_registration_dated_in_the_future_is_refused(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nodeagent.control.server")
    key, _ = server.create_authkey(reusable=True)
    mk = KeyPair.generate()
    status, text = await _post(server, _body(server, mk, _register_msg(KeyPair.generate(), key),
                                             stamp=time.time() + 290))
    assert status == 400
    assert "in the future, more than 60s ahead of the server's clock" in text
    assert server.store.list_nodes() == []
    assert len(_refusal_lines(caplog)) == 1
    status, text = await _post(server, _body(server, mk, _register_msg(KeyPair.generate(), key),
                                             stamp=time.time() - 3600))
    assert status == 400 and "too far from the server's clock" in text
    # A clock a little ahead, or minutes behind, is still fine.
    assert await _post(server, _body(server, mk, _register_msg(KeyPair.generate(), key),
                                     stamp=time.time() + 20)) == (200, "ok")
    assert await _post(server, _body(server, mk, _register_msg(KeyPair.generate(), key),
                                     stamp=time.time() - 250)) == (200, "ok")


@pytest.mark.asyncio
async def test_oversized_and_malformed_fields_are_refused_at_registration(
        server: ControlServer) -> None:
    key, _ = server.create_authkey(reusable=True)
    cases = [({"Hostname": "x" * (4 << 20)}, "Hostname", "4194304 bytes"),
             ({"Hostname": "evil.example.com"}, "Hostname", "not a DNS label"),
             ({"OS": "o" * 1000}, "OS", "1000 characters"),
             ({"DiscoKey": b"\x00" * 5}, "DiscoKey", "5 bytes")]
    for fields, name, detail in cases:
        status, text = await _post(server, _body(server, KeyPair.generate(),
                                                 _register_msg(KeyPair.generate(), key,
                                                               **fields)))
        assert status == 400, name
        assert text.startswith(f"invalid {name} in register message: ") and detail in text
    assert server.store.list_nodes() == []


class _Peer:
    def __init__(self, srv: ControlServer, name: str, **kw: Any) -> None:
        self.client = ControlClient(srv.url, KeyPair.generate(), KeyPair.generate(),
                                    hostname=name, backoff_min=0.05, backoff_max=0.5, **kw)
        self.maps: list[NetworkMap] = []
        self.cond = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    async def _on(self, nm: NetworkMap) -> None:
        async with self.cond:
            self.maps.append(nm)
            self.cond.notify_all()

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.get_running_loop().create_task(self.client.run(self._on))
        return self.task

    async def until(self, pred: Any) -> NetworkMap:
        async with self.cond:
            await asyncio.wait_for(self.cond.wait_for(lambda: bool(self.maps)
                                                      and pred(self.maps[-1])), 10)
        return self.maps[-1]

    async def stop(self) -> None:
        await self.client.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.mark.asyncio
async def test_bad_endpoints_on_the_stream_are_refused_and_never_reach_peers(
        server: ControlServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nodeagent.control.server")
    key, _ = server.create_authkey(reusable=True)
    watcher = _Peer(server, "watcher")
    flood = _Peer(server, "flood", endpoints=[f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}:41641"
                                              for i in range(10_000)])
    sneaky = _Peer(server, "sneaky", endpoints=["192.0.2.9:41641"])
    peers = (watcher, flood, sneaky)
    try:
        for p in peers:
            await p.client.register(key)
        watcher.start()
        # 10 000 endpoints in the map request: a fatal error naming the field.
        with pytest.raises(ControlFatalError,
                           match=r"invalid Endpoints in map message: 10000 endpoints, over the "
                                 r"limit of 32"):
            await asyncio.wait_for(flood.start(), 10)
        # A good map request, then an update with port 99999: a fatal error naming the field.
        sneaky.start()
        await watcher.until(lambda nm: any(p.HostName == "sneaky" and p.Online
                                           and p.Endpoints == ["192.0.2.9:41641"]
                                           for p in nm.Peers))
        sneaky.client.update_endpoints(["192.0.2.9:41641", "1.2.3.4:99999"])
        assert sneaky.task is not None
        with pytest.raises(ControlFatalError,
                           match=r"invalid Endpoints in update message: \[1\]: port out of "
                                 r"range in '1.2.3.4:99999'"):
            await asyncio.wait_for(sneaky.task, 10)
        await watcher.until(lambda nm: any(p.HostName == "sneaky" and p.Online is False
                                           for p in nm.Peers))
        stored = {n.name: n.endpoints for n in server.store.list_nodes()}
        assert stored == {"watcher": [], "flood": [], "sneaky": ["192.0.2.9:41641"]}
        for nm in watcher.maps:
            for p in nm.Peers:
                assert "1.2.3.4:99999" not in p.Endpoints and len(p.Endpoints) <= 32
        lines = [ln for ln in _refusal_lines(caplog) if "Endpoints" in ln]
        assert len(lines) == 2
    finally:
        for p in peers:
            await p.stop()


@pytest.mark.asyncio
async def test_bad_c2n_response_fails_the_admin_request_only(server: ControlServer) -> None:
    key, _ = server.create_authkey(reusable=True)
    node = _Peer(server, "n")

    async def handler(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return 99999, {"X": "a\r\nb"}, b""

    await node.client.register(key)
    node.task = asyncio.get_running_loop().create_task(node.client.run(node._on, handler))
    try:
        await node.until(lambda nm: True)
        rec = server.find_node("n")
        assert rec.id in server.sessions  # the stream is registered before its first map
        with pytest.raises(AdminError, match="invalid Status in c2n-response message"):
            await server.c2n("n", "GET", "/x", timeout=5)
        assert rec.id in server.sessions and not node.task.done()
    finally:
        await node.stop()
