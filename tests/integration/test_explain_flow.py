"""Explaining rejected flows end to end.

In process (fast): a node asks control over its authenticated map stream about a flow it took
part in and gets the policy explanation; asking about another node's flow is refused; the admin
API answers the same question; the agent's ``debug-rejects?explain=1`` puts control's sentence on
an ``acl`` row, keeps the plain endpoint in Tailscale's shape, and says so in one clause when
control cannot be asked. With real processes (``tests.minitailnet``): a flow blocked by the policy
shows the explanation in ``debug-rejects?explain=1`` and in ``nodeagent debug rejects --explain``,
and ``nodeagent control explain`` prints it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from nodeagent.control.admin import AdminClient
from nodeagent.control.client import ControlError
from tests.agentutil import localapi
from tests.inproc_tailnet import InprocTailnet, inproc_tailnet

pytestmark = [pytest.mark.integration]

HAS_CONNREJECT = importlib.util.find_spec("nodeagent_connreject") is not None
needs_connreject = pytest.mark.skipif(not HAS_CONNREJECT,
                                      reason="feature connreject is not installed")

POLICY = """{
  // the agent may reach a on every port but 22
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["a:0-21,23-65535"]},
    {"action": "accept", "src": ["*"], "dst": ["agent:*", "b:*"]},
  ],
  "nodeAttrs": [{"target": ["*"], "attr": ["debug-conn-reject"]}],
}
"""


def _ip(t: InprocTailnet, name: str) -> str:
    return next(n.ipv4 for n in t.control.store.list_nodes() if n.hostname == name)


@pytest_asyncio.fixture
async def tailnet(tmp_path: Path) -> AsyncIterator[InprocTailnet]:
    async with inproc_tailnet(tmp_path, members=("a", "b")) as t:
        t.control.set_policy(POLICY)
        await t.until_agent(lambda nm: nm.SelfNode.has_cap("debug-conn-reject"),
                            what="the policy with debug-conn-reject")
        yield t


@pytest.mark.asyncio
async def test_node_asks_about_its_own_flow_only(tailnet: InprocTailnet) -> None:
    a = tailnet.members["a"].client
    assert a is not None
    agent, ip_a, ip_b = _ip(tailnet, "agent"), _ip(tailnet, "a"), _ip(tailnet, "b")
    # a is the destination: allowed to ask, and the answer is the policy's.
    res = await a.explain(agent, ip_a, 22, 6)
    assert res["Allowed"] is False
    assert res["NearestMiss"]["Index"] == 0 and res["NearestMiss"]["Line"] == 4
    assert res["NearestMiss"]["Text"].endswith("not :22.")
    assert json.loads(res["Suggestion"])["dst"] == ["a:22"]
    assert (await a.explain(ip_a, agent, 80, 6))["Allowed"] is True  # a is the source
    # A flow between two other nodes: refused, and a's stream survives the refusal.
    with pytest.raises(ControlError, match="only ask about flows it is the source or "
                                           "destination"):
        await a.explain(agent, ip_b, 22, 6)
    assert (await a.explain(agent, ip_a, 80, 6))["Allowed"] is True


@pytest.mark.asyncio
async def test_admin_api_explains(tailnet: InprocTailnet) -> None:
    adm = AdminClient(tailnet.control.url, tailnet.control.admin_token)
    import asyncio

    out = await asyncio.to_thread(adm.explain, "agent", "a", 22, 6)
    assert out["Allowed"] is False and "Nearest miss: acls[0] at policy:4" in out["Text"]
    out = await asyncio.to_thread(adm.explain, "agent", "a", 80, 6)
    assert out["Allowed"] is True and out["Summary"].startswith("Allowed: acls[0] at policy:4")


async def _rejects(sock: str, query: str = "") -> dict[str, Any]:
    st, body = await localapi(sock, "GET", "/localapi/v0/debug-rejects" + query)
    assert st == 200, body
    return body if isinstance(body, dict) else json.loads(body)  # type: ignore[no-any-return]


def _note(t: InprocTailnet, reason: str, dst: str, port: int) -> None:
    ext = t.agent.backend.extensions.plugin("connreject")
    src = int.from_bytes(socket.inet_aton(_ip(t, "agent")), "big")
    d = int.from_bytes(socket.inet_aton(dst), "big")
    ext.note("outgoing", 6, 4, src, 40000, d, port, reason, "tsmp_recv", False)


@needs_connreject
@pytest.mark.asyncio
async def test_debug_rejects_explain(tailnet: InprocTailnet) -> None:
    sock = tailnet.agent.opts.socket
    _note(tailnet, "acl", _ip(tailnet, "a"), 22)
    _note(tailnet, "shields", _ip(tailnet, "b"), 80)
    plain = await _rejects(sock)
    assert all(set(ev) == {"First", "Last", "Count", "Direction", "Proto", "Src", "Dst",
                           "Reason", "Source", "MaybeBroken"} for ev in plain["Outgoing"])
    out = {ev["Reason"]: ev for ev in (await _rejects(sock, "?explain=1"))["Outgoing"]}
    acl = out["acl"]
    assert acl["Explanation"].startswith("Denied: no ACL entry lets agent")
    assert "Nearest: acls[0] at policy:4 allows * → a:0-21,23-65535, not :22." \
        in acl["Explanation"]
    assert acl["ExplanationDetail"]["Allowed"] is False
    assert out["shields"]["Explanation"] == "The peer has shields-up on."
    # Control out of reach: the endpoint still answers, and the sentence says why in one clause.
    await tailnet.agent.control.stop()
    _note(tailnet, "acl", _ip(tailnet, "b"), 23)
    out = {(ev["Reason"], ev["Dst"]): ev for ev in
           (await _rejects(sock, "?explain=1"))["Outgoing"]}
    gone = out[("acl", f"{_ip(tailnet, 'b')}:23")]["Explanation"]
    assert gone == ("The tailnet policy refused it at the peer's filter; control could not be "
                    "asked why (this node is not logged in to a control server).")


# --- real processes --------------------------------------------------------------------------

MINI_POLICY = """{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["n1:*"]},
    {"action": "accept", "src": ["*"], "dst": ["n2:0-21,23-65535"]},
  ],
  "nodeAttrs": [{"target": ["*"], "attr": ["debug-conn-reject"]}],
}
"""


@pytest.fixture(scope="module")
def mini() -> Iterator[Any]:
    from tests.netns import netns_available, tun_available

    missing = netns_available() or tun_available()
    if missing:
        pytest.skip(missing)
    from tests.minitailnet import mini_tailnet

    with mini_tailnet() as t:
        path = os.path.join(t.dir, "policy.hujson")
        with open(path, "w") as f:
            f.write(MINI_POLICY)
        r = t.ctl("policy", "set", path)
        assert r.returncode == 0, r.stderr
        yield t


@needs_connreject
def test_blocked_flow_explained_by_agent_and_cli(mini: Any) -> None:
    from tests.dataplane import connect
    from tests.minitailnet import wait
    from tests.wgnet import run_in

    n1, n2 = mini.agents["n1"], mini.agents["n2"]
    ip2 = n2.status()["Self"]["TailscaleIPs"][0]
    wait(lambda: n1.status()["Self"].get("CapMap", {}) is not None and json.loads(
        n1.nodeagent("debug", "rejects", "--json").stdout)["Enabled"], 20, "recording on")
    outcome, _ = run_in(n1.ns, connect, ip2, 22, 5.0)
    assert outcome == "refused"

    def acl_row() -> dict[str, Any] | None:
        r = n1.nodeagent("debug", "rejects", "--json", "--explain")
        assert r.returncode == 0, r.stderr
        rows = [e for e in json.loads(r.stdout)["Outgoing"]
                if e["Dst"] == f"{ip2}:22" and e["Reason"] == "acl"]
        return rows[0] if rows else None

    row = wait(acl_row, 20, "the acl row")
    assert row["Explanation"].startswith("Denied: no ACL entry lets n1")
    assert "allows * → n2:0-21,23-65535, not :22." in row["Explanation"]
    assert row["ExplanationDetail"]["NearestMiss"]["Line"] == 4
    table = n1.nodeagent("debug", "rejects", "--explain")
    assert table.returncode == 0 and "why: Denied: no ACL entry lets n1" in table.stdout
    plain = n1.nodeagent("debug", "rejects", "--json")
    assert "Explanation" not in plain.stdout
    r = mini.ctl("explain", "n1", "n2:22")
    assert r.returncode == 1 and "Denied: no ACL entry lets n1 reach n2 on tcp port 22" \
        in r.stdout, r.stdout + r.stderr
    assert '"dst": ["n2:22"]' in r.stdout
    assert mini.ctl("explain", "n1", "n2:80").returncode == 0
    bad = mini.ctl("explain", "n1", "nowhere:22")
    assert bad.returncode != 0 and "no node, IP or tag 'nowhere'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
