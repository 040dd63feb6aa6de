"""DerpManager against real relays on loopback, over TLS as the DERP map describes them.

Our derper in ``--certmode manual`` with a self-signed certificate for 127.0.0.1 (nodes marked
``InsecureForTests``, or pinned by ``sha256-raw:``), and Tailscale's real ``derper`` the same way:
two managers exchange packets both ways; the home connection sends NotePreferred; a killed and
restarted relay is redialled with backoff; a Restarting frame is honoured; PeerGone reaches the
callback; an idle non-home connection is closed; the queue keeps the newest packets while the
region is down.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from nacl.public import PrivateKey

from nodeagent.derp.manager import DerpManager, dial_region
from tests.derptls import (
    TAILSCALE_DERPER,
    TLSDerper,
    cert_pin,
    derp_map,
    free_port,
    node,
    region,
    tailscale_derper,
    until,
)

pytestmark = [pytest.mark.timeout(90)]
ours = pytest.mark.feature("derper")


class Peer:
    """A DerpManager with its own node key and everything its callbacks saw."""

    def __init__(self, **kw: Any) -> None:
        self.key = bytes(PrivateKey.generate())
        self.pub = bytes(PrivateKey(self.key).public_key)
        self.packets: asyncio.Queue[tuple[int, bytes, bytes]] = asyncio.Queue()
        self.gone: list[tuple[int, bytes]] = []
        self.down: list[int] = []
        self.m = DerpManager(self.key, lambda r, s, p: self.packets.put_nowait((r, s, p)),
                             on_peer_gone=lambda r, k: self.gone.append((r, k)),
                             on_region_down=self.down.append, **kw)

    async def recv(self, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
        return await asyncio.wait_for(self.packets.get(), timeout)

    def connected(self, rid: int) -> bool:
        s = self.m.status().get(rid)
        return s is not None and s.connected


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    derpers: list[TLSDerper] = []
    peers: list[Peer] = []

    async def factory(kind: str, **kw: Any) -> Any:
        if kind == "derper":
            d = TLSDerper(**kw)
            derpers.append(d)
            return await d.start()
        p = Peer(**kw)
        peers.append(p)
        return p

    yield factory
    for p in peers:
        await p.m.close()
    for d in derpers:
        await d.stop()
        d.cleanup()


async def exchange(a: Peer, b: Peer, rid: int, tag: bytes = b"") -> None:
    assert a.m.send(rid, b.pub, b"a->b" + tag)
    assert await b.recv() == (rid, a.pub, b"a->b" + tag)
    assert b.m.send(rid, a.pub, b"b->a" + tag)
    assert await a.recv() == (rid, b.pub, b"b->a" + tag)


@ours
@pytest.mark.asyncio
async def test_two_managers_exchange_both_ways_home_sends_note_preferred(make: Any) -> None:
    d = await make("derper")
    dm = derp_map(region(900, d.node()))
    a, b = await make("peer"), await make("peer")
    for p in (a, b):
        p.m.set_derp_map(dm)
        p.m.set_home(900)
    await until(lambda: a.connected(900) and b.connected(900), what="both connected")
    await until(lambda: d.stats()["current_home_connections"] == 2, what="NotePreferred")
    await exchange(a, b, 900)
    st = a.m.status()[900]
    assert st.home and st.node == "127.0.0.1" and st.server_key == "nodekey:" + d.public_key.hex()
    assert await a.m.ping(900) > 0
    c = a.m.counters(900)
    assert c["packets_sent"] == 1 and c["packets_received"] == 1 and c["connects"] == 1
    a.m.set_home(0)  # no longer home: NotePreferred(false) on the open connection
    await until(lambda: d.stats()["current_home_connections"] == 1, what="NotePreferred off")
    assert a.m.send(404, b.pub, b"x") is False  # unknown region: refused, never raises


@ours
@pytest.mark.asyncio
async def test_tls_verification_rules(make: Any) -> None:
    d = await make("derper")
    pinned = d.node(insecure=False, cert_name=cert_pin(d.certdir))
    c, n = await dial_region(region(900, pinned), bytes(PrivateKey.generate()))
    assert c.server_public_key == d.public_key and n is pinned
    await c.close()
    wrong = d.node(insecure=False, cert_name="sha256-raw:" + "00" * 32)
    strict = d.node(insecure=False)  # a self-signed certificate is not in the system store
    a = await make("peer")
    a.m.set_derp_map(derp_map(region(901, wrong), region(902, strict)))
    assert a.m.send(901, bytes(32), b"x") and a.m.send(902, bytes(32), b"x")
    await until(lambda: a.m.status()[901].last_error and a.m.status()[902].last_error)
    assert "pinned SHA-256" in a.m.status()[901].last_error
    assert "certificate" in a.m.status()[902].last_error
    assert sorted(a.down) == [901, 902]


@ours
@pytest.mark.asyncio
async def test_reconnect_after_kill_and_restart(make: Any) -> None:
    d = await make("derper")
    dm = derp_map(region(900, d.node()))
    a, b = await make("peer"), await make("peer")
    for p in (a, b):
        p.m.set_derp_map(dm)
        p.m.set_home(900)
    await until(lambda: a.connected(900) and b.connected(900))
    await exchange(a, b, 900, b"1")
    await d.stop(graceful=False)  # killed: no Restarting frame
    await until(lambda: not a.connected(900) and not b.connected(900), what="noticed")
    assert a.down == [900] and b.down == [900]
    await until(lambda: a.m.status()[900].failures >= 3, what="redials failing")
    assert a.m.counters(900)["connect_errors"] >= 2
    assert "refused" in a.m.status()[900].last_error.lower()
    await d.restart()
    await until(lambda: a.connected(900) and b.connected(900), timeout=15, what="reconnected")
    await exchange(a, b, 900, b"2")
    assert a.m.counters(900)["reconnects"] == 1 and a.m.status()[900].failures == 0


@ours
@pytest.mark.asyncio
async def test_restarting_frame_is_honoured(make: Any) -> None:
    d = await make("derper")
    a = await make("peer")
    a.m.set_derp_map(derp_map(region(900, d.node())))
    a.m.set_home(900)
    await until(lambda: a.connected(900))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await d.stop(graceful=True)  # our derper says Restarting (reconnect in 1 s) first
    await until(lambda: not a.connected(900))
    s = a.m.status()[900]
    assert s.last_error.startswith("server restarting") and s.failures == 0
    assert s.retry_in > 0.5 and a.down == [900]
    await d.restart()
    await until(lambda: a.connected(900), timeout=15)
    assert loop.time() - t0 >= 0.9  # not before the announced delay
    assert a.m.counters(900)["connect_errors"] == 0  # no dial into the restart


@ours
@pytest.mark.asyncio
async def test_peer_gone_reaches_callback(make: Any) -> None:
    d = await make("derper")
    dm = derp_map(region(900, d.node()))
    a, b = await make("peer"), await make("peer")
    for p in (a, b):
        p.m.set_derp_map(dm)
        p.m.set_home(900)
    await until(lambda: a.connected(900) and b.connected(900))
    await exchange(a, b, 900)
    await a.m.close()  # b heard from a: the server tells b that a is gone
    await until(lambda: b.gone == [(900, a.pub)], what="PeerGone")


@ours
@pytest.mark.asyncio
async def test_idle_non_home_connection_is_closed(make: Any) -> None:
    d1, d2 = await make("derper"), await make("derper")
    dm = derp_map(region(900, d1.node()), region(901, d2.node(name="901a", region=901)))
    a = await make("peer", idle_timeout=0.4, idle_check_interval=0.05)
    b = await make("peer")
    for p in (a, b):
        p.m.set_derp_map(dm)
    a.m.set_home(900)
    b.m.set_home(901)
    await until(lambda: a.connected(900) and b.connected(901))
    assert a.m.send(901, b.pub, b"via 901")
    assert await b.recv() == (901, a.pub, b"via 901")
    assert a.connected(901)
    await until(lambda: 901 not in a.m.status(), timeout=5, what="idle close")
    await until(lambda: d2.stats()["current_connections"] == 1, what="server saw the close")
    assert a.down == [901]
    await asyncio.sleep(0.6)
    assert a.connected(900)  # the home connection stays


@ours
@pytest.mark.asyncio
async def test_queue_drops_oldest_while_region_down(make: Any) -> None:
    port = free_port()
    dm = derp_map(region(900, node(port)))
    b = await make("peer")
    b_up = asyncio.Event()

    async def dial_after_b(reg: Any, key: bytes) -> Any:
        c = await dial_region(reg, key)  # fails (refused) while the relay is down
        await b_up.wait()  # once it works: write only when b is there to receive
        return c

    a = await make("peer", dial=dial_after_b)
    a.m.set_derp_map(dm)
    for i in range(40):
        assert a.m.send(900, b.pub, b"q%02d" % i)
    await until(lambda: a.down == [900], what="region down")
    s = a.m.status()[900]
    assert s.queued == 32 and not s.connected and a.m.counters(900)["dropped"] == 8
    d = await make("derper", port=port)
    b.m.set_derp_map(derp_map(region(900, d.node())))
    b.m.set_home(900)
    await until(lambda: b.connected(900), timeout=15)
    b_up.set()
    got = [(await b.recv())[2] for _ in range(32)]
    assert got == [b"q%02d" % i for i in range(8, 40)]


@ours
@pytest.mark.asyncio
async def test_plain_http_knob_for_dev_derpers(make: Any, monkeypatch: Any) -> None:
    from nodeagent_derper.app import Derper, DerperOptions

    port = free_port()
    dev = Derper(DerperOptions(private_key=bytes(PrivateKey.generate()),
                               addr=f"127.0.0.1:{port}", stun=False, dev=True))
    assert not dev.tls
    await dev.start()
    try:
        monkeypatch.setenv("NODEAGENT_DERP_PLAIN_HTTP", "1")
        dm = derp_map(region(900, node(port, insecure=False)))
        a, b = await make("peer"), await make("peer")
        for p in (a, b):
            assert p.m.plain_http
            p.m.set_derp_map(dm)
            p.m.set_home(900)
        await until(lambda: a.connected(900) and b.connected(900))
        await exchange(a, b, 900)
    finally:
        await dev.stop()


@pytest.mark.asyncio
async def test_exchange_through_tailscale_derper(make: Any) -> None:
    if not TAILSCALE_DERPER.exists():
        pytest.skip(f"Tailscale's derper binary is missing: {TAILSCALE_DERPER}")
    with tailscale_derper() as (port, stun):
        dm = derp_map(region(900, node(port, stun_port=stun)))
        a, b = await make("peer"), await make("peer")
        for p in (a, b):
            p.m.set_derp_map(dm)
            p.m.set_home(900)
        await until(lambda: a.connected(900) and b.connected(900), timeout=15)
        await exchange(a, b, 900)
        await exchange(a, b, 900, b" again" * 1000)
        assert await a.m.ping(900) > 0
        await a.m.close()
        await until(lambda: b.gone == [(900, a.pub)], what="PeerGone from Tailscale's derper")
