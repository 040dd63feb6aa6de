"""The connreject extension inside a real agent: callbacks installed and removed, the node
attribute gate, LocalAPI and c2n endpoints, metrics and the CLI table."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from nodeagent.agent import Agent
from nodeagent.c2n import C2NRequest
from nodeagent.tailcfg import NODE_ATTR_CONN_REJECT, NetworkMap, Node
from tests.agentutil import localapi

pytestmark = pytest.mark.feature("connreject")

A = int(ipaddress.ip_address("100.64.0.1"))
B = int(ipaddress.ip_address("100.64.0.2"))


class NoteHolder:
    """Stands in for the Wrapper and the engine: both expose ``set_conn_reject_note``."""

    def __init__(self) -> None:
        self.note: Any = None

    def set_conn_reject_note(self, fn: Any) -> None:
        self.note = fn



def netmap(attr: bool) -> NetworkMap:
    caps: dict[str, Any] = {NODE_ATTR_CONN_REJECT: []} if attr else {}
    self_node = Node(HostName="a", Addresses=["100.64.0.1/32"], CapMap=caps)
    peer = Node(ID=2, HostName="bee", Key="nodekey:" + "22" * 32, Addresses=["100.64.0.2/32"])
    return NetworkMap(SelfNode=self_node, Peers=[peer])


@pytest.mark.asyncio
async def test_gate_callbacks_and_endpoints(agent: Agent) -> None:
    b = agent.backend
    sock = agent.opts.socket
    wrapper, engine = NoteHolder(), NoteHolder()
    b.set_tundev(wrapper)
    b.set_engine(engine)
    assert wrapper.note is not None and engine.note is not None

    # Disabled until the node attribute arrives: notes are dropped.
    engine.note("outgoing", 6, 4, A, 5000, B, 22, "acl", "tsmp_recv", False)
    st, body = await localapi(sock, "GET", "/localapi/v0/debug-rejects")
    assert st == 200 and body == {"Enabled": False, "Outgoing": [], "Incoming": []}

    b.set_netmap(netmap(True))
    for port in (5000, 5001, 5002):
        engine.note("outgoing", 6, 4, A, port, B, 22, "acl", "tsmp_recv", False)
    wrapper.note("incoming", 6, 4, B, 4000, A, 22, "acl", "tsmp_sent", False)
    st, body = await localapi(sock, "GET", "/localapi/v0/debug-rejects")
    assert st == 200 and body["Enabled"] is True
    (out,) = body["Outgoing"]
    assert (out["Count"], out["Reason"], out["Source"], out["Dst"]) == (3, "acl", "tsmp_recv",
                                                                         "100.64.0.2:22")
    assert body["Incoming"][0]["Source"] == "tsmp_sent"

    # c2n answers the same body.
    resp = await b.c2n.dispatch(C2NRequest("GET", "/debug/rejects"))
    import json

    assert resp.status == 200 and json.loads(resp.body) == body
    assert (await b.c2n.dispatch(C2NRequest("POST", "/debug/rejects"))).status == 405
    st, _ = await localapi(sock, "POST", "/localapi/v0/debug-rejects")
    assert st == 405

    st, text = await localapi(sock, "GET", "/localapi/v0/metrics")
    assert 'nodeagent_connreject_noted_total{direction="outgoing",reason="acl"} 3' in text

    # Removing the attribute disables and empties.
    b.set_netmap(netmap(False))
    st, body = await localapi(sock, "GET", "/localapi/v0/debug-rejects")
    assert body == {"Enabled": False, "Outgoing": [], "Incoming": []}

    # A replaced wrapper gets the callback, the old one loses it; shutdown removes all.
    w2 = NoteHolder()
    b.set_tundev(w2)
    assert wrapper.note is None and w2.note is not None
    b.shutdown()
    assert w2.note is None and engine.note is None


@pytest.mark.asyncio
async def test_prefs_resize_lru(agent: Agent) -> None:
    b = agent.backend
    engine = NoteHolder()
    b.set_engine(engine)
    b.set_netmap(netmap(True))
    st, _ = await localapi(agent.opts.socket, "PATCH", "/localapi/v0/prefs",
                           {"ConnRejectMaxEntries": 2, "ConnRejectMaxEntriesSet": True})
    assert st == 200
    for i in range(5):
        engine.note("outgoing", 6, 4, A, 1, B + i, 22, "timeout", "pendopen_timeout", False)
    _, body = await localapi(agent.opts.socket, "GET", "/localapi/v0/debug-rejects")
    assert [e["Dst"] for e in body["Outgoing"]] == ["100.64.0.5:22", "100.64.0.6:22"]


def test_cli_table_names_peers_and_hints() -> None:
    from nodeagent_connreject.cli import format_rejects, host_names

    status = {"Self": {"HostName": "a", "TailscaleIPs": ["100.64.0.1"]},
              "Peer": {"k": {"HostName": "bee", "TailscaleIPs": ["100.64.0.2", "fd7a::2"]}}}
    resp = {"Enabled": True,
            "Outgoing": [{"First": "2026-11-25T00:00:00Z", "Last": "2026-11-25T00:00:30.5Z",
                          "Count": 3, "Direction": "outgoing", "Proto": 6,
                          "Src": "100.64.0.1:5000", "Dst": "100.64.0.2:22", "Reason": "acl",
                          "Source": "tsmp_recv", "MaybeBroken": False}],
            "Incoming": [{"First": "2026-11-25T00:00:00Z", "Last": "2026-11-25T00:00:00Z",
                          "Count": 1, "Direction": "incoming", "Proto": 17,
                          "Src": "[fd7a::2]:999", "Dst": "[fd7a::1]:53", "Reason": "shields",
                          "Source": "tsmp_sent", "MaybeBroken": False}]}
    import datetime

    now = datetime.datetime(2026, 11, 25, 0, 1, tzinfo=datetime.UTC).timestamp()
    text = format_rejects(resp, host_names(status), now)
    assert "bee (100.64.0.2)" in text and "refused by the tailnet policy on bee" in text
    assert "60s ago" in text or "1m ago" in text
    assert "udp" in text and "53" in text and "shields-up on this node refused bee" in text
    off = format_rejects({"Enabled": False, "Outgoing": [], "Incoming": []}, {})
    assert "debug-conn-reject" in off and "nodeAttrs" in off
