"""The LocalAPI over a real Unix socket: Tailscale paths and names, permissions, errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from nodeagent.agent import Agent
from nodeagent.ipnext.known import KNOWN_FEATURES
from tests.agentutil import localapi

STATUS_KEYS = {"Version", "TUN", "BackendState", "HaveNodeKey", "AuthURL", "TailscaleIPs", "Self",
               "Health", "MagicDNSSuffix", "CurrentTailnet", "CertDomains", "Peer", "User",
               "ClientVersion"}
# Tailscale's PeerStatus keys that are never omitted (AllowedIPs, CapMap, KeyExpiry, ... are
# omitempty: tests/integration/test_localapi_tailscale_shapes.py checks the whole shape).
PEER_KEYS = {"ID", "PublicKey", "HostName", "DNSName", "OS", "UserID", "TailscaleIPs",
             "Addrs", "CurAddr", "Relay", "PeerRelay", "RxBytes", "TxBytes", "Created",
             "LastWrite", "LastSeen", "LastHandshake", "Online", "Active", "ExitNode",
             "ExitNodeOption", "PeerAPIURL", "TaildropTarget", "NoFileSharingReason",
             "InNetworkMap", "InMagicSock", "InEngine"}



@pytest.mark.asyncio
async def test_status_shape(agent: Agent) -> None:
    code, st = await localapi(agent.opts.socket, "GET", "/localapi/v0/status")
    assert code == 200 and STATUS_KEYS <= set(st)
    assert PEER_KEYS <= set(st["Self"])
    assert st["Self"]["PublicKey"] == agent.backend.node_public_key
    assert st["BackendState"] == "NeedsLogin" and st["Peer"] == {}


@pytest.mark.asyncio
async def test_socket_modes(agent: Agent) -> None:
    s = os.stat(agent.opts.socket)
    assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o666
    assert stat.S_IMODE(os.stat(os.path.dirname(agent.opts.socket)).st_mode) == 0o755


@pytest.mark.asyncio
async def test_prefs_get_patch(agent: Agent) -> None:
    sock = agent.opts.socket
    code, p = await localapi(sock, "GET", "/localapi/v0/prefs")
    assert code == 200 and p["ShieldsUp"] is False and "ControlURL" in p
    code, p = await localapi(sock, "PATCH", "/localapi/v0/prefs",
                             {"ShieldsUpSet": True, "ShieldsUp": True, "Hostname": "ignored"})
    assert code == 200 and p["ShieldsUp"] is True and p["Hostname"] == ""
    code, e = await localapi(sock, "PATCH", "/localapi/v0/prefs",
                             {"ShieldsUpSet": True, "ShieldsUp": "maybe"})
    assert code == 400 and "ShieldsUp" in e["error"]
    code, e = await localapi(sock, "PATCH", "/localapi/v0/prefs", None)
    assert code == 400


@pytest.mark.asyncio
async def test_errors_are_json(agent: Agent) -> None:
    sock = agent.opts.socket
    code, e = await localapi(sock, "GET", "/localapi/v0/no-such-thing")
    assert code == 404 and "no-such-thing" in e["error"]
    code, e = await localapi(sock, "GET", "/elsewhere")
    assert code == 404 and "error" in e
    code, e = await localapi(sock, "DELETE", "/localapi/v0/status")
    assert code == 405 and e["error"] == "GET required"


@pytest.mark.asyncio
@pytest.mark.omitted("connreject")
async def test_debug_rejects_names_missing_feature(agent: Agent) -> None:
    code, e = await localapi(agent.opts.socket, "GET", "/localapi/v0/debug-rejects")
    assert code == 404 and e["feature"] == "connreject"
    install = KNOWN_FEATURES["connreject"].install  # the command fits this install
    assert install.startswith("pip install ") and e["error"].endswith(install)


CLIENT = textwrap.dedent("""
    import http.client, json, os, socket, sys
    os.setgid(65534); os.setuid(65534)
    class C(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
    out = {}
    for method, body in (("GET", None), ("PATCH", '{"ShieldsUpSet": true, "ShieldsUp": true}')):
        c = C("local-tailscaled.sock"); c.request(method, "/localapi/v0/prefs", body=body)
        r = c.getresponse(); out[method] = [r.status, json.loads(r.read())]
    print(json.dumps(out))
""")


@pytest.mark.asyncio
async def test_non_owner_cannot_write(agent: Agent) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, agent.opts.socket,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    res = json.loads(out)
    assert res["GET"][0] == 200  # anyone who can connect may read
    assert res["PATCH"][0] == 403 and "access denied" in res["PATCH"][1]["error"]
    assert agent.backend.prefs.ShieldsUp is False


@pytest.mark.asyncio
async def test_serve_config_is_tailscales_unconfigured_answer(agent: Agent) -> None:
    # `tailscale status` asks for it and prints a Funnel warning on anything but this.
    import aiohttp

    conn = aiohttp.UnixConnector(path=agent.opts.socket)
    async with aiohttp.ClientSession(connector=conn) as s, s.get(
            "http://local-tailscaled.sock/localapi/v0/serve-config") as r:
        assert r.status == 200 and await r.read() == b"null"
        assert r.headers["Etag"] == (
            "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b")
