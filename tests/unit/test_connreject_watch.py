"""The connreject watch: the aggregator's change callback, the stream's coalescing rule, the hub
that wakes streams, the LocalAPI ``debug-rejects?watch=1`` stream and ``DELETE`` on a real
socket, the CLI's ``--watch`` on it, and the ``nodeagent web`` server's guards."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from typing import Any

import aiohttp
import pytest

from tests.agentutil import localapi, nodeagent_cmd

pytestmark = pytest.mark.feature("connreject")

A = 0x64400001  # 100.64.0.1
B = 0x64400002  # 100.64.0.2


# --- sans-IO: the coalescing rule ------------------------------------------------------------
def test_coalescer_first_snapshot_then_rate_limited_then_heartbeat() -> None:
    from nodeagent_connreject.watch import Coalescer

    c = Coalescer(interval=0.2, heartbeat=10.0)
    assert c.due(100.0) == "snapshot"  # the first line is a snapshot, at once
    c.sent("snapshot", 100.0)
    assert c.due(100.05) is None and c.wait_for(100.05) == pytest.approx(9.95)
    for t in (100.05, 100.1, 100.15):  # a burst of changes inside one interval ...
        c.changed()
        assert c.due(t) is None
    assert c.wait_for(100.15) == pytest.approx(0.05)
    assert c.due(100.2) == "snapshot"  # ... is one snapshot when the interval has passed
    c.sent("snapshot", 100.2)
    assert c.due(105.0) is None
    c.changed()
    assert c.due(105.0) == "snapshot"  # after a quiet spell a change goes out at once
    c.sent("snapshot", 105.0)
    assert c.due(114.99) is None and c.due(115.0) == "heartbeat"
    c.sent("heartbeat", 115.0)
    assert not c.dirty and c.due(115.1) is None and c.wait_for(115.0) == pytest.approx(10.0)


# --- the aggregator's change callback --------------------------------------------------------
def test_on_change_called_per_change_and_clear() -> None:
    from nodeagent_connreject.aggregator import Aggregator

    agg = Aggregator()
    calls: list[int] = []
    agg.note_fields("outgoing", 6, "a:1", "b:2", "acl", "tsmp_recv", False)  # no callback: fine
    agg.on_change = lambda: calls.append(1)
    agg.note_fields("outgoing", 6, "a:1", "b:2", "acl", "tsmp_recv", False)
    assert calls == []  # disabled: dropped, not a change
    assert agg.set_enabled(True) is False and calls == [1]
    agg.set_enabled(True)
    assert calls == [1]  # no switch, no change
    agg.note_fields("outgoing", 6, "a:1", "b:2", "acl", "tsmp_recv", False)
    agg.note_fields("incoming", 6, "b:1", "a:2", "acl", "tsmp_sent", False)
    assert len(calls) == 3
    assert agg.clear() == 2 and len(calls) == 4
    assert agg.response() == {"Enabled": True, "Outgoing": [], "Incoming": []}
    agg.on_change = None
    agg.note_fields("outgoing", 6, "a:1", "b:2", "acl", "tsmp_recv", False)
    assert len(calls) == 4 and agg.response()["Outgoing"][0]["Count"] == 1


@pytest.mark.asyncio
async def test_hub_installs_only_while_watched_and_coalesces_wakeups() -> None:
    from nodeagent_connreject.aggregator import Aggregator
    from nodeagent_connreject.watch import WatchHub

    agg = Aggregator()
    agg.set_enabled(True)
    hub = WatchHub(agg)
    assert agg.on_change is None
    ev1, ev2 = hub.subscribe(), hub.subscribe()
    assert agg.on_change is not None and hub.watchers == 2
    for i in range(5000):  # a storm inside one loop iteration: one wake-up
        agg.note_fields("outgoing", 6, "a:1", f"100.64.0.{i % 200}:22", "acl", "tsmp_recv", False)
    assert not ev1.is_set()  # the wake-up runs on the loop, not inside note()
    await asyncio.wait_for(ev1.wait(), 2)
    assert ev2.is_set() and hub.wakeups == 1
    ev1.clear()
    # From another thread: the loop is woken thread-safely.
    t = threading.Thread(target=agg.note_fields,
                         args=("incoming", 17, "b:1", "a:2", "acl", "tsmp_sent", False))
    t.start()
    t.join()
    await asyncio.wait_for(ev1.wait(), 2)
    assert hub.wakeups == 2
    hub.unsubscribe(ev1)
    assert agg.on_change is not None
    hub.unsubscribe(ev2)
    assert agg.on_change is None and hub.watchers == 0


# --- the LocalAPI stream on a real socket ----------------------------------------------------
class NoteHolder:
    def __init__(self) -> None:
        self.note: Any = None

    def set_conn_reject_note(self, fn: Any) -> None:
        self.note = fn


def _netmap(attr: bool) -> Any:
    from nodeagent.tailcfg import NODE_ATTR_CONN_REJECT, NetworkMap, Node

    caps: dict[str, Any] = {NODE_ATTR_CONN_REJECT: []} if attr else {}
    return NetworkMap(SelfNode=Node(HostName="a", Addresses=["100.64.0.1/32"], CapMap=caps),
                      Peers=[Node(ID=2, HostName="bee", Key="nodekey:" + "22" * 32,
                                  Addresses=["100.64.0.2/32"])])


class Lines:
    """The watch stream's lines, read with a deadline each."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 3.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.resp.content.readline(), timeout)
        assert raw, "the stream ended"
        return json.loads(raw)

    async def snapshot(self, timeout: float = 3.0) -> dict[str, Any]:
        while True:
            msg = await self.next(timeout)
            if msg["Type"] == "snapshot":
                return msg


