"""Data plane end to end: real TUN devices in two namespaces, real kernel sockets, our Wrapper,
filter, TSMP and pending-open tracking, joined by a plain in-process relay.

Policy: A may reach B:8080, nothing may reach B:22.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time

import pytest

from tests.netns import netns_available

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

_missing = netns_available()
if _missing is None and not os.path.exists("/dev/net/tun"):
    _missing = "/dev/net/tun is missing"
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

from tests.dataplane import V4, V6, connect, node_key, pair, send_blob, sink_server  # noqa: E402

RULES_B = [{"SrcIPs": [V4["a"], V6["a"]],
            "DstPorts": [{"IP": V4["b"], "Ports": {"First": 8080, "Last": 8080}},
                         {"IP": V6["b"], "Ports": {"First": 8080, "Last": 8080}}]}]

FAMILIES = [pytest.param(V4, id="ipv4"), pytest.param(V6, id="ipv6")]


def ep(addrs: dict[str, str], who: str, port: int) -> str:
    a = addrs[who]
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


@pytest.mark.parametrize("addrs", FAMILIES)
async def test_acl_reject_fails_fast_and_is_observed_both_sides(addrs: dict[str, str]) -> None:
    async with pair(RULES_B) as (a, b):
        outcome, took = await a.run(connect, addrs["b"], 22, 5.0)
        assert outcome == "refused", outcome
        assert took < 1.0
        nb = await b.wait_note(lambda n: n.direction == "incoming", 2.0)
        assert (nb.reason, nb.source, nb.proto) == ("acl", "tsmp_sent", 6)
        assert nb.dst == ep(addrs, "b", 22) and nb.src.startswith(ep(addrs, "a", 0)[:-1])
        na = await a.wait_note(lambda n: n.direction == "outgoing", 2.0)
        assert (na.reason, na.source, na.maybe_broken) == ("acl", "tsmp_recv", False)
        assert na.dst == ep(addrs, "b", 22)
        assert b.wrapper.counters["tsmp_rejects_sent"] >= 1
        assert a.engine.counters["fast_failures"] >= 1
        assert len(a.engine.pendopen) == 0


@pytest.mark.parametrize("addrs", FAMILIES)
async def test_allowed_port_carries_one_megabyte(addrs: dict[str, str]) -> None:
    blob = os.urandom(1 << 20)
    async with pair(RULES_B) as (a, b):
        with sink_server(b.ns, addrs["b"], 8080) as result:
            digest = await a.run(send_blob, addrs["b"], 8080, blob)
        assert result.get("bytes") == len(blob)
        assert digest == hashlib.sha256(blob).digest()
        assert not [n for n in a.notes + b.notes]
        assert b.wrapper.drops_in["acl"] == 0


@pytest.mark.parametrize("addrs", FAMILIES)
async def test_without_fast_failure_connect_hangs_and_pendopen_reports(
        addrs: dict[str, str]) -> None:
    async with pair(RULES_B, fast_failure=False) as (a, _b):
        t0 = time.monotonic()
        fut = asyncio.ensure_future(a.run(connect, addrs["b"], 22, 7.0))
        deadline = t0 + 7.0
        while a.engine.counters["pendopen_reports"] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        reported_after = time.monotonic() - t0
        outcome, took = await fut
        assert outcome == "timeout" and took >= 6.5  # the kernel kept retrying: it hung
        # The pending open was reported once its 5 s ran out, with the peer's reason.
        assert 4.8 <= reported_after <= 6.0, reported_after
        reports = [n for n in a.notes if 4.8 <= n.at - t0 <= 6.0]
        assert reports, a.notes
        rep = reports[0]
        assert (rep.direction, rep.reason, rep.source, rep.dst) == (
            "outgoing", "acl", "tsmp_recv", ep(addrs, "b", 22))
        assert a.engine.counters["fast_failures"] == 0


@pytest.mark.parametrize("addrs", FAMILIES)
async def test_unreachable_peer_reported_by_pendopen(addrs: dict[str, str]) -> None:
    async with pair(RULES_B) as (a, b):
        a.engine.transport.unreachable.add(node_key("b"))  # the relay loses everything to B
        t0 = time.monotonic()
        outcome, _ = await a.run(connect, addrs["b"], 8080, 6.0)
        assert outcome == "timeout"
        rep = await a.wait_note(lambda n: n.source == "pendopen_timeout", 2.0)
        assert rep.reason == "peer-unreachable" and 4.8 <= rep.at - t0 <= 6.5
        assert not b.notes


async def test_no_peer_for_address_reported() -> None:
    async with pair(RULES_B) as (a, _b):
        outcome, _ = await a.run(connect, "100.64.0.9", 80, 6.0)
        assert outcome == "timeout"
        rep = await a.wait_note(lambda n: n.source == "pendopen_timeout", 2.0)
        assert (rep.reason, rep.dst) == ("no-peer", "100.64.0.9:80")


async def test_shields_up_reason() -> None:
    async with pair(RULES_B, shields_b=True) as (a, b):
        outcome, _ = await a.run(connect, V4["b"], 8080, 5.0)
        assert outcome == "refused"
        nb = await b.wait_note(lambda n: True, 2.0)
        assert nb.reason == "shields"
        na = await a.wait_note(lambda n: n.direction == "outgoing", 2.0)
        assert na.reason == "shields"


def _udp_probe(addr: str, port: int, n: int) -> tuple[str, int]:
    """Send ``n`` datagrams on a connected UDP socket; return the first error the kernel
    reported (an ICMP error surfaces on the next call; "timeout" if none) and how many
    datagrams actually left."""
    import socket

    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    first = ""
    sent = 0
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect((addr, port))
        for i in range(n):
            try:
                s.send(b"probe %d" % i)
                sent += 1
            except OSError as e:  # the pending error is reported instead of sending
                first = first or errno.errorcode.get(e.errno or 0, str(e.errno))
        if not first:
            try:
                s.recv(100)
                first = "answered"
            except TimeoutError:
                first = "timeout"
            except OSError as e:
                first = errno.errorcode.get(e.errno or 0, str(e.errno))
    return first, sent


@pytest.mark.parametrize("addrs", FAMILIES)
async def test_blocked_udp_flow_rejected_once_and_observed(addrs: dict[str, str]) -> None:
    async with pair(RULES_B) as (a, b):
        outcome, sent = await a.run(_udp_probe, addrs["b"], 5353, 5)
        # The sender's kernel got our ICMP administratively-prohibited: the app sees the error
        # Linux maps it to (EHOSTUNREACH for IPv4, EACCES for IPv6) instead of waiting.
        assert outcome in ("EHOSTUNREACH", "EACCES"), outcome
        nb = await b.wait_note(lambda n: n.direction == "incoming", 2.0)
        assert (nb.proto, nb.reason, nb.source) == (17, "acl", "tsmp_sent")
        na = await a.wait_note(lambda n: n.direction == "outgoing", 2.0)
        assert (na.proto, na.reason, na.dst) == (17, "acl", ep(addrs, "b", 5353))
        # Rate-limited: the datagrams of one flow within a second draw one reject.
        assert sent >= 2
        deadline = time.monotonic() + 2.0  # the last datagrams may still be on their way
        while b.wrapper.drops_in["acl"] < sent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert b.wrapper.drops_in["acl"] == sent
        assert b.wrapper.counters["tsmp_rejects_sent"] == 1
