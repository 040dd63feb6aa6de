"""``GET /localapi/v0/whois`` over a real LocalAPI socket: the WhoIsResponse shape for this node
and a peer, by IP, IP:port, [v6]:port and node key; 404 and 400 texts; and (with a real control
server) Tailscale's own CLI printing ``tailscale whois`` from our answer."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.agent import Agent
from nodeagent.localapi.whois import AddrError, parse_addr
from nodeagent.tailcfg import Node, UserProfile
from tests.agentutil import localapi
from tests.inproc_tailnet import TAILSCALE_CLI, InprocTailnet, inproc_tailnet, run_tailscale

PEER_KEY = "nodekey:" + "ab" * 32
PEER_DISCO = "discokey:" + "cd" * 32
NODE_KEYS = {"ID", "StableID", "Name", "User", "Key", "KeyExpiry", "Addresses", "AllowedIPs",
             "Hostinfo", "Created", "MachineAuthorized"}


def _netmap(agent: Agent) -> None:
    from nodeagent.tailcfg import NetworkMap

    me = Node(ID=1, StableID="nSelf", Name="me.tail.example.", HostName="me", User=7,
              Key=agent.backend.node_public_key,
              Addresses=["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
              AllowedIPs=["100.64.0.1/32", "fd7a:115c:a1e0::1/128"])
    peer = Node(ID=2, StableID="nPeer", Name="peer.tail.example.", HostName="peer", User=8,
                Key=PEER_KEY, DiscoKey=PEER_DISCO,
                Addresses=["100.64.0.2/32", "fd7a:115c:a1e0::2/128"],
                AllowedIPs=["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.9.0.0/16"],
                Endpoints=["192.0.2.1:41641"], OS="linux", Online=True, Tags=["tag:srv"],
                KeyExpiry=1_900_000_000.0, Created=1_700_000_000.0)
    agent.apply_netmap(NetworkMap(
        SelfNode=me, Peers=[peer], Domain="tail.example",
        UserProfiles={7: UserProfile(7, "alice@example.com", "Alice"),
                      8: UserProfile(8, "tagged-devices", "Tagged Devices")}))


async def whois(agent: Agent, addr: str | None) -> tuple[int, object]:
    q = "" if addr is None else "?addr=" + urllib.parse.quote(addr, safe="")
    return await localapi(agent.opts.socket, "GET", f"/localapi/v0/whois{q}")


@pytest.mark.asyncio
async def test_whois_before_a_netmap_is_404(agent: Agent) -> None:
    code, body = await whois(agent, agent.backend.node_public_key)
    assert (code, body) == (404, {"error": "no match for IP:port"})


@pytest.mark.asyncio
async def test_whois_peer_shape(agent: Agent) -> None:
    _netmap(agent)
    for addr in ("100.64.0.2", "100.64.0.2:22", "[fd7a:115c:a1e0::2]:443", "fd7a:115c:a1e0::2",
                 PEER_KEY, PEER_KEY.upper().replace("NODEKEY", "nodekey")):
        code, body = await whois(agent, addr)
        assert code == 200, (addr, body)
        assert isinstance(body, dict) and set(body) == {"Node", "UserProfile", "CapMap"}
        n = body["Node"]
        assert NODE_KEYS <= set(n), addr
        assert n["ID"] == 2 and n["StableID"] == "nPeer" and n["Name"] == "peer.tail.example."
        assert n["Key"] == PEER_KEY and n["DiscoKey"] == PEER_DISCO and "Machine" not in n
        assert n["Addresses"] == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]
        assert n["AllowedIPs"][2:] == ["10.9.0.0/16"] and n["Endpoints"] == ["192.0.2.1:41641"]
        assert n["Hostinfo"] == {"Hostname": "peer", "OS": "linux"}
        assert n["Online"] is True and n["Tags"] == ["tag:srv"] and n["User"] == 8
        assert n["KeyExpiry"] == "2030-03-17T17:46:40Z" and n["Created"] == "2023-11-14T22:13:20Z"
        assert body["UserProfile"] == {"ID": 8, "LoginName": "tagged-devices",
                                       "DisplayName": "Tagged Devices", "ProfilePicURL": ""}
        assert body["CapMap"] is None


@pytest.mark.asyncio
async def test_whois_self(agent: Agent) -> None:
    _netmap(agent)
    me = agent.backend.node_public_key
    for addr in ("100.64.0.1", "100.64.0.1:80", me):
        code, body = await whois(agent, addr)
        assert code == 200, (addr, body)
        assert isinstance(body, dict)
        n = body["Node"]
        assert n["Key"] == me and n["StableID"] == "nSelf" and n["Online"] is True
        assert n["Hostinfo"] == {"Hostname": "me", "OS": "linux"} and "Tags" not in n
        assert body["UserProfile"]["LoginName"] == "alice@example.com"
    # tab-indented, one trailing newline, as tailscaled writes it
    reader, writer = await asyncio.open_unix_connection(agent.opts.socket)
    writer.write(b"GET /localapi/v0/whois?addr=100.64.0.1 HTTP/1.1\r\n"
                 b"Host: local-tailscaled.sock\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"application/json" in head and payload.startswith(b'{\n\t"Node": {\n\t\t"ID": 1,')
    assert payload.endswith(b"}\n")


@pytest.mark.asyncio
async def test_whois_not_found_and_bad_input(agent: Agent) -> None:
    _netmap(agent)
    for addr in ("100.64.0.9", "100.64.0.9:1", "10.9.0.1", "nodekey:" + "00" * 32):
        assert await whois(agent, addr) == (404, {"error": "no match for IP:port"}), addr
    bad = {None: "missing 'addr' parameter", "": "missing 'addr' parameter",
           "nodekey:xyz": "invalid nodekey in 'addr' parameter",
           "nodekey:" + "ab" * 31: "invalid nodekey in 'addr' parameter",
           "peer": "invalid 'addr' parameter", "100.64.0.2:": "invalid 'addr' parameter",
           "100.64.0.2:70000": "invalid 'addr' parameter", "[::1]": "invalid 'addr' parameter",
           "[100.64.0.2]:80": "invalid 'addr' parameter", "1.2.3.4:5:6": "invalid 'addr' parameter"}
    for addr, msg in bad.items():
        assert await whois(agent, addr) == (400, {"error": msg}), addr
    code, _ = await localapi(agent.opts.socket, "POST", "/localapi/v0/whois?addr=100.64.0.2")
    assert code == 405


def test_parse_addr() -> None:
    assert parse_addr("100.64.0.1:0") == ("ip", "100.64.0.1")
    assert parse_addr("[FD7A:115C:A1E0::1]:65535") == ("ip", "fd7a:115c:a1e0::1")
    assert parse_addr("nodekey:" + "AB" * 32) == ("nodekey", "nodekey:" + "ab" * 32)
    for bad in ("[::1]:", "[::1]x:1", "::1]:1", "1.2.3.4:+1", "1.2.3.4:٣", "fe80::1%eth0"):
        with pytest.raises(AddrError):
            parse_addr(bad)


@given(st.text(max_size=80) | st.from_regex(
    r"\[?[0-9a-fA-F:.]{0,40}\]?(:[0-9]{0,6})?|nodekey:[0-9a-fA-F]{0,66}", fullmatch=True))
def test_parse_addr_never_raises_other(addr: str) -> None:
    try:
        kind, value = parse_addr(addr)
    except AddrError as e:
        assert "\n" not in str(e)
        return
    assert kind in ("ip", "nodekey") and value


# --- Tailscale's CLI against an agent logged in to our control server ---------------------------


@pytest_asyncio.fixture
async def tailnet(tmp_path: Path) -> AsyncIterator[InprocTailnet]:
    async with inproc_tailnet(tmp_path, members=("peer1",)) as t:
        yield t


@pytest.mark.skipif(not TAILSCALE_CLI.exists(), reason="Tailscale's CLI is not in ../shared")
@pytest.mark.asyncio
async def test_tailscale_cli_whois(tailnet: InprocTailnet) -> None:
    sock = tailnet.agent.opts.socket
    me = tailnet.agent.backend.self_node
    peer = tailnet.members["peer1"]
    await tailnet.until_agent(lambda nm: any(p.HostName == "peer1" for p in nm.Peers))
    assert tailnet.agent.backend.netmap is not None
    peer_node = next(p for p in tailnet.agent.backend.netmap.Peers if p.HostName == "peer1")
    peer_ip = peer_node.tailscale_ips()[0]

    code, out, err = await run_tailscale(sock, "whois", peer_ip)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Machine:" and lines[1].split() == ["Name:", peer_node.Name.rstrip(".")]
    assert lines[2].split() == ["ID:", peer_node.StableID]
    assert any(ln.startswith("  Addresses:") and peer_ip in ln for ln in lines)
    nm = tailnet.agent.backend.netmap
    login = nm.UserProfiles[peer_node.User].LoginName
    assert login and lines[lines.index("User:") + 1].split() == ["Name:", login]
    assert lines[lines.index("User:") + 2].split() == ["ID:", str(peer_node.User)]
    assert "Warning" not in err

    code, out, err = await run_tailscale(sock, "whois", "--json", f"{me.tailscale_ips()[0]}:22")
    assert code == 0, err
    got = json.loads(out)
    assert got["Node"]["Key"] == me.Key and got["Node"]["Name"] == me.Name
    assert got["UserProfile"]["LoginName"]

    code, out, err = await run_tailscale(sock, "whois", "100.127.255.254")
    assert code != 0 and "peer not found" in err
    assert peer.nk.public.hex() in (await whois(tailnet.agent, peer_node.Key))[1]["Node"]["Key"]