@pytest.mark.asyncio
async def test_localapi_watch_stream_coalesces_and_ends_on_stop(agent: Any) -> None:
    b = agent.backend
    ext_engine = NoteHolder()
    b.set_engine(ext_engine)
    sock = agent.opts.socket
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s, \
            s.get("http://x/localapi/v0/debug-rejects?watch=1") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = Lines(r)
        first = await lines.next()
        assert first["Type"] == "snapshot"
        assert first["Rejects"] == {"Enabled": False, "Outgoing": [], "Incoming": []}

        b.set_netmap(_netmap(True))  # the attribute arrives: the stream says so
        on = await lines.snapshot()
        assert on["Rejects"]["Enabled"] is True

        t0 = time.monotonic()
        ext_engine.note("outgoing", 6, 4, A, 5000, B, 22, "acl", "tsmp_recv", False)
        one = await lines.snapshot()
        assert time.monotonic() - t0 < 1.0
        (ev,) = one["Rejects"]["Outgoing"]
        assert (ev["Dst"], ev["Count"], ev["Reason"]) == ("100.64.0.2:22", 1, "acl")

        # A storm over ~1 s: snapshots at most every 200 ms, the last one has every note.
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            for _ in range(50):
                ext_engine.note("outgoing", 6, 4, A, 5000, B, 22, "acl", "tsmp_recv", False)
                n += 1
            await asyncio.sleep(0.01)
        storm_end = time.monotonic()
        got: list[dict[str, Any]] = []
        while True:
            msg = await lines.snapshot()
            got.append(msg)
            if msg["Rejects"]["Outgoing"][0]["Count"] == 1 + n:
                break
        elapsed = time.monotonic() - t0
        assert len(got) <= elapsed / 0.2 + 2, (len(got), elapsed)
        assert time.monotonic() - storm_end < 1.0

        # The plain answer keeps its exact shape while a watch is open.
        st, plain = await localapi(sock, "GET", "/localapi/v0/debug-rejects")
        assert st == 200 and set(plain) == {"Enabled", "Outgoing", "Incoming"}

        # DELETE clears (write permission: the test runs as root) and the stream shows it.
        st, _ = await localapi(sock, "DELETE", "/localapi/v0/debug-rejects")
        assert st == 204
        cleared = await lines.snapshot()
        assert cleared["Rejects"] == {"Enabled": True, "Outgoing": [], "Incoming": []}

        # The server stops: a closing line, then the end, well before any heartbeat.
        t0 = time.monotonic()
        stopping = asyncio.ensure_future(agent.stop())
        last = await lines.next()
        assert last["Type"] == "closing"
        assert await asyncio.wait_for(r.content.readline(), 3) == b""
        await asyncio.wait_for(stopping, 5)
        assert time.monotonic() - t0 < 3.0


@pytest.mark.asyncio
async def test_watch_client_gone_unsubscribes(agent: Any) -> None:
    ext = _ext(agent)
    sock = agent.opts.socket
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s:
        r = await s.get("http://x/localapi/v0/debug-rejects?watch=1")
        await Lines(r).next()
        assert ext.watch_hub.watchers == 1
        r.close()
    deadline = time.monotonic() + 3
    while ext.watch_hub.watchers:
        assert time.monotonic() < deadline, "the stream did not notice its client went"
        await asyncio.sleep(0.05)
    assert ext.aggregator.on_change is None


def _ext(agent: Any) -> Any:
    from nodeagent_connreject.extension import ConnRejectExtension

    for plugin in agent.backend.extensions.pm.get_plugins():
        if isinstance(plugin, ConnRejectExtension):
            return plugin
    raise AssertionError("connreject extension not loaded")


@pytest.mark.asyncio
async def test_cli_watch_follows_the_stream(agent: Any) -> None:
    b = agent.backend
    engine = NoteHolder()
    b.set_engine(engine)
    b.set_netmap(_netmap(True))
    proc = await asyncio.create_subprocess_exec(
        *nodeagent_cmd(), "debug", "rejects", "--watch", "--json", "--socket", agent.opts.socket,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert first == {"Enabled": True, "Outgoing": [], "Incoming": []}
        engine.note("outgoing", 6, 4, A, 5000, B, 22, "acl", "tsmp_recv", False)
        second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 3))
        assert second["Outgoing"][0]["Dst"] == "100.64.0.2:22"
        await agent.stop()  # the agent stops: the CLI says so and exits 0
        await asyncio.wait_for(proc.wait(), 10)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- nodeagent web: flags and the server's guards --------------------------------------------
def test_parse_listen() -> None:
    from nodeagent_connreject.webcmd import WebError, parse_listen

    assert parse_listen(None, None) == ("127.0.0.1", 8088, True)
    assert parse_listen(None, 0) == ("127.0.0.1", 0, True)
    assert parse_listen("localhost:9000", None) == ("127.0.0.1", 9000, True)
    assert parse_listen("[::1]:9000", 9000) == ("::1", 9000, True)
    assert parse_listen("::1", 5) == ("::1", 5, True)
    assert parse_listen("0.0.0.0", None) == ("0.0.0.0", 8088, False)
    for bad in ("example.com", "1.2.3.4:x", "[::1"):
        with pytest.raises(WebError):
            parse_listen(bad, None)
    with pytest.raises(WebError, match="different ports"):
        parse_listen("127.0.0.1:1", 2)


@pytest.mark.asyncio
async def test_web_server_guards_and_clear(agent: Any) -> None:
    from aiohttp.test_utils import TestClient, TestServer
    from nodeagent_connreject.webserver import TOKEN_HEADER, WebUI

    b = agent.backend
    engine = NoteHolder()
    b.set_engine(engine)
    b.set_netmap(_netmap(True))
    engine.note("outgoing", 6, 4, A, 5000, B, 22, "acl", "tsmp_recv", False)
    ui = WebUI(agent.opts.socket, token="t0ken")
    async with TestClient(TestServer(ui.app(), host="127.0.0.1")) as c:
        page = await c.get("/")
        text = await page.text()
        assert page.status == 200 and 'content="t0ken"' in text
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert (await c.get("/static/app.js")).status == 200
        assert (await c.get("/static/../webserver.py")).status == 404
        # DNS rebinding: a foreign Host is refused.
        assert (await c.get("/", headers={"Host": "evil.example:80"})).status == 403
        # Clear needs the page token and the same origin.
        assert (await c.post("/api/clear")).status == 403
        r = await c.post("/api/clear", headers={TOKEN_HEADER: "t0ken",
                                                "Origin": "http://evil.example"})
        assert r.status == 403 and "cross-origin" in (await r.json())["error"]
        assert _ext(agent).aggregator.response()["Outgoing"]  # still there
        r = await c.post("/api/clear", headers={TOKEN_HEADER: "t0ken",
                                                "Sec-Fetch-Site": "same-origin"})
        assert r.status == 200, await r.text()
        assert _ext(agent).aggregator.response()["Outgoing"] == []
        # The event stream: a snapshot with host names from status.
        engine.note("outgoing", 6, 4, A, 5000, B, 22, "acl", "tsmp_recv", False)
        ev = await c.get("/api/events")
        assert ev.headers["Content-Type"].startswith("text/event-stream")
        buf = b""
        while b"event: snapshot" not in buf:
            buf += await asyncio.wait_for(ev.content.readline(), 3)
        data = json.loads((await asyncio.wait_for(ev.content.readline(), 3))[len(b"data: "):])
        assert data["Rejects"]["Outgoing"][0]["Dst"] == "100.64.0.2:22"
        assert data["Names"].get("100.64.0.2") == "bee"
        ev.close()


def test_web_refuses_bad_listen_and_missing_agent(tmp_path: Any) -> None:
    def web(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*nodeagent_cmd(), "web", *args], capture_output=True, text=True,
                              timeout=30)

    r = web("--listen", "example.com", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "not an IP address" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = web("--port", "0", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "no agent answering" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
