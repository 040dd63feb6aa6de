"""``nodeagent web`` in a real browser: two agents in network namespaces (static netmaps, b's
policy refuses a's port 22), ``nodeagent web`` serving a's LocalAPI, headless Chromium driven
over the DevTools protocol. A refused connection shows on the page within 2 s (no reload, no
polling: the LocalAPI watch stream feeds the page's server-sent events); the Clear button
empties the aggregate; with the node attribute removed the page says so and shows the policy
snippet. Screenshots are kept in the test's tmp_path (their paths are printed)."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from tests.agentutil import localapi, nodeagent_cmd
from tests.cdp import CHROMIUM, Browser
from tests.dataplane import connect
from tests.netns import acall_in_netns, netns_available, tun_available
from tests.procutil import stop
from tests.wgnet import TS4, Node, two_agents, wait_ping, write_netmap

_missing = netns_available() or tun_available()
pytestmark = [pytest.mark.integration, pytest.mark.feature("connreject"),
              pytest.mark.timeout(240)]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))
if CHROMIUM is None:
    pytestmark.append(pytest.mark.skip(
        reason="chromium is not installed (Debian package chromium): no browser to run the page"))

RULES_A = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
RULES_B = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 8080, "Last": 8080}}]}]
ROW_B22 = f'tr.reject[data-peer="{TS4["b"]}"][data-reason="acl"]'


@dataclass
class Rig:
    a: Node
    b: Node
    url: str
    web: subprocess.Popen[str]
    web_log: list[str]


def _read_url(proc: subprocess.Popen[str], log: list[str], timeout: float) -> str:
    """The URL ``nodeagent web`` prints once it listens; its output keeps being collected."""
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"serving (http://\S+)", line)
            if m and not url:
                url.append(m.group(1))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout):
        raise AssertionError(f"nodeagent web printed no URL in {timeout}s: {''.join(log)}")
    return url[0]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with two_agents(RULES_A, RULES_B) as (a, b):
        wait_ping(a.ns, TS4["b"])
        log: list[str] = []
        web = subprocess.Popen([*nodeagent_cmd(), "web", "--port", "0", "--socket", a.sock],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            url = _read_url(web, log, 30)
            yield Rig(a, b, url, web, log)
            assert web.poll() is None, f"nodeagent web died: {''.join(log)}"
        finally:
            rc = stop(web, signal.SIGINT)
        assert rc == 0, f"nodeagent web did not stop cleanly ({rc}): {''.join(log)}"


@pytest_asyncio.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    br = Browser(tmp_path / "profile")
    try:
        await br.start()
        yield br
    finally:
        await br.close()


async def _clear(a: Node) -> None:
    st, _ = await localapi(a.sock, "DELETE", "/localapi/v0/debug-rejects")
    assert st == 204


async def _live(br: Browser, url: str) -> None:
    await br.goto(url)
    await br.wait_for("document.getElementById('conn-status').textContent === 'live'", 10,
                      "the page's event stream to be live")


@pytest.mark.asyncio
async def test_rejection_appears_live_with_explanation(rig: Rig, browser: Browser,
                                                       tmp_path: Path) -> None:
    await _clear(rig.a)
    await _live(browser, rig.url)
    assert await browser.eval(f"document.querySelector('{ROW_B22}') === null")
    assert await browser.eval("!document.getElementById('empty').hidden")

    t0 = time.monotonic()
    outcome, _ = await acall_in_netns(rig.a.ns, connect, TS4["b"], 22, 5.0)
    assert outcome == "refused"
    await browser.wait_for(f"document.querySelector('{ROW_B22}') !== null", 2.0,
                           "the refused connection on the page")
    took = time.monotonic() - t0
    row = await browser.eval(
        f"(() => {{ const tr = document.querySelector('{ROW_B22}');"
        " return [...tr.cells].map(td => td.textContent); })()")
    direction, peer, port, proto, reason, count, last, explanation = row
    assert (direction, port, proto, reason, count) == ("outgoing", "22", "tcp", "acl", "1"), row
    assert peer == f"b {TS4['b']}", row  # host name from status, then the address
    assert last.endswith("s ago"), row
    assert explanation.strip() and "b" in explanation, row

    # A second refusal updates the same row in place.
    await acall_in_netns(rig.a.ns, connect, TS4["b"], 22, 5.0)
    await browser.wait_for(f"document.querySelector('{ROW_B22}').dataset.count === '2'", 2.0,
                           "the count to reach 2")
    # Filters: a peer that matches nothing hides the row; clearing the filter shows it again.
    await browser.eval("(() => { const f = document.getElementById('peer-filter');"
                       " f.value = 'nomatch'; f.dispatchEvent(new Event('input')); })()")
    assert await browser.eval(f"document.querySelector('{ROW_B22}') === null")
    await browser.eval("(() => { const f = document.getElementById('peer-filter');"
                       " f.value = 'b'; f.dispatchEvent(new Event('input')); })()")
    assert await browser.eval(f"document.querySelector('{ROW_B22}') !== null")
    await browser.eval("(() => { const s = document.getElementById('reason-filter');"
                       " s.value = 'acl'; s.dispatchEvent(new Event('change')); })()")
    assert await browser.eval(f"document.querySelector('{ROW_B22}') !== null")

    png = await browser.screenshot(tmp_path / "connreject-web-live.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    print(f"nodeagent web screenshot (live rejection, shown {took:.2f}s after it): {png}")


@pytest.mark.asyncio
async def test_clear_button_empties_the_aggregate(rig: Rig, browser: Browser) -> None:
    await _live(browser, rig.url)
    await acall_in_netns(rig.a.ns, connect, TS4["b"], 22, 5.0)
    await browser.wait_for(f"document.querySelector('{ROW_B22}') !== null", 2.0, "a row")
    await browser.eval("document.getElementById('clear').click()")
    await browser.wait_for("document.getElementById('clear-result').textContent === 'cleared'",
                           5.0, "the clear answer")
    await browser.wait_for("document.querySelectorAll('tr.reject').length === 0 &&"
                           " !document.getElementById('empty').hidden", 2.0, "an empty table")
    st, body = await localapi(rig.a.sock, "GET", "/localapi/v0/debug-rejects")
    assert st == 200 and body == {"Enabled": True, "Outgoing": [], "Incoming": []}


@pytest.mark.asyncio
async def test_attribute_off_shows_the_policy_snippet(rig: Rig, browser: Browser,
                                                      tmp_path: Path) -> None:
    await _live(browser, rig.url)
    assert await browser.eval("document.getElementById('disabled').hidden")
    assert rig.a.proc is not None
    try:
        write_netmap(rig.a, rig.b, conn_reject=False)
        rig.a.proc.send_signal(signal.SIGHUP)  # the agent re-reads its netmap file
        await browser.wait_for("!document.getElementById('disabled').hidden", 5.0,
                               "the attribute-off message")
        text = await browser.eval("document.getElementById('disabled').innerText")
        assert "Recording is off" in text and "debug-conn-reject" in text
        snippet = await browser.eval("document.getElementById('policy-snippet').textContent")
        assert '"nodeAttrs"' in snippet and '"attr": ["debug-conn-reject"]' in snippet
        assert await browser.eval("document.getElementById('live').hidden")
        png = await browser.screenshot(tmp_path / "connreject-web-off.png")
        print(f"nodeagent web screenshot (attribute off): {png}")
    finally:
        write_netmap(rig.a, rig.b, conn_reject=True)
        rig.a.proc.send_signal(signal.SIGHUP)
    await browser.wait_for("document.getElementById('disabled').hidden &&"
                           " !document.getElementById('live').hidden", 5.0,
                           "the page live again once the attribute is back")
