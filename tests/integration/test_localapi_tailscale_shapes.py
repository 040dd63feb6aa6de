"""Golden shapes of the LocalAPI answers Tailscale's clients decode: for each endpoint, the keys at
every level (Tailscale's names; ``omitempty`` keys allowed to be absent, nothing else missing or
extra) and each value's JSON type, checked against an agent logged in to our control server
(one module-scoped tailnet of ``tests/minitailnet.py``).

Shapes follow Tailscale v1.98's ipnstate.Status / PeerStatus, ipn.Prefs (+ persist ``Config``),
ipn.Notify, ServeConfig and the check-prefs reply; nodeagent's own additions are named as such.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.agentutil import localapi
from tests.minitailnet import MiniTailnet, mini_tailnet
from tests.netns import netns_available, tun_available

_missing = netns_available() or tun_available()
pytestmark = [pytest.mark.integration]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

# Type tags: JSON types; "?" prefix = may also be null; "time" = RFC 3339 string; "ip" = an IP
# address string; "prefix" = CIDR string; "[T]" = array of T.
STR, INT, BOOL, TIME, OBJ = "string", "number", "bool", "time", "object"
USER_PROFILE = {"ID": INT, "LoginName": STR, "DisplayName": STR, "ProfilePicURL?": STR,
                "Groups?": "[string]"}
PEER_STATUS: dict[str, Any] = {
    "ID": STR, "PublicKey": STR, "HostName": STR, "DNSName": STR, "OS": STR, "UserID": INT,
    "AltSharerUserID?": INT, "TailscaleIPs": "[ip]", "AllowedIPs?": "[prefix]",
    "Tags?": "[string]", "PrimaryRoutes?": "[prefix]", "Addrs": "?[string]", "CurAddr": STR,
    "Relay": STR, "PeerRelay": STR, "RxBytes": INT, "TxBytes": INT, "Created": TIME,
    "LastWrite": TIME, "LastSeen": TIME, "LastHandshake": TIME, "Online": BOOL,
    "ExitNode": BOOL, "ExitNodeOption": BOOL, "Active": BOOL, "PeerAPIURL": "?[string]",
    "TaildropTarget": INT, "NoFileSharingReason": STR, "Capabilities?": "[string]",
    "CapMap?": OBJ, "sshHostKeys?": "[string]", "ShareeNode?": BOOL, "InNetworkMap": BOOL,
    "InMagicSock": BOOL, "InEngine": BOOL, "Expired?": BOOL, "KeyExpiry?": TIME,
    "Location?": OBJ,
}
STATUS: dict[str, Any] = {
    "Version": STR, "TUN": BOOL, "BackendState": STR, "HaveNodeKey?": BOOL, "AuthURL": STR,
    "TailscaleIPs": "[ip]", "Self": PEER_STATUS, "ExitNodeStatus?": OBJ, "Health": "[string]",
    "MagicDNSSuffix": STR,
    "CurrentTailnet": {"Name": STR, "MagicDNSSuffix": STR, "MagicDNSEnabled": BOOL},
    "CertDomains": "?[string]", "Peer": ("map", PEER_STATUS), "User": ("map", USER_PROFILE),
    "ClientVersion": "?object",
}
PERSIST = {"PrivateNodeKey": STR, "OldPrivateNodeKey": STR, "UserProfile": USER_PROFILE,
           "NetworkLockKey": STR, "NodeID": STR, "AttestationKey?": OBJ,
           "DisallowedTKAStateIDs?": "[string]"}
PREFS: dict[str, Any] = {
    "ControlURL": STR, "RouteAll": BOOL, "ExitNodeID": STR, "ExitNodeIP": STR,
    "AutoExitNode?": STR, "InternalExitNodePrior": STR, "ExitNodeAllowLANAccess": BOOL,
    "CorpDNS": BOOL, "RunSSH": BOOL, "RunWebClient": BOOL, "WantRunning": BOOL,
    "LoggedOut": BOOL, "ShieldsUp": BOOL, "AdvertiseTags": "?[string]", "Hostname": STR,
    "NotepadURLs": BOOL, "ForceDaemon?": BOOL, "Egg?": BOOL, "AdvertiseRoutes": "?[prefix]",
    "AdvertiseServices": "?[string]", "Sync": "?bool", "NoSNAT": BOOL,
    "NoStatefulFiltering?": "?bool", "NetfilterMode": INT, "OperatorUser?": STR,
    "ProfileName?": STR, "AutoUpdate": {"Check": BOOL, "Apply": "?bool"},
    "AppConnector": {"Advertise": BOOL}, "PostureChecking": BOOL, "NetfilterKind": STR,
    "LinuxPacketMarks?": OBJ, "DriveShares": "?[object]", "RelayServerPort?": INT,
    "RelayServerStaticEndpoints?": "[string]", "AllowSingleHosts": BOOL,
    # nodeagent's additions (Tailscale's clients ignore unknown fields):
    "FastFailure": BOOL, "ConnRejectMaxEntries": INT,
    "Config": PERSIST,
}
DEBUG_REJECTS = {"Enabled": BOOL, "Outgoing": "[object]", "Incoming": "[object]"}


def _is(value: Any, tag: str) -> bool:
    if tag.startswith("?"):
        return value is None or _is(value, tag[1:])
    if tag.startswith("["):
        return isinstance(value, list) and all(_is(v, tag[1:-1]) for v in value)
    if tag == STR:
        return isinstance(value, str)
    if tag == INT:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tag in (BOOL, "bool"):
        return isinstance(value, bool)
    if tag == OBJ:
        return isinstance(value, dict)
    if tag == TIME:
        return isinstance(value, str) and re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", value) is not None
    if tag == "ip":
        return isinstance(value, str) and re.fullmatch(r"[0-9a-f.:]+", value) is not None
    if tag == "prefix":
        return isinstance(value, str) and re.fullmatch(r"[0-9a-f.:]+/\d+", value) is not None
    raise AssertionError(f"unknown type tag {tag!r}")


def check_shape(value: Any, shape: Any, path: str = "$") -> None:
    """AssertionError naming the first place where ``value`` differs from ``shape``."""
    if isinstance(shape, tuple):  # ("map", shape of each value)
        assert isinstance(value, dict), f"{path}: want an object, got {value!r}"
        for k, v in value.items():
            check_shape(v, shape[1], f"{path}[{k!r}]")
        return
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{path}: want an object, got {value!r}"
        required = {k for k in shape if not k.endswith("?")}
        allowed = required | {k[:-1] for k in shape if k.endswith("?")}
        assert required <= set(value), f"{path}: missing {sorted(required - set(value))}"
        assert set(value) <= allowed, f"{path}: not Tailscale's: {sorted(set(value) - allowed)}"
        for k, v in value.items():
            check_shape(v, shape[k] if k in shape else shape[k + "?"], f"{path}.{k}")
        return
    assert _is(value, shape), f"{path}: want {shape}, got {value!r}"


@pytest.fixture(scope="module")
def tailnet() -> Iterator[MiniTailnet]:
    with mini_tailnet() as t:
        yield t


def api(t: MiniTailnet, method: str, path: str, body: Any = None,
        name: str = "n1") -> tuple[int, Any]:
    return asyncio.run(localapi(t.agents[name].sock, method, f"/localapi/v0/{path}", body))


def test_status_shape(tailnet: MiniTailnet) -> None:
    code, st = api(tailnet, "GET", "status")
    assert code == 200
    check_shape(st, STATUS)
    assert st["BackendState"] == "Running" and st["HaveNodeKey"] is True
    assert len(st["Peer"]) == 1 and all(k.startswith("nodekey:") for k in st["Peer"])
    assert all(k.isdigit() for k in st["User"])
    peer = next(iter(st["Peer"].values()))
    assert peer["HostName"] == "n2" and peer["Online"] is True
    assert str(peer["UserID"]) in st["User"] and str(st["Self"]["UserID"]) in st["User"]
    code, st = api(tailnet, "GET", "status?peers=false")
    assert code == 200 and st["Peer"] == {}
    check_shape(st, STATUS)


def test_prefs_shape_and_config(tailnet: MiniTailnet) -> None:
    code, p = api(tailnet, "GET", "prefs")
    assert code == 200
    check_shape(p, PREFS)
    assert p["ControlURL"] == tailnet.url  # the login server, as `tailscale up` compares it
    cfg = p["Config"]
    assert cfg["NodeID"] and cfg["UserProfile"]["LoginName"] == "admin"
    # Tailscale's LocalAPI blanks the private keys (never a real key)
    assert set(cfg["PrivateNodeKey"].removeprefix("privkey:")) == {"0"}
    assert set(cfg["OldPrivateNodeKey"].removeprefix("privkey:")) == {"0"}
    assert set(cfg["NetworkLockKey"].removeprefix("nlpriv:")) == {"0"}
    _, st = api(tailnet, "GET", "status")
    assert cfg["NodeID"] == st["Self"]["ID"]
    assert cfg["UserProfile"]["ID"] == st["Self"]["UserID"]


@pytest.mark.parametrize(("body", "says"), [
    ({"NoSuchPrefSet": True, "NoSuchPref": 1}, "NoSuchPrefSet: unknown pref"),
    ({"ShieldsUpSet": True, "ShieldsUp": "yes"}, "ShieldsUp: want true or false"),
    ({"HostnameSet": True, "Hostname": ["x"]}, "Hostname: want a string"),
    ({"RunWebClientSet": True, "RunWebClient": True}, "RunWebClient: not supported"),
    ({"InternalExitNodePriorSet": True, "InternalExitNodePrior": "x"}, "internal"),
    ({"AutoUpdateSet": {"CheckSet": True}, "AutoUpdate": {"Check": True}},
     "AutoUpdate.Check: not supported"),
    ("not an object", "want a JSON object"),
])
def test_prefs_patch_refusals_are_one_line(tailnet: MiniTailnet, body: Any, says: str) -> None:
    _, before = api(tailnet, "GET", "prefs")
    code, e = api(tailnet, "PATCH", "prefs", body)
    assert code == 400, e
    assert says in e["error"] and "\n" not in e["error"], e
    _, after = api(tailnet, "GET", "prefs")
    assert after == before  # nothing changed


def test_prefs_patch_accepts_tailscale_cli_bodies(tailnet: MiniTailnet) -> None:
    """The whole Prefs object (as `tailscale set` sends it) with one Set bit; Tailscale-only
    prefs at their reported values are no-ops; unknown plain fields are ignored as Tailscale
    ignores them."""
    _, p = api(tailnet, "GET", "prefs")
    body = {**p, "ShieldsUp": True, "ShieldsUpSet": True, "RunWebClientSet": True,
            "AutoUpdateSet": {"CheckSet": True, "ApplySet": True}, "SomethingNew": 1}
    code, after = api(tailnet, "PATCH", "prefs", body)
    try:
        assert code == 200, after
        check_shape(after, PREFS)
        assert after == {**p, "ShieldsUp": True}
    finally:
        code, _ = api(tailnet, "PATCH", "prefs", {"ShieldsUpSet": True, "ShieldsUp": False})
        assert code == 200


def test_check_prefs(tailnet: MiniTailnet) -> None:
    _, p = api(tailnet, "GET", "prefs")
    assert api(tailnet, "POST", "check-prefs", p) == (200, {})
    code, r = api(tailnet, "POST", "check-prefs", {**p, "Hostname": "-bad-"})
    assert code == 200 and set(r) == {"Error"} and "Hostname" in r["Error"]
    sock = tailnet.agents["n1"].sock
    code, text = asyncio.run(_raw(sock, "POST", "check-prefs", b"{nope"))
    assert code == 400 and text == "invalid JSON body\n"
    _, unchanged = api(tailnet, "GET", "prefs")
    assert unchanged == p


async def _raw(sock: str, method: str, name: str, data: bytes) -> tuple[int, str]:
    import aiohttp

    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.request(method, f"http://local-tailscaled.sock/localapi/v0/{name}",
                      data=data) as r:
        return r.status, await r.text()


def test_serve_config_is_tailscales_unconfigured_answer(tailnet: MiniTailnet) -> None:
    async def get() -> tuple[int, bytes, str]:
        import aiohttp

        conn = aiohttp.UnixConnector(path=tailnet.agents["n1"].sock)
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.get("http://local-tailscaled.sock/localapi/v0/serve-config") as r:
            return r.status, await r.read(), r.headers.get("Etag", "")

    code, body, etag = asyncio.run(get())
    assert (code, body) == (200, b"null")
    assert etag == hashlib.sha256(b"null").hexdigest()


def test_watch_ipn_bus_and_start(tailnet: MiniTailnet) -> None:
    """watch-ipn-bus answers 200 at once; with NotifyInitialState|Prefs the first line carries
    State 6 (Running) and the prefs; a start then announces the state again."""
    async def run() -> tuple[dict[str, Any], dict[str, Any], int]:
        import aiohttp

        conn = aiohttp.UnixConnector(path=tailnet.agents["n1"].sock)
        async with aiohttp.ClientSession(connector=conn) as s:
            url = "http://local-tailscaled.sock/localapi/v0/"
            async with s.get(url + "watch-ipn-bus?mask=6") as r:
                assert r.status == 200
                first = json.loads(await asyncio.wait_for(r.content.readline(), 10))
                async with s.post(url + "start", json={"UpdatePrefs": None}) as st:
                    start_code = st.status
                second = json.loads(await asyncio.wait_for(r.content.readline(), 10))
                return first, second, start_code

    first, second, start_code = asyncio.run(run())
    assert first["State"] == 6 and set(first) == {"State", "Prefs"}
    check_shape(first["Prefs"], PREFS)
    assert start_code == 204 and second == {"State": 6}
    sock = tailnet.agents["n1"].sock
    assert asyncio.run(_raw(sock, "GET", "watch-ipn-bus?mask=x", b""))[0] == 400
    code, text = asyncio.run(_raw(sock, "POST", "start",
                                  json.dumps({"UpdatePrefs": {"ControlURL": "http://x"}})
                                  .encode()))
    assert code == 400 and "ControlURL" in text and text.count("\n") == 1


def test_metrics_is_prometheus_text(tailnet: MiniTailnet) -> None:
    async def get() -> tuple[int, str, str]:
        import aiohttp

        conn = aiohttp.UnixConnector(path=tailnet.agents["n1"].sock)
        async with aiohttp.ClientSession(connector=conn) as s, \
                s.get("http://local-tailscaled.sock/localapi/v0/metrics") as r:
            return r.status, await r.text(), r.headers.get("Content-Type", "")

    code, text, ctype = asyncio.run(get())
    assert code == 200 and ctype.startswith("text/plain")
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert samples
    for ln in samples:
        assert re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eE]+|.* (NaN|[+-]Inf)',
                            ln), ln
    assert "nodeagent_extension_hook_errors_total 0.0" in samples


@pytest.mark.feature("connreject")
def test_debug_rejects_shape(tailnet: MiniTailnet) -> None:
    code, r = api(tailnet, "GET", "debug-rejects")
    assert code == 200
    check_shape(r, DEBUG_REJECTS)
