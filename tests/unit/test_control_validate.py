"""Bounds on node-supplied fields: the server's validators (``control.validate``), the shared
endpoint check (``tailcfg.check_endpoint``), and the node's side dropping bad peer endpoints
from a netmap with one log line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from nodeagent.agent import Agent, AgentOptions
from nodeagent.control import proto, validate
from nodeagent.tailcfg import (
    MAX_ENDPOINTS,
    NetworkMap,
    Node,
    check_endpoint,
    drop_bad_endpoints,
)

NK = b"\x01" * 32


def _register(**kw: Any) -> dict[str, Any]:
    m = proto.msg("register", NodeKey=NK, AuthKey="nakey-x", Hostname="host", OS="linux",
                  DiscoKey=b"\x02" * 32, ReqID=b"\x03" * 16)
    m.update(kw)
    return proto.check_message(m, proto.CLIENT_TYPES)


def _map(**kw: Any) -> dict[str, Any]:
    m = proto.msg("map", NodeKey=NK, Challenge=b"c" * 16, Hostname="host", OS="linux",
                  Endpoints=["192.0.2.1:41641", "[2001:db8::1]:41641"], HomeDERP=1,
                  DiscoKey=None)
    m.update(kw)
    return proto.check_message(m, proto.CLIENT_TYPES)


def _refused(m: dict[str, Any], field: str) -> str:
    with pytest.raises(validate.FieldError) as ei:
        validate.check_node_fields(m)
    assert ei.value.field == field
    text = str(ei.value)
    assert text.startswith(f"invalid {field} in {m['Type']} message: ")
    assert "\n" not in text and len(text) < 300
    return text


def test_good_messages_pass() -> None:
    for m in (_register(), _register(Hostname="", AuthKey="", DiscoKey=None), _map(),
              _map(Endpoints=[], HomeDERP=0), proto.msg("update", Endpoints=None, HomeDERP=None),
              proto.msg("update", Endpoints=[f"10.0.0.{i}:1" for i in range(MAX_ENDPOINTS)]),
              proto.msg("c2n-response", ID=1, Status=200, Headers={"Content-Type": "a/b"},
                        Body=b""),
              proto.msg("keepalive")):
        assert validate.check_node_fields(m) is m


def test_hostname_is_a_bounded_dns_label() -> None:
    assert validate.check_node_fields(_register(Hostname="a" * 63))
    assert "4194304 bytes, over the 63-byte limit" in _refused(
        _register(Hostname="x" * (4 << 20)), "Hostname")
    _refused(_register(Hostname="a" * 64), "Hostname")
    for bad in ("host.example.com", "my laptop", "-lead", "trail-", "caf\u00e9", "a\nb", "a_b"):
        _refused(_register(Hostname=bad), "Hostname")
        _refused(_map(Hostname=bad), "Hostname")


def test_endpoints_are_bounded_and_parse() -> None:
    too_many = [f"10.0.{i >> 8}.{i & 255}:41641" for i in range(10_000)]
    assert "10000 endpoints, over the limit of 32" in _refused(_map(Endpoints=too_many),
                                                                 "Endpoints")
    assert "port out of range" in _refused(_map(Endpoints=["1.2.3.4:99999"]), "Endpoints")
    for bad in ("1.2.3.4:0", "1.2.3.4", "::1:5", "[fe80::1%eth0]:5", "host:5", "0.0.0.0:5",
                "224.0.0.1:5", "255.255.255.255:5", "1" * 100, "[1.2.3.4]:5"):
        text = _refused(proto.msg("update", Endpoints=["192.0.2.1:1", bad]), "Endpoints")
        assert "[1]" in text


def test_other_strings_keys_and_numbers_are_bounded() -> None:
    _refused(_register(OS="x" * 33), "OS")
    _refused(_map(OS="linux\x00"), "OS")
    _refused(_register(AuthKey="k" * 257), "AuthKey")
    _refused(_register(DiscoKey=b"\x00" * 31), "DiscoKey")
    _refused(_register(ReqID=b""), "ReqID")
    _refused(_register(ReqID=b"r" * 65), "ReqID")
    _refused(_map(HomeDERP=-1), "HomeDERP")
    _refused(proto.msg("update", HomeDERP=1 << 40), "HomeDERP")
    c2n = proto.msg("c2n-response", ID=1, Status=200, Headers={}, Body=b"")
    _refused(dict(c2n, Status=99999), "Status")
    _refused(dict(c2n, Headers={"X-A": "b\r\nSet-Cookie: x"}), "Headers")
    _refused(dict(c2n, Headers={"bad name": "v"}), "Headers")
    _refused(dict(c2n, Headers={f"H{i}": "v" for i in range(65)}), "Headers")


def test_check_endpoint() -> None:
    assert check_endpoint("192.0.2.1:41641") == ("192.0.2.1", 41641)
    assert check_endpoint("[2001:db8::1]:1") == ("2001:db8::1", 1)
    assert check_endpoint("127.0.0.1:65535") == ("127.0.0.1", 65535)
    for bad in ("1.2.3.4:99999", "1.2.3.4:0", "1.2.3.4:-1", "1.2.3.4:", "1.2.3.4: 5",
                "1.2.3.4:\u0665", ":5", "[]:5", "[::1]", "[::]:5", "ff02::1:5", None, 5, b"x"):
        with pytest.raises(ValueError):
            check_endpoint(bad)


def test_hostname_label_makes_what_the_server_accepts() -> None:
    assert validate.hostname_label("web1.example.com") == "web1"
    assert validate.hostname_label("My Laptop") == "My-Laptop"
    assert validate.hostname_label("--x--") == "x"
    assert validate.hostname_label("") == ""
    long = validate.hostname_label("a" * 62 + "-b" * 10)
    assert len(long) <= 63 and not long.endswith("-")
    for h in ("web1.example.com", "My Laptop", "caf\u00e9 \u2603", "a" * 500, "..", "_x_"):
        assert validate.check_hostname(validate.hostname_label(h)) is None


# --- the node's side -------------------------------------------------------------------------

def _nm() -> NetworkMap:
    good = Node(ID=2, HostName="good", Key="nodekey:" + "22" * 32,
                Endpoints=["192.0.2.2:41641"])
    bad = Node(ID=3, HostName="bad", Key="nodekey:" + "33" * 32,
               Endpoints=["1.2.3.4:99999", "192.0.2.3:41641", "junk", "[2001:db8::3]:7"])
    flood = Node(ID=4, HostName="flood", Key="nodekey:" + "44" * 32,
                 Endpoints=[f"10.0.{i >> 8}.{i & 255}:1" for i in range(10_000)])
    return NetworkMap(SelfNode=Node(ID=1), Peers=[good, bad, flood])


def test_drop_bad_endpoints_keeps_the_valid_ones() -> None:
    nm = _nm()
    out, dropped, why = drop_bad_endpoints(nm)
    assert [p.Endpoints for p in out.Peers[:2]] == [["192.0.2.2:41641"],
                                                    ["192.0.2.3:41641", "[2001:db8::3]:7"]]
    assert out.Peers[2].Endpoints == nm.Peers[2].Endpoints[:MAX_ENDPOINTS]
    assert dropped == 2 + 10_000 - MAX_ENDPOINTS
    assert why == "peer 'bad': port out of range in '1.2.3.4:99999'"
    assert out.Peers[0] is nm.Peers[0]  # untouched peers are shared
    assert len(nm.Peers[1].Endpoints) == 4  # the input is not modified
    same, n, _ = drop_bad_endpoints(NetworkMap(Peers=[nm.Peers[0]]))
    assert n == 0 and same.Peers == [nm.Peers[0]]


class _RecordingDataPlane:
    def __init__(self) -> None:
        self.maps: list[NetworkMap] = []

    def apply_netmap(self, nm: NetworkMap) -> None:
        self.maps.append(nm)


@pytest.mark.asyncio
async def test_agent_drops_bad_endpoints_with_one_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(AgentOptions(socket=str(tmp_path / "sock"), state_dir=str(tmp_path / "st")))
    dp = _RecordingDataPlane()
    agent.dataplane = dp
    with caplog.at_level(logging.WARNING):
        agent.apply_netmap(_nm())
    lines = [r for r in caplog.records if "endpoint" in r.getMessage()]
    assert len(lines) == 1
    assert "ignored 9970 invalid peer endpoint(s)" in lines[0].getMessage()
    assert [p.Endpoints for p in dp.maps[0].Peers[:2]] == [
        ["192.0.2.2:41641"], ["192.0.2.3:41641", "[2001:db8::3]:7"]]
    assert agent.backend.netmap is not None
    assert agent.backend.netmap.Peers[1].Endpoints == ["192.0.2.3:41641", "[2001:db8::3]:7"]
    agent.backend.shutdown()
