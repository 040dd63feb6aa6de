"""Hypothesis properties of the netcheck core: the STUN reply matcher never raises on anything
that looks like STUN (and only counts replies to our own transaction IDs); reports survive a
JSON round trip and always render as text; PreferredDERP is always a region of the report,
the previous home, or 0."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.netcheck.report import (
    MS,
    V4,
    V6,
    Probe,
    Report,
    ReportBuilder,
    ReportHistory,
    render_text,
)
from nodeagent.stun import codec as C
from nodeagent.tailcfg import DERPMap, DERPNode, DERPRegion

TXIDS = [bytes([i]) * 12 for i in range(4)]
txids = st.sampled_from(TXIDS) | st.binary(min_size=12, max_size=12)


def _attr(atype: int, value: bytes) -> bytes:
    return atype.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value + \
        b"\x00" * (-len(value) % 4)


attrs = st.builds(_attr, st.sampled_from([C.ATTR_XOR_MAPPED_ADDRESS, C.ATTR_MAPPED_ADDRESS,
                                          C.ATTR_XOR_MAPPED_ADDRESS_ALT, C.ATTR_SOFTWARE,
                                          C.ATTR_FINGERPRINT, 0x7777]),
                  st.binary(max_size=24))


def _msg(mtype: int, txid: bytes, body: bytes, length: int | None) -> bytes:
    n = len(body) if length is None else length
    return mtype.to_bytes(2, "big") + (n & 0xFFFF).to_bytes(2, "big") + C.MAGIC + txid + body


stunish = st.one_of(
    st.binary(max_size=80),
    st.builds(_msg, st.sampled_from([0x0101, 0x0001, 0x0111, 0xC101]), txids,
              st.lists(attrs, max_size=4).map(b"".join), st.none() | st.integers(0, 200)),
    st.builds(lambda t, h, p: C.build_binding_response(t, h, p), txids,
              st.sampled_from(["203.0.113.5", "2001:db8::5", "::ffff:1.2.3.4"]),
              st.integers(0, 65535)),
)


def _builder() -> ReportBuilder:
    plan: dict[str, list[Probe]] = {}
    b = ReportBuilder(plan)
    for i, txid in enumerate(TXIDS):
        p = Probe(0.0, i + 1, DERPNode(Name=f"n{i}", RegionID=i + 1), V4 if i % 2 else V6)
        plan.setdefault(p.set_name, []).append(p)
        b.note_sent(p, txid, 0)
    return b


@settings(max_examples=500)
@given(st.lists(stunish, max_size=8), st.integers(0, 10**12))
def test_reply_matcher_never_raises(datagrams: list[bytes], now: int) -> None:
    b = _builder()
    matched = 0
    for d in datagrams:
        got = b.receive(d, now)
        assert isinstance(got, bool)
        matched += got
    r = b.report
    assert matched <= len(TXIDS)
    assert sum(r.GlobalV4Counters.values()) + sum(r.GlobalV6Counters.values()) == matched
    assert r.UDP == (matched > 0)
    assert set(r.RegionLatency) == set(r.RegionV4Latency) | set(r.RegionV6Latency)
    if r.MappingVariesByDestIP is not None:
        assert sum(r.GlobalV4Counters.values()) >= 2


lat_maps = st.dictionaries(st.integers(1, 2000), st.integers(0, 10**10), max_size=6)
opt_bool = st.none() | st.booleans()
addr = st.sampled_from(["", "203.0.113.5:41641", "[2001:db8::1]:5"])
reports = st.builds(
    Report,
    Now=st.none() | st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.just(UTC)),
    UDP=st.booleans(), IPv6=st.booleans(), IPv4=st.booleans(), OSHasIPv6=st.booleans(),
    MappingVariesByDestIP=opt_bool, UPnP=opt_bool, PMP=opt_bool, PCP=opt_bool,
    CaptivePortal=opt_bool, PreferredDERP=st.integers(0, 2000), RegionLatency=lat_maps,
    RegionV4Latency=lat_maps, GlobalV4Counters=st.dictionaries(addr, st.integers(1, 9)),
    GlobalV4=addr, GlobalV6=addr)


@given(reports)
def test_report_json_round_trip_and_text(r: Report) -> None:
    assert Report.from_json(r.to_json()) == r
    dm = DERPMap(Regions={rid: DERPRegion(RegionID=rid, RegionCode=f"c{rid}")
                          for rid in list(r.RegionLatency)[:3]})
    text = render_text(r, dm, verbose=True)
    assert text.startswith("\nReport:\n") and text.endswith("\n")
    assert text.count("\t\t- ") == (len(dm.Regions) if r.RegionLatency else 0)


@given(st.lists(st.tuples(lat_maps, st.floats(0, 400)), min_size=1, max_size=6))
def test_preferred_derp_is_a_measured_region_or_the_old_home(
        steps: list[tuple[dict[int, int], float]]) -> None:
    t = [0.0]
    h = ReportHistory(lambda: t[0])
    prev = 0
    for latencies, dt in steps:
        t[0] += dt
        got = h.add_report(Report(RegionLatency={k: v + MS for k, v in latencies.items()}),
                           None)
        assert (got == 0 and not latencies) or got in latencies or got == prev
        prev = got
