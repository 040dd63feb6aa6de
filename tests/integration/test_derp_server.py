"""DerpServer behind aiohttp on loopback, driven by DerpClient, raw sockets and a WebSocket client.

Covers login, relaying both ways, PeerGone (unknown destination and disconnect), duplicate keys,
oversize frames, slow receivers, handshake timeout, rate limiting, the WebSocket variant,
graceful shutdown, and a client written straight from the spec without the codec.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from nacl.public import Box, PrivateKey, PublicKey

from nodeagent.derp import frames as F
from nodeagent.derp.client import (
    DerpClient,
    Health,
    PeerGone,
    Pong,
    ReceivedPacket,
    Restarting,
)

pytestmark = [pytest.mark.feature("derper"), pytest.mark.timeout(60)]

DISCO = b"TS\xf0\x9f\x92\xac" + bytes(32) + bytes(24) + b"disco-body"


class Harness:
    def __init__(self, server: Any, port: int, fast_port: int) -> None:
        self.server = server
        self.port = port
        self.fast_port = fast_port
        self.url = f"http://127.0.0.1:{port}/derp"
        self.fast_url = f"http://127.0.0.1:{fast_port}/derp"
        self.clients: list[DerpClient] = []

    async def client(self, key: bytes | None = None, fast: bool = False,
                     **kw: Any) -> DerpClient:
        key = key or bytes(PrivateKey.generate())
        if fast:
            c = await DerpClient.connect(self.fast_url, key,
                                         server_public_key=self.server.public_key, **kw)
        else:
            c = await DerpClient.connect(self.url, key, **kw)
        self.clients.append(c)
        return c


async def _start(server_kwargs: dict[str, Any]) -> tuple[Any, web.AppRunner, asyncio.Server,
                                                         Harness]:
    from nodeagent_derper.server import DerpServer

    srv = DerpServer(bytes(PrivateKey.generate()), **server_kwargs)
    app = web.Application()
    app.router.add_route("*", "/derp", srv.handle_http)
    app.router.add_route("*", "/derp/probe", srv.handle_probe)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    fast = await loop.create_server(srv.wrap_protocol_factory(runner.server), "127.0.0.1", 0)
    return srv, runner, fast, Harness(srv, port, fast.sockets[0].getsockname()[1])


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Any, web.AppRunner, asyncio.Server, Harness]] = []

    async def factory(**kw: Any) -> Harness:
        s = await _start(kw)
        started.append(s)
        return s[3]

    yield factory
    for srv, runner, fast, h in started:
        for c in h.clients:
            await c.close()
        await srv.shutdown(graceful=False)
        fast.close()
        await runner.cleanup()


async def next_event(c: DerpClient, kind: type, timeout: float = 5.0,
                     pred: Callable[[Any], bool] = lambda e: True) -> Any:
    async def loop() -> Any:
        while True:
            ev = await c.recv()
            if isinstance(ev, kind) and pred(ev):
                return ev
    return await asyncio.wait_for(loop(), timeout)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_two_clients_exchange_both_ways(make: Any) -> None:
    h = await make()
    a = await h.client()
    b = await h.client(fast=True)
    assert a.server_public_key == h.server.public_key
    assert a.server_info.get("version") == 2
    await a.send(b.public_key, b"hello b")
    ev = await next_event(b, ReceivedPacket)
    assert (ev.src, ev.data) == (a.public_key, b"hello b")
    await b.send(a.public_key, b"hello a" * 100)
    ev = await next_event(a, ReceivedPacket)
    assert (ev.src, ev.data) == (b.public_key, b"hello a" * 100)
    await a.ping(b"12345678")
    assert (await next_event(a, Pong)).data == b"12345678"
    st = h.server.stats()
    assert st["packets_received"] == 2 and st["packets_sent"] == 2
    assert st["current_connections"] == 2 and st["got_ping"] == 1


@pytest.mark.asyncio
async def test_fast_start_pipelined_bytes_survive(make: Any) -> None:
    """Request, ClientInfo and a packet in one write reach the relay through the wrapper."""
    h = await make()
    b = await h.client()
    priv = bytes(PrivateKey.generate())
    reader, writer = await asyncio.open_connection("127.0.0.1", h.fast_port)
    req = (b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
           b"Derp-Fast-Start: 1\r\n\r\n")
    writer.write(req + F.encode_client_info(priv, h.server.public_key, {"version": 2})
                 + F.encode_send_packet(b.public_key, b"pipelined"))
    ev = await next_event(b, ReceivedPacket)
    assert ev.data == b"pipelined"
    fr = F.FrameReader()
    fr.feed(await asyncio.wait_for(reader.read(100), 5))
    first = fr.next()
    assert first is not None and first[0] == F.FrameType.SERVER_KEY  # no HTTP response first
    writer.close()


@pytest.mark.asyncio
async def test_unknown_destination_peer_gone_only_for_disco(make: Any) -> None:
    h = await make()
    a = await h.client()
    nobody = bytes(PrivateKey.generate().public_key)
    await a.send(nobody, b"not disco")
    await a.send(nobody, DISCO)
    ev = await next_event(a, PeerGone)
    assert ev.key == nobody and ev.reason == F.PeerGoneReason.NOT_HERE
    st = h.server.stats()
    assert st["packets_dropped"] == {"unknown_dest/other": 1, "unknown_dest/disco": 1}
    assert st["peer_gone_not_here_frames"] == 1


@pytest.mark.asyncio
async def test_disconnect_sends_peer_gone_to_recipients(make: Any) -> None:
    h = await make()
    a, b, c = await h.client(), await h.client(), await h.client()
    await a.send(b.public_key, b"x")
    await next_event(b, ReceivedPacket)
    await a.close()
    ev = await next_event(b, PeerGone)
    assert ev.key == a.public_key and ev.reason == F.PeerGoneReason.DISCONNECTED
    # c never heard from a: it gets nothing; a ping round trip proves the queue is empty.
    await c.ping(b"abcdefgh")
    ev2 = await asyncio.wait_for(c.recv(), 5)
    assert isinstance(ev2, Pong)


@pytest.mark.asyncio
async def test_duplicate_key_last_writer_is_active(make: Any) -> None:
    h = await make()
    key = bytes(PrivateKey.generate())
    a1 = await h.client(key)
    a2 = await h.client(key)
    b = await h.client()
    assert (await next_event(a1, Health)).problem
    assert (await next_event(a2, Health)).problem
    st = h.server.stats()
    assert st["current_dup_client_keys"] == 1 and st["total_dup_client_conns"] == 1
    await b.send(a1.public_key, b"to newest")
    assert (await next_event(a2, ReceivedPacket)).data == b"to newest"
    await a1.ping(b"iamhere!")  # any frame makes a1 the active one
    await next_event(a1, Pong)
    await b.send(a1.public_key, b"to last writer")
    assert (await next_event(a1, ReceivedPacket)).data == b"to last writer"
    await a1.close()
    assert (await next_event(a2, Health)).problem == ""  # back to a single connection
    await b.send(a2.public_key, b"after")
    assert (await next_event(a2, ReceivedPacket)).data == b"after"


@pytest.mark.asyncio
async def test_oversize_frame_closes_only_that_client(make: Any) -> None:
    h = await make()
    a, b, bad = await h.client(), await h.client(), await h.client()
    await bad.write_raw(struct.pack(">BI", F.FrameType.SEND_PACKET, 200_000))
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(bad.recv(), 5)
    assert h.server.stats()["closed"].get("frame_too_large") == 1
    await a.send(b.public_key, b"still fine")
    assert (await next_event(b, ReceivedPacket)).data == b"still fine"
    # Unknown frame types are ignored, not fatal.
    await a.write_raw(F.frame(0x0C, b"whatever") + F.frame(F.FrameType.PONG, b"12345678"))
    await a.send(b.public_key, b"after unknown")
    assert (await next_event(b, ReceivedPacket)).data == b"after unknown"
    assert h.server.stats()["unknown_frames"] == 2


@pytest.mark.asyncio
async def test_slow_receiver_drops_without_stalling_others(make: Any) -> None:
    h = await make(send_queue_depth=8, write_timeout=0)  # 0: the stalled reader stays
    flood, slow = await h.client(), await h.client()
    p, q = await h.client(), await h.client()
    # `slow` never reads: its socket buffers fill, then the relay queues and drops.
    pkt = os.urandom(1400)
    for i in range(6000):
        flood.send_nowait(slow.public_key, pkt)
        if i % 100 == 0:
            await asyncio.wait_for(flood.drain(), 5)  # the sender is never stalled
    await asyncio.wait_for(flood.drain(), 5)
    await until(lambda: h.server.stats()["packets_received"] >= 6000)
    for i in range(50):
        await p.send(q.public_key, i.to_bytes(4, "big"))
    got = [(await next_event(q, ReceivedPacket)).data for _ in range(50)]
    assert got == [i.to_bytes(4, "big") for i in range(50)]
    assert h.server.stats()["packets_dropped"].get("queue_head/other", 0) > 0


@pytest.mark.asyncio
async def test_reader_that_stops_is_closed_after_write_timeout(make: Any) -> None:
    h = await make(send_queue_depth=8, write_timeout=0.3)
    flood, stuck, idle = await h.client(), await h.client(), await h.client()
    pkt = os.urandom(1400)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    # `stuck` never reads. Keep sending until its socket buffers (sized by the kernel's
    # autotuning, several MB on loopback) are full and its writes stay paused past the timeout.
    while not h.server.stats()["closed"].get("write_timeout"):
        assert loop.time() < deadline, h.server.stats()["closed"]
        for _ in range(100):
            flood.send_nowait(stuck.public_key, pkt)
        await asyncio.wait_for(flood.drain(), 5)
        await asyncio.sleep(0.005)
    assert stuck.public_key not in h.server.conns
    # A client with nothing pending is not affected, and relaying goes on.
    await flood.send(idle.public_key, b"still here")
    assert (await next_event(idle, ReceivedPacket)).data == b"still here"
    assert h.server.stats()["closed"].get("write_timeout") == 1


@pytest.mark.asyncio
async def test_stalled_handshake_is_timed_out(make: Any) -> None:
    h = await make(handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n\r\n")
    data = b""
    while True:  # 101, ServerKey, then EOF when the timer fires
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert f"Derp-Public-Key: {h.server.public_key.hex()}".encode() in data
    assert h.server.stats()["closed"].get("handshake_timeout") == 1
    writer.close()


@pytest.mark.asyncio
async def test_bad_box_and_non_upgrade(make: Any) -> None:
    h = await make()
    reader, writer = await asyncio.open_connection("127.0.0.1", h.fast_port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: DERP\r\n"
                 b"Derp-Fast-Start: 1\r\n\r\n"
                 + F.frame(F.FrameType.CLIENT_INFO, os.urandom(32 + 24 + 40)))
    while await asyncio.wait_for(reader.read(4096), 5):
        pass
    assert h.server.stats()["closed"].get("bad_client_info") == 1
    writer.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(h.url) as r:
            assert r.status == 426
            assert "DERP requires connection upgrade" in await r.text()
        async with s.head(h.url + "/probe") as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        async with s.post(h.url + "/probe") as r:
            assert r.status == 405


@pytest.mark.asyncio
async def test_rate_limit_waits_but_delivers(make: Any) -> None:
    h = await make(rate_limit_bytes_per_sec=400_000, rate_limit_burst=1)
    a, b = await h.client(), await h.client()
    assert a.server_info["TokenBucketBytesPerSecond"] == 400_000
    assert a.server_info["TokenBucketBytesBurst"] == F.MAX_PACKET_SIZE + 32
    pkt = bytes(1400)
    for _ in range(100):  # 140 kB: beyond the 64 KiB burst
        a.send_nowait(b.public_key, pkt)
    await a.drain()
    for _ in range(100):
        await next_event(b, ReceivedPacket)
    assert h.server.stats()["rate_limit_waits"] >= 1


@pytest.mark.asyncio
async def test_verify_client_rejects(make: Any) -> None:
    allowed = bytes(PrivateKey.generate())
    allowed_pub = bytes(PrivateKey(allowed).public_key)
    seen: list[dict[str, Any]] = []

    async def verify(key: bytes, info: dict[str, Any], remote: Any) -> bool:
        seen.append(info)
        return key == allowed_pub

    h = await make(verify_client=verify)
    ok = await h.client(allowed, app_name="tests")
    assert ok.server_info["version"] == 2 and seen[0]["AppName"] == "tests"
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await h.client()
    assert h.server.stats()["closed"].get("not_admitted") == 1


@pytest.mark.asyncio
async def test_note_preferred_keepalive_and_metrics(make: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    h = await make(keepalive_interval=0.2, registry=reg)
    a = await h.client()
    await a.note_preferred(True)
    await until(lambda: h.server.stats()["current_home_connections"] == 1)
    from nodeagent.derp.client import KeepAlive
    await next_event(a, KeepAlive, timeout=3)
    text = generate_latest(reg).decode()
    assert "derp_current_home_connections 1.0" in text
    assert "derp_accepts_total 1.0" in text
    assert 'derp_packets_dropped_total{kind="disco",reason="queue_head"} 0.0' in text
    await a.note_preferred(False)
    await until(lambda: h.server.stats()["current_home_connections"] == 0)


@pytest.mark.asyncio
async def test_graceful_shutdown_sends_restarting(make: Any) -> None:
    h = await make()
    a = await h.client()
    await h.server.shutdown(graceful=True)
    ev = await next_event(a, Restarting)
    assert ev.reconnect_in_ms > 0 and ev.try_for_ms >= ev.reconnect_in_ms
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(a.recv(), 5)


@pytest.mark.asyncio
async def test_websocket_variant(make: Any) -> None:
    h = await make()
    b = await h.client()
    priv = bytes(PrivateKey.generate())
    pub = bytes(PrivateKey(priv).public_key)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(h.url, protocols=("derp",)) as ws:
            assert ws.protocol == "derp"
            rd = F.FrameReader()

            async def frame() -> tuple[int, bytes]:
                while True:
                    fr = rd.next()
                    if fr is not None:
                        return fr
                    msg = await asyncio.wait_for(ws.receive(), 5)
                    assert msg.type == aiohttp.WSMsgType.BINARY
                    rd.feed(msg.data)

            ftype, payload = await frame()
            assert ftype == F.FrameType.SERVER_KEY
            assert F.decode_server_key(payload) == h.server.public_key
            ci = F.encode_client_info(priv, h.server.public_key, {"version": 2})
            await ws.send_bytes(ci[:20])  # frames need not align with messages
            await ws.send_bytes(ci[20:])
            ftype, payload = await frame()
            assert ftype == F.FrameType.SERVER_INFO
            await ws.send_bytes(F.encode_send_packet(b.public_key, b"via websocket"))
            ev = await next_event(b, ReceivedPacket)
            assert (ev.src, ev.data) == (pub, b"via websocket")
            await b.send(pub, b"back over ws")
            while True:
                ftype, payload = await frame()
                if ftype == F.FrameType.RECV_PACKET:
                    break
            assert F.decode_recv_packet(payload) == (b.public_key, b"back over ws")
    assert h.server.stats()["websocket_accepts"] == 1


# --- a client written from the spec with raw streams, independent of nodeagent.derp -------------

MAGIC_FROM_SPEC = bytes.fromhex("44455250f09f9491")


async def _spec_read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    hdr = await reader.readexactly(5)
    ftype, n = struct.unpack(">BI", hdr)
    return ftype, await reader.readexactly(n)


async def _spec_login(port: int, priv: PrivateKey) -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n"
                 b"Connection: Upgrade\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 101 Switching Protocols"
    ftype, payload = await _spec_read_frame(reader)
    assert ftype == 0x01 and payload[:8] == MAGIC_FROM_SPEC and len(payload) >= 40
    server_pub = payload[8:40]
    box = Box(priv, PublicKey(server_pub))
    nonce = os.urandom(24)
    sealed = box.encrypt(json.dumps({"version": 2, "CanAckPings": True}).encode(), nonce)
    body = bytes(priv.public_key) + nonce + sealed.ciphertext
    writer.write(struct.pack(">BI", 0x02, len(body)) + body)
    ftype, payload = await _spec_read_frame(reader)
    assert ftype == 0x03
    info = json.loads(box.decrypt(payload[24:], payload[:24]))
    assert info["version"] == 2
    return reader, writer, server_pub


@pytest.mark.asyncio
async def test_independent_spec_client(make: Any) -> None:
    h = await make()
    pa, pb = PrivateKey.generate(), PrivateKey.generate()
    ra, wa, spub = await _spec_login(h.port, pa)
    rb, wb, _ = await _spec_login(h.port, pb)
    assert spub == h.server.public_key
    ka, kb = bytes(pa.public_key), bytes(pb.public_key)
    for (w, dst, r, src, data) in ((wa, kb, rb, ka, b"A to B"), (wb, ka, ra, kb, b"B to A")):
        w.write(struct.pack(">BI", 0x04, 32 + len(data)) + dst + data)
        while True:
            ftype, payload = await asyncio.wait_for(_spec_read_frame(r), 5)
            if ftype == 0x05:
                break
        assert payload[:32] == src and payload[32:] == data
    wa.write(bytes.fromhex("1200000008") + b"pingpong")
    while True:
        ftype, payload = await asyncio.wait_for(_spec_read_frame(ra), 5)
        if ftype == 0x13:
            break
    assert payload == b"pingpong"
    wa.close()
    ftype, payload = await asyncio.wait_for(_spec_read_frame(rb), 5)
    assert (ftype, payload) == (0x08, ka + b"\x00")  # B heard from A: PeerGone(disconnected)
    wb.close()
