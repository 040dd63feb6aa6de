"""The sans-IO netcheck core (specs/reference/netcheck.md): probe plans (§3), bookkeeping (§4),
the HTTPS fallback's bookkeeping (§5), PreferredDERP hysteresis (§6, each rule on a fake clock),
the Report's JSON (§1) and the CLI's text form (§8); plus the DERP map's JSON shape."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from nodeagent.netcheck.report import (
    MS,
    V4,
    V6,
    Probe,
    Report,
    ReportBuilder,
    ReportHistory,
    StunTarget,
    format_go_duration,
    format_rfc3339nano,
    global_addrs,
    make_probe_plan,
    make_probe_plan_initial,
    render_text,
    round_duration,
    stun_target,
)
from nodeagent.stun import codec as C
from nodeagent.tailcfg import (
    DERPHomeParams,
    DERPMap,
    DERPNode,
    DERPRegion,
    WireError,
    derpmap_from_wire,
    derpmap_to_json,
    marshal_json,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def node(name: str, region: int, **kw: object) -> DERPNode:
    return DERPNode(Name=name, RegionID=region, HostName=f"{name}.example", **kw)  # type: ignore[arg-type]


def region(rid: int, *nodes: DERPNode, code: str = "", name: str = "", **kw: object) -> DERPRegion:
    return DERPRegion(RegionID=rid, RegionCode=code or f"r{rid}", RegionName=name or f"R{rid}",
                      Nodes=list(nodes), **kw)  # type: ignore[arg-type]


def dmap(*regions: DERPRegion) -> DERPMap:
    return DERPMap(Regions={r.RegionID: r for r in regions})


def shape(plan: dict[str, list[Probe]]) -> dict[str, list[tuple[float, str]]]:
    return {k: [(round(p.delay, 6), p.node.Name) for p in v] for k, v in plan.items()}


def lat(**by_region: float) -> dict[int, int]:
    """Latencies in ms keyed r<id>=ms → {id: ns}."""
    return {int(k[1:]): int(v * MS) for k, v in by_region.items()}


# --- §3 probe plans ----------------------------------------------------------------------------


def test_initial_plan_every_measured_region_three_tries_per_family() -> None:
    dm = dmap(region(1, node("1a", 1), node("1b", 1)),
              region(2, node("2a", 2), NoMeasureNoHome=True),
              region(3, node("3a", 3, IPv6="none"), Avoid=True),
              region(4))
    plan = make_probe_plan_initial(dm, have_v4=True, have_v6=True)
    assert shape(plan) == {
        "region-1-v4": [(0.0, "1a"), (0.1, "1b"), (0.2, "1a")],
        "region-1-v6": [(0.0, "1a"), (0.1, "1b"), (0.2, "1a")],
        "region-3-v4": [(0.0, "3a"), (0.1, "3a"), (0.2, "3a")],  # Avoid is still measured
    }
    assert all(p.family == V4 for p in plan["region-1-v4"])
    assert all(p.family == V6 and p.region == 1 for p in plan["region-1-v6"])


def test_initial_plan_follows_interfaces_except_for_test_nodes() -> None:
    dm = dmap(region(1, node("1a", 1)), region(2, node("2a", 2, IPv4="127.0.0.1")),
              region(3, node("3a", 3, STUNTestIP="::1", IPv4="none")))
    plan = make_probe_plan_initial(dm, have_v4=False, have_v6=False)
    assert sorted(plan) == ["region-2-v4", "region-2-v6", "region-3-v6"]
    only4 = make_probe_plan_initial(dm, have_v4=True, have_v6=False)
    assert sorted(only4) == ["region-1-v4", "region-2-v4", "region-2-v6", "region-3-v6"]


def _five_regions() -> DERPMap:
    return dmap(*(region(i, node(f"{i}a", i), node(f"{i}b", i)) for i in range(1, 6)))


def test_incremental_plan_three_fastest_plus_home_with_tries_and_delays() -> None:
    last = Report(RegionLatency=lat(r1=10, r2=20, r3=30, r4=40, r5=50),
                  RegionV4Latency=lat(r1=10), RegionV6Latency=lat(r1=11), PreferredDERP=4)
    plan = make_probe_plan(_five_regions(), have_v4=True, have_v6=True, last=last)
    assert shape(plan) == {
        "region-1-v4": [(0.0, "1a"), (0.012, "1b")],
        "region-1-v6": [(0.0, "1a"), (0.012, "1b")],
        "region-2-v4": [(0.0, "2a"), (0.024, "2b")],
        "region-2-v6": [(0.0, "2a"), (0.024, "2b")],
        # third region, dual-stack: even sorted index → IPv4 only
        "region-3-v4": [(0.0, "3a")],
        # the home (sorted index 3, odd → IPv6 only) gets 4 tries: t*48ms (+ t*50ms for t>1)
        "region-4-v6": [(0.0, "4a"), (0.048, "4b"), (0.196, "4a"), (0.294, "4b")],
    }


def test_incremental_plan_without_ipv6_last_time() -> None:
    last = Report(RegionLatency=lat(r1=10, r2=20, r3=30, r4=40),
                  RegionV4Latency=lat(r1=10, r2=20, r3=30, r4=40), PreferredDERP=4)
    plan = make_probe_plan(_five_regions(), have_v4=True, have_v6=True, last=last)
    s = shape(plan)
    # No IPv6 results last time: IPv6 only on the first try, and not for slower non-home regions.
    assert s["region-1-v6"] == [(0.0, "1a")] and s["region-2-v6"] == [(0.0, "2a")]
    assert "region-3-v6" not in s and s["region-3-v4"] == [(0.0, "3a")]
    assert s["region-4-v6"] == [(0.0, "4a")] and len(s["region-4-v4"]) == 4
    assert "region-5-v4" not in s  # not among the 3 fastest, not home


def test_incremental_plan_region_selection() -> None:
    dm = dmap(region(1, node("1a", 1), Avoid=True), region(2, node("2a", 2)),
              region(3, node("3a", 3), NoMeasureNoHome=True), region(4, node("4a", 4)),
              region(5, node("5a", 5)), region(6, node("6a", 6)), region(7))
    last = Report(RegionLatency=lat(r1=1, r3=1, r6=5, r5=9), RegionV4Latency=lat(r6=5))
    plan = make_probe_plan(dm, have_v4=True, have_v6=False, last=last)
    # Avoid and NoMeasureNoHome dropped; measured by latency (6, 5), then unmeasured by ID (2).
    assert sorted(plan) == ["region-2-v4", "region-5-v4", "region-6-v4"]
    assert [p.delay for p in plan["region-2-v4"]] == [0.0]  # third: one try
    assert [round(p.delay, 6) for p in plan["region-6-v4"]] == [0.0, 0.006]
    # An Avoid region that is home stays in (and gets its four tries).
    home = make_probe_plan(dm, have_v4=True, have_v6=False,
                           last=Report(RegionLatency=last.RegionLatency, PreferredDERP=1))
    assert len(home["region-1-v4"]) == 4
    # Unknown latency for a planned region: 200 ms spacing.
    assert [round(p.delay, 6) for p in
            make_probe_plan(dm, have_v4=True, have_v6=False,
                            last=Report(RegionLatency=lat(r6=5), PreferredDERP=2))
            ["region-2-v4"]] == [0.0, 0.2, 0.5, 0.75]


def test_incremental_plan_without_latencies_is_the_full_plan() -> None:
    dm = _five_regions()
    full = make_probe_plan_initial(dm, have_v4=True, have_v6=False)
    assert shape(make_probe_plan(dm, have_v4=True, have_v6=False, last=None)) == shape(full)
    assert shape(make_probe_plan(dm, have_v4=True, have_v6=False, last=Report())) == shape(full)


@pytest.mark.parametrize("kw,family,want", [
    ({}, V4, StunTarget("n.example", 3478, resolve=True)),
    ({"STUNPort": -1}, V4, None),
    ({"STUNPort": 70000}, V4, None),
    ({"IPv4": "192.0.2.7", "STUNPort": 3479}, V4, StunTarget("192.0.2.7", 3479)),
    ({"IPv4": "none"}, V4, None),
    ({"IPv4": "none"}, V6, StunTarget("n.example", 3478, resolve=True)),
    ({"IPv6": "2001:db8::7"}, V6, StunTarget("2001:db8::7", 3478)),
    ({"IPv6": "192.0.2.7"}, V6, None),
    ({"STUNTestIP": "127.0.0.1", "IPv4": "192.0.2.7"}, V4, StunTarget("127.0.0.1", 3478)),
    ({"STUNTestIP": "127.0.0.1"}, V6, None),
    ({"HostName": "198.51.100.1"}, V4, StunTarget("198.51.100.1", 3478)),
    ({"HostName": "198.51.100.1"}, V6, None),
    ({"HostName": ""}, V4, None),
])
def test_stun_target(kw: dict[str, object], family: int, want: StunTarget | None) -> None:
    n = DERPNode(Name="n", HostName="n.example")
    for k, v in kw.items():
        setattr(n, k, v)
    assert stun_target(n, family) == want


# --- §4 bookkeeping ----------------------------------------------------------------------------


def _probe(rid: int, family: int = V4) -> Probe:
    return Probe(0.0, rid, node(f"{rid}a", rid), family)


def _reply(b: ReportBuilder, probe: Probe, host: str, port: int, sent: int, got: int) -> bool:
    txid = C.new_txid()
    b.note_sent(probe, txid, sent)
    b.note_send_result(probe, txid, True)
    return b.receive(C.build_binding_response(txid, host, port), got)


def _builder(*rids: int, full: bool = True) -> ReportBuilder:
    plan = {}
    for rid in rids:
        for fam in (V4, V6):
            p = _probe(rid, fam)
            plan[p.set_name] = [p]
    return ReportBuilder(plan, full=full)


def test_one_ipv4_reply_leaves_mapping_unknown() -> None:
    b = _builder(1)
    assert _reply(b, _probe(1), "203.0.113.5", 41641, 0, 12 * MS)
    r = b.report
    assert r.UDP and r.IPv4 and not r.IPv6 and r.IPv4CanSend and not r.IPv6CanSend
    assert r.GlobalV4 == "203.0.113.5:41641" and r.GlobalV4Counters == {"203.0.113.5:41641": 1}
    assert r.RegionLatency == r.RegionV4Latency == {1: 12 * MS} and r.RegionV6Latency == {}
    assert r.MappingVariesByDestIP is None


def test_mapping_same_then_different() -> None:
    b = _builder(1, 2, 3)
    _reply(b, _probe(1), "203.0.113.5", 41641, 0, 5 * MS)
    _reply(b, _probe(2), "203.0.113.5", 41641, 0, 9 * MS)
    assert b.report.MappingVariesByDestIP is False
    _reply(b, _probe(3), "203.0.113.5", 5555, 0, 7 * MS)
    assert b.report.MappingVariesByDestIP is True
    assert b.report.GlobalV4 == "203.0.113.5:41641"  # the first reply's
    assert b.report.GlobalV4Counters == {"203.0.113.5:41641": 2, "203.0.113.5:5555": 1}
    assert global_addrs(b.report) == ["203.0.113.5:41641"]


def test_different_first_two_replies_vary() -> None:
    b = _builder(1, 2)
    _reply(b, _probe(1), "203.0.113.5", 1, 0, 5 * MS)
    _reply(b, _probe(2), "203.0.113.6", 1, 0, 5 * MS)
    assert b.report.MappingVariesByDestIP is True


def test_ipv6_reply_and_minimum_latencies() -> None:
    b = _builder(1)
    _reply(b, _probe(1, V6), "2001:db8::5", 41641, 0, 30 * MS)
    _reply(b, _probe(1, V6), "2001:db8::5", 41641, 100, 20 * MS + 100)
    _reply(b, _probe(1, V4), "203.0.113.5", 41641, 0, 25 * MS)
    r = b.report
    assert r.IPv6 and r.GlobalV6 == "[2001:db8::5]:41641"
    assert r.GlobalV6Counters == {"[2001:db8::5]:41641": 2}
    assert r.RegionV6Latency == {1: 20 * MS} and r.RegionV4Latency == {1: 25 * MS}
    assert r.RegionLatency == {1: 20 * MS}
    assert r.MappingVariesByDestIP is None  # IPv6 replies do not count


def test_receive_ignores_what_is_not_ours() -> None:
    b = _builder(1)
    p = _probe(1)
    txid = C.new_txid()
    b.note_sent(p, txid, 0)
    assert not b.receive(b"hello", 1)
    assert not b.receive(C.build_binding_request(txid), 1)  # a request, not a response
    assert not b.receive(C.build_binding_response(C.new_txid(), "1.2.3.4", 1), 1)
    good = C.build_binding_response(txid, "1.2.3.4", 1)
    assert b.receive(good, 1) and not b.receive(good, 2)  # a duplicate is ignored
    assert b.report.GlobalV4Counters == {"1.2.3.4:1": 1}
    late = C.new_txid()
    b.note_sent(p, late, 0)
    b.finish(datetime(2024, 1, 1, tzinfo=UTC))
    assert not b.receive(C.build_binding_response(late, "1.2.3.4", 1), 3)


def test_first_reply_ends_its_set_and_probes_stop_helping() -> None:
    b = _builder(1, 2)
    assert b.should_fire(_probe(1)) and not b.all_sets_done()
    _reply(b, _probe(1), "203.0.113.5", 1, 0, MS)
    assert b.set_done("region-1-v4") and not b.should_fire(_probe(1))
    # Region 1 has a latency and the mapping is unknown: another IPv4 probe still helps...
    p = Probe(0.1, 1, node("1b", 1), V4)
    assert b.would_help(p)
    _reply(b, _probe(2), "203.0.113.5", 1, 0, MS)
    # ...not once it is known; firing it is refused and cancels its set.
    b2 = ReportBuilder({"region-1-v4": [p, Probe(0.2, 1, node("1c", 1), V4)]})
    b2.report = b.report
    assert not b2.should_fire(p) and b2.set_done("region-1-v4")
    # IPv6 helps while there is no IPv6 result at all.
    assert b.would_help(_probe(1, V6))


def test_a_set_with_nothing_sendable_is_done() -> None:
    p1, p2 = Probe(0, 1, node("a", 1), V6), Probe(0.1, 1, node("b", 1), V6)
    b = ReportBuilder({"region-1-v6": [p1, p2]})
    b.note_unsendable(p1)
    assert not b.all_sets_done()
    txid = C.new_txid()
    b.note_sent(p2, txid, 0)
    b.note_send_result(p2, txid, False)  # a hard send error
    assert b.all_sets_done() and not b.report.IPv6CanSend


def test_early_stop_after_the_third_region() -> None:
    full = _builder(1, 2, 3, 4)
    for rid, ms in ((1, 10), (2, 30)):
        _reply(full, _probe(rid), "203.0.113.5", 1, 0, ms * MS)
    assert full.take_early_stop() is None
    _reply(full, _probe(3), "203.0.113.5", 1, 0, 20 * MS)
    assert full.take_early_stop() == 60 * MS  # slowest so far, doubled for a full report
    assert full.take_early_stop() is None
    inc = _builder(1, 2, 3, full=False)
    for rid, ms in ((1, 10), (2, 30), (3, 20)):
        _reply(inc, _probe(rid), "203.0.113.5", 1, 0, ms * MS)
    assert inc.take_early_stop() == 30 * MS
    verbose = ReportBuilder({}, verbose=True)
    for rid in (1, 2, 3, 4):
        verbose.add_node_latency(rid, "203.0.113.5", 1, MS)
    assert verbose.take_early_stop() is None  # verbose waits for 100 regions


def test_https_latency_bookkeeping() -> None:
    dm = dmap(region(1, node("1a", 1)), region(2, node("2a", 2, STUNOnly=True)),
              region(3, node("3a", 3), Avoid=True), region(4, node("4a", 4), NoMeasureNoHome=True),
              region(5, node("5s", 5, STUNOnly=True), node("5a", 5)), region(6))
    b = ReportBuilder({})
    assert b.https_regions(dm) == [1, 5]
    b.add_https_latency(1, 40 * MS, V4)
    b.add_https_latency(1, 50 * MS, V6)
    r = b.report
    assert r.RegionLatency == {1: 40 * MS} and r.IPv4 and r.IPv6 and not r.UDP
    assert r.RegionV4Latency == {} and r.GlobalV4 == ""
    assert b.https_regions(dm) == [5]


# --- §6 PreferredDERP and hysteresis -----------------------------------------------------------


def _rep(**ms: float) -> Report:
    return Report(RegionLatency=lat(**ms))


def test_first_report_picks_the_lowest_latency() -> None:
    h = ReportHistory(FakeClock())
    assert h.add_report(_rep(r1=30, r2=20, r3=25), None) == 2


def test_rule1_best_recent_over_five_minutes_and_region_scores() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    assert h.add_report(_rep(r1=10, r2=30), None) == 1
    clock.t += 60
    # Region 1 is slow now, but its best in the last 5 minutes (10 ms) still wins.
    assert h.add_report(_rep(r1=50, r2=30), None) == 1
    clock.t += 250  # the 10 ms report is now older than 5 minutes
    h.last = Report(PreferredDERP=0)  # no hysteresis: look at the choice alone
    assert h.add_report(_rep(r1=50, r2=30), None) == 2
    # A RegionScore multiplies latencies (history and current).
    scored = ReportHistory(FakeClock())
    dm = DERPMap(HomeParams=DERPHomeParams(RegionScore={2: 0.5}))
    assert scored.add_report(_rep(r1=20, r2=30), dm) == 2


def test_rule2_candidate_must_have_a_latency_now() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    h.add_report(_rep(r1=5, r2=30), None)
    clock.t += 10
    h.last = Report()  # forget the home so only rule 2 speaks
    assert h.add_report(_rep(r2=30, r3=40), None) == 2  # region 1's 5 ms is not current


def test_rule3_keep_old_home_within_10ms() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    assert h.add_report(_rep(r1=20, r2=40), None) == 1
    clock.t += 30
    # Region 2 is now better by 9 ms (and by more than a third? no: 11 vs 20 is 45% faster,
    # but the absolute gap is under 10 ms) → keep 1.
    assert h.add_report(_rep(r1=20, r2=11), None) == 1


def test_rule3_keep_old_home_unless_a_third_faster() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    assert h.add_report(_rep(r1=60, r2=90), None) == 1
    clock.t += 30
    # 45 ms vs the home's 60 ms: 15 ms better but not a third faster (limit 40 ms) → keep 1.
    assert h.add_report(_rep(r1=60, r2=45), None) == 1
    clock.t += 30
    # 39 ms is more than a third faster and more than 10 ms better → switch.
    assert h.add_report(_rep(r1=60, r2=39), None) == 2


def test_rule3_old_home_accessible_through_recent_derp_frames() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    assert h.add_report(_rep(r1=60, r2=90), None) == 1
    clock.t += 30
    h.note_derp_frame(1)  # heard from the home 0 s ago
    clock.t += 5
    # No latency for the home in this report, but a frame 5 s ago: keep it.
    assert h.add_report(_rep(r2=20), None) == 1
    clock.t += 4  # now 9 s since the frame
    assert h.add_report(_rep(r2=20), None) == 2
    # A frame since the report started counts however long the report took.
    h2 = ReportHistory(clock)
    h2.add_report(_rep(r1=60), None)
    started = clock.t
    clock.t += 3
    h2.note_derp_frame(1)
    clock.t += 20
    assert h2.add_report(_rep(r2=5), None, started=started) == 1


def test_rule4_forced_region() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    h.force_region = 3
    assert h.add_report(_rep(r1=10, r3=90), None) == 3
    assert h.add_report(_rep(r1=10), None) == 1  # no latency and no DERP activity: not forced
    h.note_derp_frame(3)
    assert h.add_report(_rep(r1=10), None) == 3


def test_rule5_no_latencies_keep_home_heard_within_120s() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    assert h.add_report(_rep(r1=10), None) == 1
    h.note_derp_frame(1)
    clock.t += 100
    assert h.add_report(Report(), None) == 1
    clock.t += 30  # 130 s since the last frame
    assert h.add_report(Report(), None) == 0


def test_full_or_incremental() -> None:
    clock = FakeClock()
    h = ReportHistory(clock)
    assert h.next_is_full()
    h.add_report(_rep(r1=10), None, full=True)
    assert not h.next_is_full()
    clock.t += 299
    h.add_report(_rep(r1=10), None)
    assert not h.next_is_full()
    clock.t += 2
    assert h.next_is_full()  # > 5 min since the last full one
    h.add_report(_rep(r1=10), None, full=True)
    h.request_full()
    assert h.next_is_full()
    h.add_report(_rep(r1=10), None, full=True)
    assert not h.next_is_full()
    h.add_report(Report(UDP=False, CaptivePortal=True), None)
    assert h.next_is_full()


# --- §1 JSON -----------------------------------------------------------------------------------


def _sample() -> Report:
    return Report(
        Now=datetime(2024, 5, 6, 7, 8, 9, 123450, tzinfo=UTC), UDP=True, IPv4=True,
        IPv4CanSend=True, OSHasIPv6=True, MappingVariesByDestIP=False, UPnP=False, PMP=True,
        PreferredDERP=2,
        RegionLatency={1: 12_345_678, 2: 4_960_000, 10: 1_234_567_890},
        RegionV4Latency={1: 12_345_678, 2: 4_960_000, 10: 1_234_567_890},
        GlobalV4Counters={"203.0.113.5:41641": 3}, GlobalV4="203.0.113.5:41641",
        CaptivePortal=False)


def test_to_json_exact() -> None:
    j = _sample().to_json()
    assert j == {
        "Now": "2024-05-06T07:08:09.12345Z", "UDP": True, "IPv6": False, "IPv4": True,
        "IPv6CanSend": False, "IPv4CanSend": True, "OSHasIPv6": True, "ICMPv4": False,
        "MappingVariesByDestIP": False, "UPnP": False, "PMP": True, "PCP": None,
        "PreferredDERP": 2,
        "RegionLatency": {"1": 12345678, "10": 1234567890, "2": 4960000},
        "RegionV4Latency": {"1": 12345678, "10": 1234567890, "2": 4960000},
        "RegionV6Latency": {}, "GlobalV4Counters": {"203.0.113.5:41641": 3},
        "GlobalV6Counters": None, "GlobalV4": "203.0.113.5:41641", "GlobalV6": "",
        "CaptivePortal": False}
    assert list(j) == ["Now", "UDP", "IPv6", "IPv4", "IPv6CanSend", "IPv4CanSend", "OSHasIPv6",
                       "ICMPv4", "MappingVariesByDestIP", "UPnP", "PMP", "PCP", "PreferredDERP",
                       "RegionLatency", "RegionV4Latency", "RegionV6Latency",
                       "GlobalV4Counters", "GlobalV6Counters", "GlobalV4", "GlobalV6",
                       "CaptivePortal"]
    assert list(j["RegionLatency"]) == ["1", "10", "2"]  # Go sorts the keys as strings
    empty = Report().to_json()
    assert empty["Now"] == "0001-01-01T00:00:00Z" and empty["GlobalV4Counters"] is None
    assert empty["MappingVariesByDestIP"] is None and empty["RegionLatency"] == {}
    line = marshal_json(empty)
    assert line.startswith('{"Now":"0001-01-01T00:00:00Z","UDP":false,') and " " not in line


def test_from_json_round_trip_and_errors() -> None:
    r = _sample()
    assert Report.from_json(r.to_json()) == r
    assert Report.from_json(Report().to_json()) == Report()
    # Tailscale's nanosecond timestamps (and offsets) are read.
    assert Report.from_json({"Now": "2024-05-06T09:08:09.123456789+02:00"}).Now == \
        datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    for bad in ({"UDP": "yes"}, {"RegionLatency": {"x": 1}}, {"RegionLatency": {"1": 1.5}},
                {"Now": 5}, {"PCP": 1}, {"GlobalV4Counters": []}, [], {"PreferredDERP": True}):
        with pytest.raises(ValueError):
            Report.from_json(bad)


def test_rfc3339nano() -> None:
    assert format_rfc3339nano(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == \
        "2024-01-02T03:04:05Z"
    assert format_rfc3339nano(datetime(2024, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)) == \
        "2024-01-02T03:04:05.1Z"
    assert format_rfc3339nano(None) == "0001-01-01T00:00:00Z"


# --- §8 text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ns,want", [
    (0, "0s"), (1, "1ns"), (999, "999ns"), (1_500, "1.5µs"), (100_000, "100µs"),
    (12_300_000, "12.3ms"), (5_000_000, "5ms"), (1_000_000_000, "1s"),
    (1_234_600_000, "1.2346s"), (90 * 10**9, "1m30s"), (3600 * 10**9, "1h0m0s"),
    (-12_300_000, "-12.3ms"), (61_500_000_000, "1m1.5s"),
])
def test_go_duration(ns: int, want: str) -> None:
    assert format_go_duration(ns) == want


def test_round_duration_halves_away_from_zero() -> None:
    assert round_duration(12_345_678, 100_000) == 12_300_000
    assert round_duration(12_350_000, 100_000) == 12_400_000
    assert round_duration(49_999, 100_000) == 0
    assert round_duration(50_000, 100_000) == 100_000
    assert round_duration(-50_000, 100_000) == -100_000


def _text_map() -> DERPMap:
    return dmap(region(1, node("1a", 1), code="nyc", name="New York City"),
                region(2, node("2a", 2), code="sfo", name="San Francisco"),
                region(10, node("10a", 10), code="fra", name="Frankfurt"),
                region(3, node("3a", 3), code="sin", name="Singapore"),
                region(11, node("11a", 11), code="x", name="Ex"))


EXPECTED_TEXT = (
    "\n"
    "Report:\n"
    "\t* Time: 2024-05-06T07:08:09.12345Z\n"
    "\t* UDP: true\n"
    "\t* IPv4: yes, 203.0.113.5:41641\n"
    "\t* IPv6: no, but OS has support\n"
    "\t* MappingVariesByDestIP: false\n"
    "\t* PortMapping: NAT-PMP\n"
    "\t* CaptivePortal: false\n"
    "\t* Nearest DERP: San Francisco\n"
    "\t* DERP latency:\n"
    "\t\t- sfo: 5ms     (San Francisco)\n"
    "\t\t- nyc: 12.3ms  (New York City)\n"
    "\t\t- fra: 1.2346s (Frankfurt)\n"
    "\t\t- sin:         (Singapore)\n"
    "\t\t-   x:         (Ex)\n"
)


def test_render_text_exact() -> None:
    assert render_text(_sample(), _text_map()) == EXPECTED_TEXT
    verbose = render_text(_sample(), _text_map(), verbose=True)
    assert "\t\t- sfo: 5ms     (derp2, San Francisco)\n" in verbose
    assert "\t\t-   x:         (derp11, Ex)\n" in verbose


def test_render_text_other_cases() -> None:
    bare = render_text(Report(Now=datetime(2024, 5, 6, tzinfo=UTC)), None)
    assert bare == ("\nReport:\n\t* Time: 2024-05-06T00:00:00Z\n\t* UDP: false\n"
                    "\t* IPv4: (no addr found)\n\t* IPv6: no, unavailable in OS\n"
                    "\t* MappingVariesByDestIP: \n\t* PortMapping: not checked\n"
                    "\t* Nearest DERP: unknown (no response to latency probes)\n")
    r = Report(IPv6=True, RegionLatency={1: MS}, UPnP=False, PMP=False, PCP=False)
    t = render_text(r, _text_map())
    assert "\t* IPv6: (no addr found)\n" in t and "\t* PortMapping: \n" in t
    assert "\t* Nearest DERP: [none]\n" in t and "\t\t- nyc: 1ms     (New York City)\n" in t
    r = Report(GlobalV6="[2001:db8::1]:5", RegionLatency={1: MS}, PreferredDERP=99,
               UPnP=True, PCP=True)
    t = render_text(r, _text_map())
    assert "\t* IPv6: yes, [2001:db8::1]:5\n" in t and "\t* PortMapping: UPnP, PCP\n" in t
    assert "\t* Nearest DERP: 99 (region not found in map)\n" in t


# --- the DERP map's wire and JSON shape (tailcfg) ----------------------------------------------


def test_derpmap_wire_round_trip_and_json_shape() -> None:
    wire = {"HomeParams": {"RegionScore": {"2": 1.5}}, "omitDefaultRegions": True,
            "Regions": {"900": {"RegionID": 900, "RegionCode": "t<1>", "RegionName": "Test & co",
                                "Latitude": 40, "Avoid": True, "NoMeasureNoHome": False,
                                "Future": 1,
                                "Nodes": [{"Name": "900a", "RegionID": 900,
                                           "HostName": "derp.example", "CertName": "x",
                                           "IPv4": "127.0.0.1", "IPv6": "none", "STUNPort": -1,
                                           "STUNOnly": True, "DERPPort": 3340,
                                           "InsecureForTests": True, "STUNTestIP": "127.0.0.2",
                                           "CanPort80": True, "Unknown": "ignored"}]},
                        "10": {"RegionID": 10, "RegionCode": "b", "RegionName": "B",
                               "Nodes": None}}}
    dm = derpmap_from_wire(wire)
    n = dm.Regions[900].Nodes[0]
    assert (n.CertName, n.STUNOnly, n.STUNTestIP, n.CanPort80, n.STUNPort) == \
        ("x", True, "127.0.0.2", True, -1)
    assert dm.Regions[900].Avoid and dm.Regions[900].Latitude == 40.0
    assert dm.HomeParams is not None and dm.HomeParams.RegionScore == {2: 1.5}
    assert dm.OmitDefaultRegions and dm.Regions[10].Nodes == []
    j = derpmap_to_json(dm)
    assert j is not None and list(j) == ["HomeParams", "Regions", "omitDefaultRegions"]
    assert list(j["Regions"]) == ["10", "900"]
    assert j["Regions"]["10"] == {"RegionID": 10, "RegionCode": "b", "RegionName": "B",
                                  "Nodes": []}
    assert list(j["Regions"]["900"]) == ["RegionID", "RegionCode", "RegionName", "Latitude",
                                         "Avoid", "Nodes"]
    assert list(j["Regions"]["900"]["Nodes"][0]) == [
        "Name", "RegionID", "HostName", "CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly",
        "DERPPort", "InsecureForTests", "STUNTestIP", "CanPort80"]
    assert derpmap_from_wire(j) == dm
    assert derpmap_to_json(None) is None
    text = marshal_json(j, "\t")
    assert '"RegionCode": "t\\u003c1\\u003e"' in text and "Test \\u0026 co" in text
    assert '\n\t"Regions": {\n\t\t"10": {' in text and '"Latitude": 40,' in text
    assert derpmap_to_json(DERPMap()) == {"Regions": {}}


@pytest.mark.parametrize("wire,where", [
    ({"Regions": {"1": {"Nodes": [{"STUNPort": "3478"}]}}}, "Nodes[0].STUNPort"),
    ({"Regions": {"1": {"Nodes": [{"DERPPort": True}]}}}, "Nodes[0].DERPPort"),
    ({"Regions": {"1": {"Nodes": [{"InsecureForTests": 1}]}}}, "InsecureForTests"),
    ({"Regions": {"1": {"Nodes": [{"IPv4": 127}]}}}, "IPv4"),
    ({"Regions": {"1": {"Avoid": "yes"}}}, "Regions[1].Avoid"),
    ({"Regions": {"1": {"Latitude": float("inf")}}}, "Latitude"),
    ({"Regions": {"1": {"Nodes": {}}}}, "Nodes"),
    ({"Regions": {"1": {"Nodes": [5]}}}, "Nodes[0]"),
    ({"Regions": {"x": {}}}, "region id"),
    ({"HomeParams": {"RegionScore": {"1": "2"}}}, "RegionScore[1]"),
    ({"HomeParams": []}, "HomeParams"),
    ({"omitDefaultRegions": "no"}, "omitDefaultRegions"),
])
def test_derpmap_wrong_types_are_wire_errors(wire: dict[str, object], where: str) -> None:
    with pytest.raises(WireError) as e:
        derpmap_from_wire(wire)
    assert str(e.value).startswith("DERPMap") and where in str(e.value)


# --- layering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [
    "import nodeagent.netcheck.report",
    "from nodeagent.netcheck import Report, ReportHistory, render_text",
    "import nodeagent.netcheck",
])
def test_core_imports_without_asyncio(code: str) -> None:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in ('asyncio', 'aiohttp', " \
            "'nodeagent.netcheck.client') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == []
