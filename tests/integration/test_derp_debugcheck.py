"""``debug derp REGION``: the region checks, the LocalAPI endpoint, our CLI and Tailscale's CLI.

Relays are TLS derpers on loopback (tests/derptls.py); the agent runs in-process from a netmap
file holding its SelfNode and the DERP map (what ``nodeagent up --netmap-file F`` loads), and the
CLIs run as processes against its socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from nodeagent.agent import Agent, AgentOptions
from nodeagent.derp.debugcheck import check_region
from nodeagent.tailcfg import DERPNode, DERPRegion, to_wire
from tests.agentutil import localapi, nodeagent_cmd, public_tempdir
from tests.derptls import (
    TAILSCALE_CLI,
    TAILSCALE_DERPER,
    TLSDerper,
    derp_map,
    free_port,
    node,
    region,
    tailscale_derper,
)

pytestmark = [pytest.mark.timeout(120)]
ours = pytest.mark.feature("derper")


@pytest_asyncio.fixture
async def derper() -> AsyncIterator[TLSDerper]:
    d = await TLSDerper().start()
    try:
        yield d
    finally:
        await d.stop()
        d.cleanup()


def good_and_dead(d: TLSDerper) -> Any:
    dead = free_port()
    return derp_map(region(900, d.node(), code="test"),
                    region(901, node(dead, name="901dead", region=901), code="dead"))


def _kinds(rep: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    return rep["Info"] or [], rep["Warnings"] or [], rep["Errors"] or []


# --- the checks ------------------------------------------------------------------------------

@ours
@pytest.mark.asyncio
async def test_region_of_our_tls_derper_has_no_errors(derper: TLSDerper) -> None:
    rep = (await check_region(good_and_dead(derper), "900")).to_json()
    info, _, _ = _kinds(rep)
    assert rep["Errors"] is None and rep["Warnings"] is None, rep
    text = "\n".join(info)
    assert info[0] == 'Region 900 == "test" (test 900)'
    assert "TLS connection to 127.0.0.1 (node 900a) over IPv4" in text
    assert "GET /generate_204 over https" in text and "challenge echoed" in text
    assert f"5 DERP logins succeeded; server key nodekey:{derper.public_key.hex()}" in text
    assert "Packet round trip through 127.0.0.1 (node 900a)" in text
    assert f"STUN to 127.0.0.1 port {derper.stun_port} answered" in text
    by_code = (await check_region(good_and_dead(derper), "TEST")).to_json()
    assert by_code["Errors"] is None and by_code["Info"][0] == info[0]


@ours
@pytest.mark.asyncio
async def test_closed_port_is_an_error_naming_the_node(derper: TLSDerper) -> None:
    rep = (await check_region(good_and_dead(derper), "dead")).to_json()
    info, _, errs = _kinds(rep)
    assert errs and all("901dead" in e for e in errs), errs
    assert any("could not connect" in e and "refused" in e.lower() for e in errs)
    assert any("DERP login 1 of 5 failed" in e for e in errs)
    assert not any("round trip" in x for x in info + errs)  # no login, no round trip


@pytest.mark.asyncio
async def test_map_problems_stop_early() -> None:
    rep = (await check_region(None, "900")).to_json()
    assert rep == {"Info": None, "Warnings": None, "Errors": ["no DERP map (not connected?)"]}
    dm = derp_map(DERPRegion(RegionID=902, RegionCode="empty"))
    rep = (await check_region(dm, "nope")).to_json()
    assert rep["Errors"] == ['no such region "nope" in DERP map'] and rep["Info"] is None
    rep = (await check_region(dm, "902")).to_json()
    assert rep["Info"] == ['Region 902 == "empty"']
    assert rep["Errors"] == ["Region has no nodes defined"]
    stun_only = derp_map(DERPRegion(RegionID=903, RegionCode="s", Nodes=[
        DERPNode(Name="s1", HostName="127.0.0.1", IPv4="127.0.0.1", STUNOnly=True,
                 STUNPort=-1)]))
    rep = (await check_region(stun_only, "903")).to_json()
    assert rep["Errors"] is None
    assert rep["Warnings"] == ["Region has only STUN nodes: no DERP relay to check"]


@pytest.mark.asyncio
async def test_tailscale_derper_region_has_no_errors() -> None:
    if not TAILSCALE_DERPER.exists():
        pytest.skip(f"Tailscale's derper binary is missing: {TAILSCALE_DERPER}")
    with tailscale_derper() as (port, stun):
        rep = (await check_region(derp_map(region(900, node(port, stun_port=stun))),
                                  "900")).to_json()
    assert rep["Errors"] is None, rep
    assert any("5 DERP logins succeeded" in x for x in rep["Info"])
    assert any("Packet round trip" in x for x in rep["Info"])


# --- through the agent -----------------------------------------------------------------------

@pytest_asyncio.fixture
async def agent(derper: TLSDerper) -> AsyncIterator[Agent]:
    d = public_tempdir()
    nm_path = os.path.join(d, "netmap.json")
    with open(nm_path, "w") as f:
        json.dump({"SelfNode": {"Addresses": ["100.64.0.1/32"], "HomeDERP": 900},
                   "DERPMap": to_wire(good_and_dead(derper))}, f)
    a = Agent(AgentOptions(socket=os.path.join(d, "run", "na.sock"),
                           state_dir=os.path.join(d, "state"), netmap_file=nm_path))
    await a.start()
    try:
        yield a
    finally:
        await a.stop()
        shutil.rmtree(d, ignore_errors=True)


async def run(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@ours
@pytest.mark.asyncio
async def test_localapi_debug_derp_region(agent: Agent) -> None:
    sock = agent.opts.socket
    code, rep = await localapi(sock, "POST", "/localapi/v0/debug-derp-region?region=900")
    assert code == 200 and set(rep) == {"Info", "Warnings", "Errors"}
    assert rep["Errors"] is None and rep["Info"][0].startswith("Region 900 ")
    code, rep = await localapi(sock, "POST", "/localapi/v0/debug-derp-region?region=dead")
    assert code == 200 and any("901dead" in e for e in rep["Errors"])
    code, rep = await localapi(sock, "POST", "/localapi/v0/debug-derp-region")
    assert code == 200 and rep["Errors"] == ['no such region "" in DERP map']
    code, rep = await localapi(sock, "GET", "/localapi/v0/debug-derp-region?region=900")
    assert code == 405


@ours
@pytest.mark.asyncio
async def test_nodeagent_cli_debug_derp(agent: Agent) -> None:
    sock = agent.opts.socket
    rc, out, err = await run(*nodeagent_cmd(), "debug", "derp", "900", "--socket", sock)
    assert rc == 0, err
    assert out.startswith("DERP region 900:\n  - Region 900 ")
    assert out.rstrip().endswith("No problems found.")
    rc, out, err = await run(*nodeagent_cmd(), "debug", "derp", "dead", "--socket", sock)
    assert rc == 1 and "  error: 127.0.0.1 (node 901dead): " in out
    rc, out, err = await run(*nodeagent_cmd(), "debug", "derp", "900", "--json",
                             "--socket", sock)
    assert rc == 0 and json.loads(out)["Errors"] is None


@ours
@pytest.mark.asyncio
async def test_tailscale_cli_debug_derp(agent: Agent) -> None:
    if not TAILSCALE_CLI.exists():
        pytest.skip(f"Tailscale's CLI binary is missing: {TAILSCALE_CLI}")
    sock = agent.opts.socket
    rc, out, err = await run(str(TAILSCALE_CLI), f"--socket={sock}", "debug", "derp", "900")
    assert rc == 0, err
    rep = json.loads(out)
    assert not rep.get("Errors") and rep["Info"][0].startswith("Region 900 ")
    rc, out, err = await run(str(TAILSCALE_CLI), f"--socket={sock}", "debug", "derp", "dead")
    assert rc == 0, err  # Tailscale's CLI prints the report whatever it says
    assert any("901dead" in e for e in json.loads(out)["Errors"])
