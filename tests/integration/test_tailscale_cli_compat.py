"""Tailscale's real CLI (``shared/tools/tailscale/tailscale``, v1.98.10) against a nodeagent
logged in to our control server, compared with nodeagent's own answers: ``status`` (text and
``--json``), ``ip``, ``whois``, ``debug prefs``, ``debug metrics``, ``set --hostname``, ``down``
and ``up --login-server``. One module-scoped tailnet (``tests/minitailnet.py``: control + n1, n2).

The CLI decodes every answer into its Go types and re-encodes it, so ``status --json`` and
``debug prefs`` having exactly our keys and values proves the shapes are Tailscale's.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agentutil import localapi
from tests.minitailnet import TAILSCALE_CLI, MiniAgent, MiniTailnet, mini_tailnet, wait
from tests.netns import netns_available, tun_available

_missing = (netns_available() or tun_available()
            or (None if os.access(TAILSCALE_CLI, os.X_OK)
                else f"Tailscale's CLI binary is missing: {TAILSCALE_CLI}"))
pytestmark = [pytest.mark.integration]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

NODEAGENT_ONLY_PREFS = ("FastFailure", "ConnRejectMaxEntries")
# Figures that move between two reads of a live agent's status.
MOVING = {"RxBytes", "TxBytes", "LastWrite", "LastHandshake", "LastSeen", "Active", "CurAddr",
          "Addrs", "Relay", "InMagicSock", "InEngine"}


@pytest.fixture(scope="module")
def tailnet() -> Iterator[MiniTailnet]:
    with mini_tailnet() as t:
        yield t


def api(a: MiniAgent, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return asyncio.run(localapi(a.sock, method, f"/localapi/v0/{path}", body))


def ok(r: Any) -> str:
    assert r.returncode == 0, f"rc {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return str(r.stdout)


def steady(ps: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ps.items() if k not in MOVING}


def test_status_text(tailnet: MiniTailnet) -> None:
    n1 = tailnet.agents["n1"]
    r = n1.tailscale("status")
    out = ok(r)
    assert r.stderr == ""  # no version warning, nothing about Funnel or anything else
    assert "Funnel" not in out and "Health" not in out
    mine = n1.status()
    rows = [ln.split() for ln in out.splitlines() if ln.strip()]
    ip1, ip2 = mine["Self"]["TailscaleIPs"][0], tailnet.agents["n2"].status()["Self"][
        "TailscaleIPs"][0]
    assert rows == [[ip1, "n1", "admin", "linux", "-"], [ip2, "n2", "admin", "linux", "-"]], out


def test_status_json_same_keys_and_values(tailnet: MiniTailnet) -> None:
    n1 = tailnet.agents["n1"]
    theirs = json.loads(ok(n1.tailscale("status", "--json")))
    mine = n1.status()
    assert set(theirs) == set(mine)  # nothing of ours dropped, nothing of theirs missing
    for k in mine:
        if k not in ("Self", "Peer"):
            assert theirs[k] == mine[k], k
    assert set(theirs["Self"]) == set(mine["Self"])
    assert steady(theirs["Self"]) == steady(mine["Self"])
    assert theirs["Peer"].keys() == mine["Peer"].keys() and len(mine["Peer"]) == 1
    for key, p in mine["Peer"].items():
        assert set(theirs["Peer"][key]) == set(p)
        assert steady(theirs["Peer"][key]) == steady(p)
    assert mine["BackendState"] == "Running"


def test_ip(tailnet: MiniTailnet) -> None:
    n1, n2 = tailnet.agents["n1"], tailnet.agents["n2"]
    ips = n1.status()["Self"]["TailscaleIPs"]
    assert ok(n1.tailscale("ip")).split() == ips
    assert ok(n1.tailscale("ip", "-4")).split() == ips[:1]
    assert ok(n1.tailscale("ip", "-6")).split() == ips[1:]
    assert ok(n1.tailscale("ip", "n2")).split() == n2.status()["Self"]["TailscaleIPs"]


def test_whois(tailnet: MiniTailnet) -> None:
    n1, n2 = tailnet.agents["n1"], tailnet.agents["n2"]
    code, _ = api(n1, "GET", "whois?addr=127.0.0.1")
    if code == 404 and "unknown LocalAPI endpoint" in str(api(n1, "GET", "whois")[1]):
        pytest.skip("the agent has no whois endpoint yet")
    ip2 = n2.status()["Self"]["TailscaleIPs"][0]
    out = ok(n1.tailscale("whois", ip2))
    code, mine = api(n1, "GET", f"whois?addr={ip2}")
    assert code == 200
    assert f"Name:          {mine['Node']['Name'].rstrip('.')}" in out, out
    assert f"ID:            {mine['Node']['StableID']}" in out, out
    assert "User:\n  Name:     admin\n" in out, out
    theirs = json.loads(ok(n1.tailscale("whois", "--json", ip2)))
    assert theirs["Node"]["StableID"] == mine["Node"]["StableID"]
    assert theirs["UserProfile"]["LoginName"] == mine["UserProfile"]["LoginName"] == "admin"
    r = n1.tailscale("whois", "100.127.255.254")
    assert r.returncode == 1 and "peer not found" in r.stderr


def test_debug_prefs_is_ours_exactly(tailnet: MiniTailnet) -> None:
    n1 = tailnet.agents["n1"]
    theirs = json.loads(ok(n1.tailscale("debug", "prefs")))
    code, mine = api(n1, "GET", "prefs")
    assert code == 200
    for k in NODEAGENT_ONLY_PREFS:  # nodeagent's additions: Tailscale's types drop them
        mine.pop(k)
    assert theirs == mine
    assert theirs["ControlURL"] == tailnet.url and theirs["Hostname"] == "n1"
    assert theirs["Config"]["UserProfile"]["LoginName"] == "admin"


def test_debug_metrics(tailnet: MiniTailnet) -> None:
    out = ok(tailnet.agents["n1"].tailscale("debug", "metrics"))
    assert "nodeagent_extension_hook_errors_total" in out


@pytest.mark.feature("connreject")
def test_debug_localapi_debug_rejects(tailnet: MiniTailnet) -> None:
    n1 = tailnet.agents["n1"]
    r = n1.tailscale("debug", "localapi", "GET", "/localapi/v0/debug-rejects")
    if r.returncode != 0:
        r = n1.tailscale("debug", "localapi", "debug-rejects")
    assert json.loads(ok(r)) == api(n1, "GET", "debug-rejects")[1]


def test_set_hostname(tailnet: MiniTailnet) -> None:
    n1 = tailnet.agents["n1"]
    try:
        r = n1.tailscale("set", "--hostname=n1-renamed")
        ok(r)
        assert r.stderr == "" and r.stdout == ""
        assert api(n1, "GET", "prefs")[1]["Hostname"] == "n1-renamed"
        assert json.loads(ok(n1.tailscale("debug", "prefs")))["Hostname"] == "n1-renamed"
        r = n1.tailscale("set", "--hostname=-bad-")
        assert r.returncode == 1 and "Hostname" in r.stderr, r.stderr
        assert api(n1, "GET", "prefs")[1]["Hostname"] == "n1-renamed"
        r = n1.tailscale("set", "--webclient")  # a Tailscale pref nodeagent does not have
        assert r.returncode == 1 and "RunWebClient: not supported" in r.stderr, r.stderr
    finally:
        ok(n1.tailscale("set", "--hostname=n1"))
    assert api(n1, "GET", "prefs")[1]["Hostname"] == "n1"


def _peer_online(a: MiniAgent, name: str) -> bool | None:
    for p in (a.status().get("Peer") or {}).values():
        if p["HostName"] == name:
            return bool(p["Online"])
    return None


def test_down_then_up(tailnet: MiniTailnet) -> None:
    n1, n2 = tailnet.agents["n1"], tailnet.agents["n2"]
    ips = n1.status()["Self"]["TailscaleIPs"]
    up = ("up", f"--login-server={tailnet.url}", "--hostname=n1", "--netfilter-mode=off")
    try:
        r = n1.tailscale("down")
        assert ok(r) == "" and r.stderr == ""
        assert n1.status()["BackendState"] == "Stopped"
        assert api(n1, "GET", "prefs")[1]["WantRunning"] is False
        r = n1.tailscale("status")
        assert r.returncode == 1 and r.stdout == "Tailscale is stopped.\n", r
        r = n1.tailscale("down")
        assert r.returncode == 0 and "Tailscale was already stopped." in r.stderr
        wait(lambda: _peer_online(n2, "n1") is False, 30, "n2 to see n1 offline")
        # the up-checker wants every non-default setting restated, as against tailscaled
        r = n1.tailscale("up", f"--login-server={tailnet.url}")
        assert r.returncode == 1 and "--hostname=n1" in r.stderr, r.stderr
        assert n1.status()["BackendState"] == "Stopped"
        r = n1.tailscale(*up, timeout=60)
        ok(r)
        assert "Error" not in r.stderr, r.stderr
        st = n1.status()
        assert st["BackendState"] == "Running" and st["Self"]["TailscaleIPs"] == ips
        assert ok(n1.tailscale("ip")).split() == ips
        assert api(n1, "GET", "prefs")[1]["WantRunning"] is True
        wait(lambda: _peer_online(n2, "n1") is True, 30, "n2 to see n1 online again")
        wait(lambda: _peer_online(n1, "n2") is True, 30, "n1 to see n2 online again")
        # Running already: the CLI just edits prefs
        ok(n1.tailscale(*up))
        r = n1.tailscale("up", "--login-server=http://192.0.2.1:1", "--hostname=n1",
                         "--netfilter-mode=off")
        assert r.returncode == 1 and "can't change --login-server" in r.stderr, r.stderr
    finally:
        if n1.status()["BackendState"] != "Running":
            api(n1, "PATCH", "prefs", {"WantRunningSet": True, "WantRunning": True})
        wait(lambda: n1.status()["BackendState"] == "Running", 30, "n1 running again")
