"""DerpManager without sockets: a fake dialler and fake clients, a fake clock and fixed jitter.

Covers the backoff arithmetic and schedule, the per-region queue (drop oldest), send() refusing
without raising, NotePreferred on home changes, the idle close of non-home regions, Restarting,
events to callbacks, DERP map changes, ping latency and the metrics samples.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.derp.conn import Health, PeerGone, Pong, ReceivedPacket, Restarting
from nodeagent.derp.manager import (
    MAX_BACKOFF,
    DerpDialError,
    DerpManager,
    backoff_delay,
)
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

KEY = bytes(range(32))
PEER = bytes([7] * 32)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeClient:
    def __init__(self, server_key: bytes = b"\x05" * 32) -> None:
        self.server_public_key = server_key
        self.sent: list[tuple[bytes, bytes]] = []
        self.preferred: list[bool] = []
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False

    def send_nowait(self, dst: bytes, pkt: bytes) -> None:
        self.sent.append((dst, pkt))

    def send_many_nowait(self, dst: bytes, pkts: list[bytes]) -> None:
        self.sent += [(dst, p) for p in pkts]

    def write_buffer_size(self) -> int:
        return 0

    async def drain(self) -> None:
        await asyncio.sleep(0)

    async def note_preferred(self, preferred: bool) -> None:
        self.preferred.append(preferred)

    async def ping(self, data: bytes) -> None:
        self.events.put_nowait(Pong(data))

    async def recv_batch(self) -> list[Any]:
        return [await self.recv()]

    async def recv(self) -> Any:
        ev = await self.events.get()
        if isinstance(ev, BaseException):
            raise ev
        return ev

    async def close(self) -> None:
        self.closed = True


class Dialer:
    """Hands out FakeClients (or raises) per region; ``gate`` holds dials until set."""

    def __init__(self) -> None:
        self.clients: dict[int, list[FakeClient]] = {}
        self.fail: dict[int, int] = {}  # region → dials still to fail
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls: list[int] = []
        self.on_call: Callable[[int], None] | None = None

    async def __call__(self, region: DERPRegion, key: bytes) -> tuple[FakeClient, DERPNode]:
        rid = region.RegionID
        self.calls.append(rid)
        if self.on_call is not None:
            self.on_call(rid)
        await self.gate.wait()
        if self.fail.get(rid, 0) != 0:
            self.fail[rid] -= 1
            raise DerpDialError(region.Nodes[0].HostName, "TCP connect failed: refused")
        c = FakeClient()
        self.clients.setdefault(rid, []).append(c)
        return c, region.Nodes[0]

    def last(self, rid: int) -> FakeClient:
        return self.clients[rid][-1]


def dmap(*rids: int, host: str = "derp.example") -> DERPMap:
    return DERPMap(Regions={
        rid: DERPRegion(RegionID=rid, RegionCode=f"r{rid}", Nodes=[
            DERPNode(Name=f"{rid}a", RegionID=rid, HostName=f"{rid}.{host}")])
        for rid in rids})


class Recorder:
    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes, bytes]] = []
        self.gone: list[tuple[int, bytes]] = []
        self.down: list[int] = []
        self.health: list[tuple[int, str]] = []

    def manager(self, dialer: Dialer, **kw: Any) -> DerpManager:
        return DerpManager(KEY, lambda r, s, p: self.packets.append((r, s, p)),
                           on_peer_gone=lambda r, k: self.gone.append((r, k)),
                           on_region_down=self.down.append,
                           on_health=lambda r, t: self.health.append((r, t)),
                           dial=dialer, **kw)


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


# --- backoff arithmetic ----------------------------------------------------------------------

def test_backoff_values() -> None:
    assert backoff_delay(0, 0.3) == 0.0
    assert backoff_delay(1, 0.5) == pytest.approx(0.010)
    assert backoff_delay(1, 0.0) == pytest.approx(0.005)
    assert backoff_delay(3, 0.5) == pytest.approx(0.090)
    assert backoff_delay(10, 0.5) == pytest.approx(1.0)
    assert backoff_delay(22, 0.5) == pytest.approx(4.84)
    assert backoff_delay(23, 0.5) == pytest.approx(MAX_BACKOFF)  # capped before the jitter
    assert backoff_delay(10_000, 0.999999) == pytest.approx(7.5, rel=1e-5)


@given(st.integers(1, 10**6), st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_bounds(n: int, jitter: float) -> None:
    d = backoff_delay(n, jitter)
    base = min(n * n * 0.010, 5.0)
    assert d == pytest.approx(base * (0.5 + jitter))
    assert 0.5 * base <= d < 1.5 * base + 1e-12
    assert backoff_delay(n + 1, jitter) >= d


@pytest.mark.asyncio
async def test_backoff_schedule_and_reset_on_success() -> None:
    clock, d, rec = Clock(), Dialer(), Recorder()
    d.fail[900] = 4
    seen: list[tuple[int, float]] = []
    m = rec.manager(d, clock=clock, rng=lambda: 0.5)
    d.on_call = lambda rid: seen.append((m.status()[rid].failures, m.status()[rid].retry_in))
    m.set_derp_map(dmap(900))
    m.set_home(900)
    await until(lambda: m.status()[900].connected)
    # The clock stands still, so retry_in is the whole backoff chosen after each failure.
    assert [f for f, _ in seen] == [0, 1, 2, 3, 4]
    assert [round(r, 6) for _, r in seen] == [0.0, 0.01, 0.04, 0.09, 0.16]
    assert rec.down == [900]  # once until the next success
    s = m.status()[900]
    assert s.failures == 0 and s.retry_in == 0 and s.last_error == "" and s.home
    c = m.counters(900)
    assert c["connect_errors"] == 4 and c["connects"] == 1 and c["reconnects"] == 0
    await m.close()


# --- the queue and send() --------------------------------------------------------------------

@pytest.mark.asyncio
async def test_queue_keeps_newest_32_while_not_connected() -> None:
    d, rec = Dialer(), Recorder()
    d.gate.clear()
    m = rec.manager(d)
    m.set_derp_map(dmap(900))
    for i in range(40):
        assert m.send(900, PEER, b"p%d" % i) is True
    s = m.status()[900]
    assert s.queued == 32 and not s.connected
    assert m.counters(900)["dropped"] == 8
    assert ("nodeagent_derp_dropped_total", "packets for DERP dropped before sending, by reason",
            {"region": "900", "reason": "queue_full"}, 8.0) in m.metrics_samples()
    d.gate.set()
    await until(lambda: 900 in d.clients and len(d.last(900).sent) == 32)
    assert d.last(900).sent == [(PEER, b"p%d" % i) for i in range(8, 40)]
    assert m.counters(900)["packets_sent"] == 32
    assert m.counters(900)["bytes_sent"] == sum(len(b"p%d" % i) for i in range(8, 40))
    await m.close()


@pytest.mark.asyncio
async def test_a_burst_to_a_connected_region_is_written_whole() -> None:
    # A WireGuard GSO burst (often more than 32 packets) must not meet the 32-packet queue
    # while the connection keeps up: it is written at once, in order, nothing dropped.
    d, rec = Dialer(), Recorder()
    m = rec.manager(d)
    m.set_derp_map(dmap(900))
    m.set_home(900)
    await until(lambda: 900 in d.clients and m.status()[900].connected)
    burst = [bytes([i]) * 100 for i in range(100)]
    assert m.send_many(900, PEER, burst)
    assert d.last(900).sent == [(PEER, p) for p in burst]
    assert not any(name == "nodeagent_derp_dropped_total" and v
                   for name, _h, _l, v in m.metrics_samples())
    await m.close()


@pytest.mark.asyncio
async def test_send_refuses_without_raising() -> None:
    d, rec = Dialer(), Recorder()
    m = rec.manager(d)
    assert m.send(900, PEER, b"x") is False  # no DERP map yet
    dm = dmap(900)
    dm.Regions[901] = DERPRegion(RegionID=901, Nodes=[DERPNode(Name="s", HostName="s",
                                                                STUNOnly=True)])
    dm.Regions[902] = DERPRegion(RegionID=902, Nodes=[])
    m.set_derp_map(dm)
    assert m.send(999, PEER, b"x") is False  # no such region
    assert m.send(901, PEER, b"x") is False  # STUN-only region
    assert m.send(902, PEER, b"x") is False  # no nodes
    assert m.send(900, b"short", b"x") is False  # not a key
    assert m.send(900, PEER, bytes(65537)) is False  # over the DERP packet limit
    assert m.send(900, None, b"x") is False  # type: ignore[arg-type]
    assert m.send(900, PEER, None) is False  # type: ignore[arg-type]
    assert d.calls == []
    assert m.send(900, PEER, b"ok") is True
    await until(lambda: 900 in d.clients and d.last(900).sent == [(PEER, b"ok")])
    await m.close()
    assert m.send(900, PEER, b"late") is False
    assert d.last(900).closed


# --- home, NotePreferred, idle close ---------------------------------------------------------

@pytest.mark.asyncio
async def test_note_preferred_follows_home() -> None:
    d, rec = Dialer(), Recorder()
    m = rec.manager(d)
    m.set_derp_map(dmap(900, 901))
    m.set_home(900)
    await until(lambda: 900 in d.clients and d.last(900).preferred == [True])
    assert m.send(901, PEER, b"x")
    await until(lambda: 901 in d.clients and d.last(901).preferred == [False])
    m.set_home(901)
    await until(lambda: d.last(900).preferred == [True, False]
                and d.last(901).preferred == [False, True])
    assert m.home == 901 and m.status()[901].home and not m.status()[900].home
    await m.close()


@pytest.mark.asyncio
async def test_idle_non_home_closed_home_kept() -> None:
    clock, d, rec = Clock(), Dialer(), Recorder()
    m = rec.manager(d, clock=clock, idle_timeout=60.0, idle_check_interval=0.01)
    m.set_derp_map(dmap(900, 901))
    m.set_home(900)
    assert m.send(901, PEER, b"x")
    await until(lambda: m.status().get(901) is not None and m.status()[901].connected
                and m.status()[900].connected)
    clock.t += 59
    await asyncio.sleep(0.05)
    assert 901 in m.status()
    assert m.send(901, PEER, b"y")  # a write restarts the idle time
    clock.t += 59
    await asyncio.sleep(0.05)
    assert 901 in m.status()
    clock.t += 2
    await until(lambda: 901 not in m.status())
    await until(lambda: d.clients[901][0].closed)
    assert rec.down == [901]
    clock.t += 1000
    await asyncio.sleep(0.05)
    assert m.status()[900].connected  # home is never idle-closed
    # The old home becomes an ordinary region: idle-closed once unwritten for the idle time.
    m.set_home(0)
    clock.t += 61
    await until(lambda: 900 not in m.status())
    await m.close()


# --- events, Restarting, map changes, ping ---------------------------------------------------

@pytest.mark.asyncio
async def test_events_reach_callbacks_and_raising_callback_is_contained() -> None:
    d = Dialer()
    got: list[bytes] = []
    gone: list[tuple[int, bytes]] = []
    health: list[tuple[int, str]] = []

    def on_packet(region: int, src: bytes, pkt: bytes) -> None:
        if pkt == b"boom":
            raise RuntimeError("callback bug")
        got.append(pkt)

    m = DerpManager(KEY, on_packet, on_peer_gone=lambda r, k: gone.append((r, k)),
                    on_health=lambda r, t: health.append((r, t)), dial=d)
    m.set_derp_map(dmap(900))
    m.set_home(900)
    await until(lambda: 900 in d.clients)
    c = d.last(900)
    for ev in (ReceivedPacket(PEER, b"boom"), ReceivedPacket(PEER, b"one"),
               PeerGone(PEER, 0), Health("duplicate connection"), Health("")):
        c.events.put_nowait(ev)
    await until(lambda: len(health) == 2)
    assert got == [b"one"] and gone == [(900, PEER)]
    assert health == [(900, "duplicate connection"), (900, "")]
    assert m.status()[900].connected and m.status()[900].health == ""
    assert m.counters(900)["packets_received"] == 2
    samples = {(n, tuple(sorted(lb.items()))): v for n, _, lb, v in m.metrics_samples()}
    assert samples[("nodeagent_derp_callback_errors_total", ())] == 1.0
    await m.close()


@pytest.mark.asyncio
async def test_restarting_postpones_redial_by_announced_delay() -> None:
    clock, d, rec = Clock(), Dialer(), Recorder()
    m = rec.manager(d, clock=clock, rng=lambda: 0.5)
    m.set_derp_map(dmap(900))
    m.set_home(900)
    await until(lambda: 900 in d.clients)
    c = d.last(900)
    c.events.put_nowait(Restarting(reconnect_in_ms=300, try_for_ms=60000))
    c.events.put_nowait(ConnectionError("DERP connection closed by server"))
    await until(lambda: not m.status()[900].connected)
    s = m.status()[900]
    assert s.last_error.startswith("server restarting") and s.failures == 0
    assert s.retry_in == pytest.approx(0.3)
    assert rec.down == [900] and c.closed
    t0 = asyncio.get_running_loop().time()
    await until(lambda: len(d.clients[900]) == 2 and m.status()[900].connected)
    assert asyncio.get_running_loop().time() - t0 >= 0.25
    assert m.counters(900)["reconnects"] == 1 and m.counters(900)["disconnects"] == 1
    await m.close()


@pytest.mark.asyncio
async def test_lost_connection_backs_off_and_home_redials() -> None:
    clock, d, rec = Clock(), Dialer(), Recorder()
    m = rec.manager(d, clock=clock, rng=lambda: 0.0)
    m.set_derp_map(dmap(900, 901))
    m.set_home(900)
    assert m.send(901, PEER, b"x")
    await until(lambda: 900 in d.clients and 901 in d.clients)
    d.last(900).events.put_nowait(ConnectionError("reset"))
    d.last(901).events.put_nowait(ConnectionError("reset"))
    await until(lambda: len(d.clients[900]) == 2)  # home: redialled after the backoff
    assert sorted(rec.down) == [900, 901]
    s = m.status()[901]
    assert not s.connected and s.failures == 1 and s.last_error == "reset"
    await asyncio.sleep(0.05)
    assert len(d.clients[901]) == 1  # not home, nothing queued: no redial
    assert m.send(901, PEER, b"y")  # needed again: redialled (after its backoff)
    await until(lambda: len(d.clients[901]) == 2 and d.last(901).sent == [(PEER, b"y")])
    await m.close()


@pytest.mark.asyncio
async def test_derp_map_change_closes_changed_regions() -> None:
    d, rec = Dialer(), Recorder()
    m = rec.manager(d)
    m.set_derp_map(dmap(900, 901))
    m.set_home(900)
    assert m.send(901, PEER, b"x")
    await until(lambda: 900 in d.clients and 901 in d.clients)
    c900, c901 = d.last(900), d.last(901)
    m.set_derp_map(dmap(900, 901))  # same definitions: nothing happens
    await asyncio.sleep(0.02)
    assert not c900.closed and not c901.closed and rec.down == []
    m.set_derp_map(dmap(900, 901, host="moved.example"))  # both changed
    await until(lambda: c900.closed and c901.closed)
    await until(lambda: len(d.clients[900]) == 2)  # home redialled with its new definition
    assert 901 not in m.status() and m.home == 900
    assert sorted(rec.down) == [900, 901]
    m.set_derp_map(dmap(901))  # the home region is gone: no home
    await until(lambda: d.clients[900][1].closed)
    assert m.home == 0 and m.status() == {}
    m.set_derp_map(None)
    assert m.send(901, PEER, b"x") is False
    await m.close()


@pytest.mark.asyncio
async def test_ping_measures_latency() -> None:
    d, rec = Dialer(), Recorder()
    m = rec.manager(d)
    m.set_derp_map(dmap(900))
    with pytest.raises(ConnectionError):
        await m.ping(900)
    m.set_home(900)
    await until(lambda: m.status()[900].connected)
    rtt = await m.ping(900)
    assert rtt >= 0 and m.status()[900].latency == rtt
    await m.close()


@pytest.mark.asyncio
async def test_metrics_samples_house_style() -> None:
    d, rec = Dialer(), Recorder()
    m = rec.manager(d)
    m.set_derp_map(dmap(900))
    m.set_home(900)
    assert m.send(900, PEER, b"abc")
    await until(lambda: m.counters(900)["packets_sent"] == 1)
    samples = m.metrics_samples()
    names = {n for n, _, _, _ in samples}
    for n in ("nodeagent_derp_packets_sent_total", "nodeagent_derp_bytes_sent_total",
              "nodeagent_derp_packets_received_total", "nodeagent_derp_bytes_received_total",
              "nodeagent_derp_reconnects_total", "nodeagent_derp_connected",
              "nodeagent_derp_home_region"):
        assert n in names
    for _n, h, labels, v in samples:
        assert isinstance(h, str) and h and isinstance(v, float)
        assert all(isinstance(k, str) and isinstance(x, str) for k, x in labels.items())
    by = {(n, labels.get("region")): v for n, _, labels, v in samples}
    assert by[("nodeagent_derp_bytes_sent_total", "900")] == 3.0
    assert by[("nodeagent_derp_connected", "900")] == 1.0
    assert by[("nodeagent_derp_home_region", None)] == 900.0
    await m.close()
