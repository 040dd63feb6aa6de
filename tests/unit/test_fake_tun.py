"""FakeTun behaves like the real device from the data path's point of view."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.filter import ACCEPT
from nodeagent.packet import IPV4, Parsed, build_udp, parse_into
from nodeagent.tundev.device import READ_BATCH, TunError
from nodeagent.tundev.fake import FakeTun
from nodeagent.tundev.wrapper import Wrapper

A = 0x64400001  # 100.64.0.1
B = 0x64400002  # 100.64.0.2


def udp(n: int) -> bytes:
    return build_udp(4, A, B, 40000 + n, 53, b"x%d" % n)


@pytest.mark.asyncio
async def test_inject_delivers_batches_in_order() -> None:
    tun = FakeTun()
    got: list[list[bytes]] = []
    tun.start(asyncio.get_running_loop(), got.append)
    pkts = [udp(i) for i in range(READ_BATCH + 5)]
    tun.inject(pkts)
    assert [len(b) for b in got] == [READ_BATCH, 5]
    flat = [p for b in got for p in b]
    assert flat == pkts
    p = Parsed()
    assert parse_into(flat[-1], p) == IPV4 and p.src_port == 40000 + READ_BATCH + 4


@pytest.mark.asyncio
async def test_inject_before_start_is_queued_until_the_loop_runs() -> None:
    tun = FakeTun()
    tun.inject([udp(1), udp(2)])
    got: list[bytes] = []
    done = asyncio.Event()

    def on_packets(batch: list[bytes]) -> None:
        got.extend(batch)
        done.set()

    tun.start(asyncio.get_running_loop(), on_packets)
    assert got == []  # delivered from the loop, not inside start()
    await asyncio.wait_for(done.wait(), 2)
    assert got == [udp(1), udp(2)]


@pytest.mark.asyncio
async def test_wait_written_wakes_on_enough_writes() -> None:
    tun = FakeTun("t0", mtu=1400)
    assert (tun.name, tun.mtu) == ("t0", 1400)
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(tun.wait_written(3, timeout=2))
    loop.call_soon(tun.write_many, [udp(1), udp(2)])
    loop.call_soon(tun.write_many, [udp(3)])
    got = await waiter
    assert got == [udp(1), udp(2), udp(3)] == tun.written


@pytest.mark.asyncio
async def test_wait_written_times_out_with_count() -> None:
    tun = FakeTun()
    tun.write_many([udp(1)])
    with pytest.raises(TimeoutError, match="got 1"):
        await tun.wait_written(2, timeout=0.05)
    assert tun._waiters == []
    assert await tun.wait_written(1, timeout=0.05) == [udp(1)]  # already satisfied


@pytest.mark.asyncio
async def test_close_is_idempotent_and_counts_later_writes() -> None:
    tun = FakeTun()
    got: list[bytes] = []
    tun.start(asyncio.get_running_loop(), got.extend)
    waiter = asyncio.ensure_future(tun.wait_written(1, timeout=2))
    await asyncio.sleep(0)  # let the waiter register (scheduling, not synchronisation)
    tun.close()
    tun.close()
    with pytest.raises(TunError, match="closed"):
        await waiter
    tun.write_many([udp(1), udp(2)])
    assert tun.written == [] and tun.write_errors == 2
    with pytest.raises(TunError):
        tun.inject([udp(1)])
    with pytest.raises(TunError):
        tun.start(asyncio.get_running_loop(), got.extend)


def test_double_start_refused() -> None:
    tun = FakeTun()
    loop = asyncio.new_event_loop()
    try:
        tun.start(loop, lambda b: None)
        with pytest.raises(TunError, match="already started"):
            tun.start(loop, lambda b: None)
    finally:
        loop.close()


@pytest.mark.asyncio
async def test_callback_closing_stops_delivery() -> None:
    tun = FakeTun()
    batches: list[list[bytes]] = []

    def on_packets(batch: list[bytes]) -> None:
        batches.append(batch)
        tun.close()

    tun.start(asyncio.get_running_loop(), on_packets)
    tun.inject([udp(i) for i in range(READ_BATCH * 2)])
    assert len(batches) == 1


@pytest.mark.asyncio
async def test_wrapper_runs_on_fake_tun() -> None:
    """The Wrapper's TunLike contract: start wires from_host, from_peer writes to the host."""
    filt = _accept_all_filter()
    tun = FakeTun()
    w = Wrapper(tun, filt)
    out: list[bytes] = []
    w.set_outbound_sink(out.extend)
    w.start(asyncio.get_running_loop())
    tun.inject([udp(1)])
    assert out == [udp(1)]
    w.from_peer([build_udp(4, B, A, 53, 40001, b"r")])
    assert await tun.wait_written(1, timeout=1) == [build_udp(4, B, A, 53, 40001, b"r")]
    w.close()
    assert tun.closed


def _accept_all_filter() -> object:
    class AcceptAll:
        shields_up = False

        def check_out(self, p: Parsed) -> int:
            return ACCEPT

        def check_in(self, p: Parsed) -> int:
            return ACCEPT

    return AcceptAll()
