"""The asyncio DerpClient over the sans-IO connection, against a scripted fake server on loopback.

The real relay is covered by tests/integration/test_derp_server.py (derper feature); this one
needs no feature and checks what that relay never does: Pings from the server, events before
ServerInfo, a refused upgrade, a server key that changes, a malformed frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from nacl.public import PrivateKey

from nodeagent.derp import frames as F
from nodeagent.derp.client import DerpClient, DerpError, Health, Ping, ReceivedPacket, ServerInfo

pytestmark = pytest.mark.timeout(30)

SERVER = PrivateKey.generate()
SERVER_PUB = bytes(SERVER.public_key)
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    hdr = await reader.readexactly(F.FRAME_HEADER_LEN)
    return hdr[0], await reader.readexactly(int.from_bytes(hdr[1:], "big"))


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def read_client_info(reader: asyncio.StreamReader) -> F.ClientInfo:
    ftype, payload = await read_frame(reader)
    assert ftype == F.FrameType.CLIENT_INFO
    return F.decode_client_info(bytes(SERVER), payload)


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    servers: list[asyncio.Server] = []
    failures: list[BaseException] = []

    async def start(script: Script) -> str:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await script(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except BaseException as e:  # surfaced at teardown
                failures.append(e)
            finally:
                w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/derp"

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()
    assert not failures, failures


@pytest.mark.asyncio
async def test_login_early_events_and_pong(serve: Callable[[Script], Awaitable[str]]) -> None:
    client_key = bytes(PrivateKey.generate())
    client_pub = bytes(PrivateKey(client_key).public_key)
    got_pong: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        req = await read_request(r)
        assert b"Derp-Fast-Start" not in req and b"Upgrade: DERP" in req
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n"
                + F.encode_server_key(SERVER_PUB))
        ci = await read_client_info(r)
        assert ci.key == client_pub and ci.app_name == "adapter"
        # Before ServerInfo: a Ping (to be answered) and a Health.
        w.write(F.encode_ping(b"srvping!") + F.encode_health("early"))
        ftype, payload = await read_frame(r)
        assert ftype == F.FrameType.PONG
        got_pong.set_result(payload)
        w.write(F.encode_server_info(bytes(SERVER), client_pub, {"version": 2})
                + F.encode_recv_packet(bytes(32), b"data"))
        ftype, payload = await read_frame(r)
        assert (ftype, payload) == (F.FrameType.SEND_PACKET, bytes(32) + b"reply")
        w.write(F.encode_server_info(bytes(SERVER), client_pub, {"version": 3}))
        await r.read()  # until the client closes

    c = await DerpClient.connect(await serve(script), client_key, app_name="adapter")
    assert await asyncio.wait_for(got_pong, 5) == b"srvping!"
    assert c.server_public_key == SERVER_PUB and c.server_info == {"version": 2}
    assert await c.recv() == Ping(b"srvping!")
    assert await c.recv() == Health("early")
    assert await c.recv() == ReceivedPacket(bytes(32), b"data")
    await c.send(bytes(32), b"reply")
    assert await c.recv() == ServerInfo({"version": 3})
    assert c.server_info == {"version": 3}
    await c.close()
    assert c.closed


@pytest.mark.asyncio
async def test_fast_start_sends_client_info_without_waiting(
        serve: Callable[[Script], Awaitable[str]]) -> None:
    client_key = bytes(PrivateKey.generate())

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert b"Derp-Fast-Start: 1" in await read_request(r)
        ci = await read_client_info(r)  # before the server said anything
        w.write(F.encode_server_key(SERVER_PUB)
                + F.encode_server_info(bytes(SERVER), ci.key, {"version": 2}))
        await r.read()

    c = await DerpClient.connect(await serve(script), client_key, server_public_key=SERVER_PUB)
    assert c.server_info == {"version": 2}
    await c.close()


@pytest.mark.asyncio
async def test_refusals_and_protocol_errors(serve: Callable[[Script], Awaitable[str]]) -> None:
    key = bytes(PrivateKey.generate())
    other = bytes(PrivateKey.generate().public_key)

    async def refuse(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 426 Upgrade Required\r\n\r\n")

    with pytest.raises(DerpError, match="refused"):
        await DerpClient.connect(await serve(refuse), key)

    async def changed_key(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(F.encode_server_key(other))
        await r.read()

    with pytest.raises(DerpError, match="differs"):
        await DerpClient.connect(await serve(changed_key), key, server_public_key=SERVER_PUB)

    async def bad_frame(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        ci = await read_client_info(r)
        w.write(F.encode_server_info(bytes(SERVER), ci.key, {})
                + F.frame(F.FrameType.PONG, b"short"))
        await r.read()

    c = await DerpClient.connect(await serve(bad_frame), key, server_public_key=SERVER_PUB)
    with pytest.raises(F.FrameError):
        await c.recv()
    await c.close()

    async def hang_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        ci = await read_client_info(r)
        w.write(F.encode_server_info(bytes(SERVER), ci.key, {}))

    c = await DerpClient.connect(await serve(hang_up), key, server_public_key=SERVER_PUB)
    with pytest.raises(ConnectionError):
        await c.recv()
    await c.close()


@pytest.mark.asyncio
async def test_recv_batch_returns_what_one_read_completes(
        serve: Callable[[Script], Awaitable[str]]) -> None:
    client_key = bytes(PrivateKey.generate())
    client_pub = bytes(PrivateKey(client_key).public_key)

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n"
                + F.encode_server_key(SERVER_PUB))
        await read_client_info(r)
        w.write(F.encode_server_info(bytes(SERVER), client_pub, {"version": 2}))
        # A burst in one write, then the client's sends (a burst written whole) echoed back.
        w.write(b"".join(F.encode_recv_packet(bytes(32), bytes([i]) * 10) for i in range(5)))
        frames = [await read_frame(r) for _ in range(40)]
        assert all(t == F.FrameType.SEND_PACKET for t, _ in frames)
        w.write(F.encode_recv_packet(bytes(32), b"done"))
        await r.read()

    c = await DerpClient.connect(await serve(script), client_key)
    got: list[Any] = []
    while len(got) < 5:
        got += await c.recv_batch()
    assert got == [ReceivedPacket(bytes(32), bytes([i]) * 10) for i in range(5)]
    c.send_many_nowait(bytes(32), [bytes([i]) * 100 for i in range(40)])
    await c.drain()
    assert await c.recv_batch() == [ReceivedPacket(bytes(32), b"done")]
    await c.close()
