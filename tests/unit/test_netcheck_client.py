"""The asyncio netcheck adapter through its StunTransport seam, with an in-memory transport
that answers like STUN servers (no sockets): matching, early stop, the STUN-phase limit, send
errors, and incremental reports with a shared history."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest

from nodeagent.netcheck.client import NetcheckClient, StunReceiver, run_netcheck
from nodeagent.netcheck.report import MS, ReportHistory
from nodeagent.stun import codec as C
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion


class FakeStun:
    """Answers binding requests after a per-destination delay, naming a per-destination mapped
    address; ``errors`` maps a destination IP to the errno its send raises."""

    def __init__(self, delays: dict[str, float], mapped: dict[str, tuple[str, int]],
                 errors: dict[str, int] | None = None) -> None:
        self.delays = delays
        self.mapped = mapped
        self.errors = errors or {}
        self.receiver: StunReceiver | None = None
        self.sent: list[tuple[str, int]] = []

    def attach(self, receiver: StunReceiver | None) -> None:
        self.receiver = receiver

    def send(self, addr: tuple[str, int], data: bytes) -> None:
        if addr[0] in self.errors:
            raise OSError(self.errors[addr[0]], "fake send error")
        self.sent.append(addr)
        kind, txid = C.parse_binding_request(data, strict=True)
        assert kind == C.KIND_TAILNODE  # Tailscale's exact request form
        delay = self.delays.get(addr[0])
        if delay is None:
            return
        host, port = self.mapped[addr[0]]

        def answer() -> None:
            if self.receiver is not None:
                self.receiver(b"junk that is not STUN", addr)
                self.receiver(C.build_binding_response(txid, host, port), addr)

        asyncio.get_running_loop().call_later(delay, answer)


def four_regions() -> DERPMap:
    regions = {}
    for i in range(1, 5):
        regions[i] = DERPRegion(RegionID=i, RegionCode=f"r{i}", RegionName=f"R{i}", Nodes=[
            DERPNode(Name=f"{i}a", RegionID=i, HostName=f"derp{i}.example",
                     IPv4=f"192.0.2.{i}", IPv6="none", STUNPort=3478)])
    return DERPMap(Regions=regions)


@pytest.mark.asyncio
async def test_replies_matched_and_early_stop_after_three_regions() -> None:
    fake = FakeStun(delays={"192.0.2.1": 0.01, "192.0.2.2": 0.02, "192.0.2.3": 0.03,
                            "192.0.2.4": 2.0},
                    mapped={"192.0.2.1": ("203.0.113.5", 41641),
                            "192.0.2.2": ("203.0.113.5", 41641),
                            "192.0.2.3": ("203.0.113.5", 5000),
                            "192.0.2.4": ("203.0.113.5", 41641)})
    t0 = time.monotonic()
    r = await run_netcheck(four_regions(), send_stun=fake, have_v4=True, have_v6=False)
    took = time.monotonic() - t0
    # Early stop: 2 x the slowest of the first three (~30 ms), far below region 4's 2 s.
    assert took < 1.0, took
    assert set(r.RegionLatency) == {1, 2, 3} and r.UDP and r.IPv4 and r.IPv4CanSend
    assert 10 * MS <= r.RegionLatency[1] < r.RegionLatency[3]
    assert r.GlobalV4 == "203.0.113.5:41641" and r.MappingVariesByDestIP is True
    assert r.PreferredDERP == 1 and r.Now is not None
    assert fake.receiver is None  # detached after the report
    assert ("192.0.2.1", 3478) in fake.sent and all(p == 3478 for _, p in fake.sent)


@pytest.mark.asyncio
async def test_no_reply_ends_the_stun_phase_at_its_limit() -> None:
    fake = FakeStun(delays={}, mapped={})
    dm = four_regions()
    for reg in dm.Regions.values():  # no HTTPS fallback target either
        reg.Nodes[0].STUNOnly = True
    t0 = time.monotonic()
    r = await run_netcheck(dm, send_stun=fake, have_v4=True, have_v6=False, stun_timeout=0.3)
    took = time.monotonic() - t0
    assert 0.25 < took < 2.0, took
    assert not r.UDP and r.IPv4CanSend and r.RegionLatency == {} and r.PreferredDERP == 0
    assert len(fake.sent) == 4 * 3  # three tries per region: no reply ends a set


@pytest.mark.asyncio
async def test_send_errors_and_can_send() -> None:
    dm = DERPMap(Regions={1: DERPRegion(RegionID=1, Nodes=[
        DERPNode(Name="1a", RegionID=1, IPv4="192.0.2.1", IPv6="2001:db8::1", STUNOnly=True)])})
    fake = FakeStun(delays={}, mapped={}, errors={"2001:db8::1": errno.ENETUNREACH,
                                                  "192.0.2.1": errno.EPERM})
    t0 = time.monotonic()
    r = await run_netcheck(dm, send_stun=fake, have_v4=True, have_v6=True, stun_timeout=2.0)
    # EPERM is "lost UDP" (can send); ENETUNREACH is not, and ends the IPv6 set at once, but the
    # IPv4 set waits for replies until the phase limit.
    assert r.IPv4CanSend and not r.IPv6CanSend and not r.UDP
    assert time.monotonic() - t0 > 1.5


@pytest.mark.asyncio
async def test_unsendable_plan_ends_early() -> None:
    dm = DERPMap(Regions={1: DERPRegion(RegionID=1, Nodes=[
        DERPNode(Name="1a", RegionID=1, HostName="", STUNPort=-1, STUNOnly=True)])})
    fake = FakeStun(delays={}, mapped={})
    t0 = time.monotonic()
    r = await run_netcheck(dm, send_stun=fake, have_v4=True, have_v6=True)
    assert time.monotonic() - t0 < 1.0 and fake.sent == [] and not r.IPv4CanSend


@pytest.mark.asyncio
async def test_history_makes_the_second_report_incremental() -> None:
    dm = four_regions()
    fake = FakeStun(delays={f"192.0.2.{i}": 0.005 * i for i in range(1, 5)},
                    mapped={f"192.0.2.{i}": ("203.0.113.5", 1) for i in range(1, 5)})
    t = [100.0]
    history = ReportHistory(lambda: t[0])
    client = NetcheckClient(transport=fake, history=history, have_v4=True, have_v6=False)
    first = await client.get_report(dm, verbose=True)
    assert set(first.RegionLatency) == {1, 2, 3, 4} and first.PreferredDERP == 1
    assert history.last is first and not history.next_is_full()
    fake.sent.clear()
    t[0] += 10
    second = await client.get_report(dm)
    # Incremental: the 3 fastest regions (home = region 1 among them), not region 4.
    assert {a for a, _ in fake.sent} <= {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    assert second.PreferredDERP == 1
    # The client's receiver is only attached during a report.
    assert client.receive_stun(C.build_binding_response(C.new_txid(), "1.2.3.4", 1),
                               ("192.0.2.1", 3478)) is False
