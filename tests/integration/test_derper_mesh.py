"""DERP mesh (``--mesh-with``) across real derper processes on loopback.

Three of our derpers, meshed in one region over TLS (``https://127.0.0.1:PORT/derp``, one shared
self-signed certificate trusted through ``SSL_CERT_FILE``), with DERP clients on different nodes:
packets both ways, a client moving between nodes, a wrong mesh key refused and counted, a node
killed (only its clients are lost) and restarted (routes rebuild within seconds). Then
Tailscale's own code: ``derpcheck``'s two clients land on different nodes through a proxy that
sends its first connection to one node and its second to another, and a mixed mesh with
Tailscale's ``derper`` relays in both directions.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from nodeagent.derp.client import DerpClient
from tests.derpmesh import (
    DERPCHECK,
    DERPER,
    MESH_KEY,
    Client,
    Fleet,
    Node,
    burst,
    connect_retrying,
    deliver,
    make_certdir,
    mesh_connected,
    our_args,
    split_proxy,
    ts_varz,
    wait_for,
)
from tests.derptls import TAILSCALE_DERPER, free_port
from tests.procutil import stop

pytestmark = [pytest.mark.feature("derper"), pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    tmp = tempfile.mkdtemp(prefix="na-derpmesh-")
    certdir, cafile = make_certdir(tmp)
    psk = os.path.join(tmp, "mesh.psk")
    Path(psk).write_text(MESH_KEY + "\n")
    ports = [free_port() for _ in range(3)]
    # Every form of entry: a URL, HOST:PORT (https://HOST:PORT/derp) and HOST:PORT/DIALHOST.
    mesh_with = (f"https://127.0.0.1:{ports[0]}/derp,127.0.0.1:{ports[1]},"
                 f"127.0.0.1:{ports[2]}/localhost")
    env = {**os.environ, "SSL_CERT_FILE": cafile, "NO_PROXY": "*", "DERPER_LOG": "INFO"}
    nodes = []
    for i, p in enumerate(ports):
        wd = os.path.join(tmp, f"n{i}")
        os.makedirs(wd)
        nodes.append(Node(p, wd, our_args(p, wd, certdir, psk, mesh_with), env))
    ctx = ssl.create_default_context(cafile=cafile)
    f = Fleet(nodes, cafile, ctx, tmp)
    try:
        for n in nodes:
            n.start()
        try:
            for i in range(3):
                wait_for(lambda i=i: mesh_connected(f, i, 2), 30,
                         f"node {i} meshed with 2 peers")
        except AssertionError as e:
            logs = "\n".join(f"--- node {i}:\n{n.stderr()}" for i, n in enumerate(nodes))
            raise AssertionError(f"{e}\n{logs}") from None
        yield f
    finally:
        for n in nodes:
            if n.proc is not None and n.proc.poll() is None:
                stop(n.proc)
            if n.log is not None:
                n.log.close()
        shutil.rmtree(tmp, ignore_errors=True)


# --- tests --------------------------------------------------------------------------------------


def test_clients_on_different_nodes_exchange_both_ways(fleet: Fleet) -> None:
    before = [fleet.vars(i) for i in range(3)]

    async def run() -> None:
        cs = [await Client.connect(n.url, fleet.ctx) for n in fleet.nodes]
        try:
            for a, b in itertools.permutations(cs, 2):
                await deliver(a, b)
            await burst(cs[0], cs[1])
            await burst(cs[1], cs[0])
        finally:
            for c in cs:
                await c.close()

    asyncio.run(run())
    after = [fleet.vars(i) for i in range(3)]
    for i in range(3):
        assert after[i]["packets_forwarded_out"] - before[i]["packets_forwarded_out"] >= 2
        assert after[i]["packets_forwarded_in"] - before[i]["packets_forwarded_in"] >= 2
    assert after[0]["packets_forwarded_out"] - before[0]["packets_forwarded_out"] >= 300
    assert after[1]["packets_forwarded_in"] - before[1]["packets_forwarded_in"] >= 300
    varz = fleet.varz(0)
    assert "derp_mesh_peers_configured 2.0" in varz
    assert "derp_mesh_peers_connected 2.0" in varz
    assert "derp_packets_forwarded_out_total" in varz
    assert 'derp_packets_dropped_total{kind="other",reason="mesh_write_full"}' in varz
    m = after[0]["mesh"]
    assert m["peers_configured"] == 2 and len(m["peers"]) == 2
    with urllib.request.urlopen(f"https://127.0.0.1:{fleet.nodes[0].port}/debug/", timeout=5,
                                context=fleet.ctx) as r:
        assert b"mesh peers" in r.read()


@pytest.mark.parametrize("order", ["connect_new_first", "close_old_first", "to_senders_node"])
def test_client_moving_between_nodes_keeps_receiving(fleet: Fleet, order: str) -> None:
    async def run() -> None:
        sender = await Client.connect(fleet.nodes[0].url, fleet.ctx)
        key = bytes(PrivateKey.generate())
        old = await Client.connect(fleet.nodes[1].url, fleet.ctx, key)
        new: Client | None = None
        target = fleet.nodes[0 if order == "to_senders_node" else 2].url
        try:
            await deliver(sender, old)
            if order == "close_old_first":
                await old.close()
                new = await Client.connect(target, fleet.ctx, key)
            else:
                new = await Client.connect(target, fleet.ctx, key)
                await old.close()
            await deliver(sender, new, timeout=5)
            await burst(sender, new, 100)
            await deliver(new, sender)
        finally:
            await sender.close()
            await old.close()
            if new is not None:
                await new.close()

    asyncio.run(run())


def test_wrong_mesh_key_and_unprivileged_frames_are_refused_and_counted(fleet: Fleet) -> None:
    from nodeagent.derp import frames as F

    before = fleet.vars(2)

    async def run() -> None:
        with pytest.raises(ConnectionError, match="mesh key mismatch"):
            c = await DerpClient.connect(fleet.nodes[2].url, bytes(PrivateKey.generate()),
                                         ssl=fleet.ctx, mesh_key="ee" * 32, timeout=5)
            await c.close()
        plain = await DerpClient.connect(fleet.nodes[2].url, bytes(PrivateKey.generate()),
                                         ssl=fleet.ctx)
        try:
            await plain.write_raw(F.encode_watch_conns())
            with pytest.raises((ConnectionError, OSError)):
                while True:
                    await asyncio.wait_for(plain.recv(), 5)
        finally:
            await plain.close()

    asyncio.run(run())
    after = fleet.vars(2)
    assert after["mesh_key_refusals"] == before["mesh_key_refusals"] + 1
    assert after["closed"].get("unprivileged_frame", 0) == \
        before["closed"].get("unprivileged_frame", 0) + 1
    assert after["watchers"] == before["watchers"]  # the two real mesh peers only
    varz = fleet.varz(2)
    assert f"derp_mesh_key_refusals_total {after['mesh_key_refusals']}.0" in varz
    assert 'derp_conns_closed_total{reason="bad_mesh_key"}' in varz
    assert 'derp_conns_closed_total{reason="unprivileged_frame"}' in varz


def test_killed_node_loses_only_its_clients_and_rebuilds_after_restart(fleet: Fleet) -> None:
    n2 = fleet.nodes[2]

    async def run() -> None:
        a = await Client.connect(fleet.nodes[0].url, fleet.ctx)
        b = await Client.connect(fleet.nodes[1].url, fleet.ctx)
        c = await Client.connect(n2.url, fleet.ctx)
        c2: Client | None = None
        try:
            await deliver(a, c)
            assert fleet.vars(0)["remote_clients"] >= 2
            n2.kill()
            await c.task  # its connection ended
            wait_for(lambda: mesh_connected(fleet, 0, 1) and mesh_connected(fleet, 1, 1), 10,
                     "nodes 0 and 1 notice node 2 is gone")
            peers = {p["url"]: p for p in fleet.vars(0)["mesh"]["peers"]}
            assert peers[n2.url]["keys"] == 0  # everything learned from node 2 forgotten
            await deliver(a, b, timeout=3)
            await deliver(b, a, timeout=3)
            n2.start()
            t0 = time.monotonic()
            c2 = await connect_retrying(n2.url, fleet.ctx)
            await deliver(a, c2, timeout=10)
            await deliver(c2, b, timeout=10)
            rebuilt = time.monotonic() - t0
            assert rebuilt < 10, rebuilt
            wait_for(lambda: all(mesh_connected(fleet, i, 2) for i in range(3)), 10,
                     "full mesh again")
        finally:
            for x in (a, b, c, c2):
                if x is not None:
                    await x.close()

    asyncio.run(run())


def test_mesh_with_without_mesh_key_is_a_one_line_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TAILSCALE_DERPER_MESH_KEY"}
    r = subprocess.run([*DERPER, "--dev", "-mesh-with", "derp2.example.com"],
                       capture_output=True, text=True, timeout=30, env=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("derper: --mesh-with needs the mesh key")


def test_in_process_mesh_start_stop_leaves_no_tasks() -> None:
    """Two in-process derpers (plain HTTP) meshed: stop() cancels and awaits the mesh tasks."""
    from nodeagent_derper.app import Derper, DerperOptions

    from tests.derptls import until

    async def run() -> None:
        ports = [free_port(), free_port()]
        mesh_with = [f"http://127.0.0.1:{p}/derp" for p in ports]
        ds = [Derper(DerperOptions(private_key=bytes(PrivateKey.generate()),
                                   addr=f"127.0.0.1:{p}", dev=True, stun=False,
                                   mesh_key=MESH_KEY, mesh_with=mesh_with)) for p in ports]
        try:
            for d in ds:
                await d.start()
            await until(lambda: all(d.mesh.connected() == 1 for d in ds), 10, "meshed")
            assert [p.is_self for p in ds[0].mesh.peers] == [False]  # own entry skipped
        finally:
            for d in ds:
                await d.stop()
        left = [t for t in asyncio.all_tasks()
                if not t.done() and t.get_name().startswith("mesh ")]
        assert not left, left
        assert all(p._task is None for d in ds for p in d.mesh.peers)

    asyncio.run(run())


# --- Tailscale's code ---------------------------------------------------------------------------


@pytest.mark.skipif(not DERPCHECK.exists(), reason="Tailscale's derpcheck not available")
def test_tailscale_derpcheck_clients_on_different_nodes(fleet: Fleet) -> None:
    ports = [fleet.nodes[0].port, fleet.nodes[1].port]
    before = fleet.vars(0)["packets_forwarded_out"]

    async def run() -> tuple[int, str, list[int]]:
        srv, used = await split_proxy(ports)
        pport = srv.sockets[0].getsockname()[1]
        try:
            p = await asyncio.create_subprocess_exec(
                str(DERPCHECK), f"https://127.0.0.1:{pport}/derp",
                env={**os.environ, "SSL_CERT_FILE": fleet.cafile},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(p.communicate(), 30)
            return p.returncode or 0, out.decode(errors="replace"), used
        finally:
            srv.close()

    code, out, used = asyncio.run(run())
    assert code == 0 and "OK: B received" in out, out
    assert used[:2] == ports  # client A on node 0, client B on node 1
    assert fleet.vars(0)["packets_forwarded_out"] > before


def test_sigterm_stops_a_meshed_node_cleanly(fleet: Fleet) -> None:
    """Last of the fleet's tests: a graceful stop cancels the mesh tasks without leaks, and the
    other nodes notice the peer is gone."""
    n0 = fleet.nodes[0]
    assert n0.proc is not None
    assert stop(n0.proc) == 0
    err = n0.stderr()
    for bad in ("Traceback", "Task was destroyed", "never awaited", "Unclosed"):
        assert bad not in err, err
    wait_for(lambda: mesh_connected(fleet, 1, 1) and mesh_connected(fleet, 2, 1), 10,
             "nodes 1 and 2 notice node 0 stopped")


@pytest.mark.skipif(not TAILSCALE_DERPER.exists() or not DERPCHECK.exists(),
                    reason="Tailscale's derper / derpcheck not available")
def test_mixed_mesh_with_tailscale_derper() -> None:
    """Our derper and Tailscale's meshed (Tailscale's takes ``host:port`` entries and dials
    ``https://host:port/derp``): packets both ways, and derpcheck's clients split across them."""
    tmp = tempfile.mkdtemp(prefix="na-derpmix-")
    certdir, cafile = make_certdir(tmp)
    psk = os.path.join(tmp, "mesh.psk")
    Path(psk).write_text(MESH_KEY + "\n")
    ours_port, ts_port = free_port(), free_port()
    env = {**os.environ, "SSL_CERT_FILE": cafile, "NO_PROXY": "*"}
    wd = os.path.join(tmp, "ours")
    os.makedirs(wd)
    ours = Node(ours_port, wd, our_args(ours_port, wd, certdir, psk,
                                         f"https://127.0.0.1:{ours_port}/derp,"
                                         f"https://127.0.0.1:{ts_port}/derp"), env)
    ctx = ssl.create_default_context(cafile=cafile)
    f = Fleet([ours], cafile, ctx, tmp)
    ts_log = open(os.path.join(tmp, "ts.log"), "wb")
    ts: subprocess.Popen[bytes] | None = None
    try:
        ours.start()  # first, so Tailscale's derper finds it at its first attempt
        wait_for(lambda: f.vars(0)["accepts"] >= 0, 30, "our derper serving")
        ts = subprocess.Popen(
            [str(TAILSCALE_DERPER), "-a", f"127.0.0.1:{ts_port}", "-certmode", "manual",
             "-certdir", certdir, "-hostname", "127.0.0.1", "-http-port", "-1", "-stun=false",
             "-c", os.path.join(tmp, "ts.key"), "-mesh-psk-file", psk,
             "-mesh-with", f"127.0.0.1:{ours_port},127.0.0.1:{ts_port}"],
            stdout=subprocess.DEVNULL, stderr=ts_log, env=env)
        wait_for(lambda: mesh_connected(f, 0, 1) and f.vars(0)["watchers"] == 1, 30,
                 "our derper meshed with Tailscale's, and watched by it")
        wait_for(lambda: ts_varz(ts_port, ctx).get("derp_watchers") == 1, 30,
                 "Tailscale's derper watched by ours")

        async def run() -> None:
            a = await Client.connect(ours.url, ctx)
            b = await Client.connect(f"https://127.0.0.1:{ts_port}/derp", ctx)
            try:
                for _ in range(3):
                    await deliver(a, b)
                    await deliver(b, a)
                # Tailscale's derper queues 32 packets per client: stay below that.
                await burst(a, b, 20)
                await burst(b, a, 20)
            finally:
                await a.close()
                await b.close()
            srv, used = await split_proxy([ours_port, ts_port])
            try:
                p = await asyncio.create_subprocess_exec(
                    str(DERPCHECK), f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}/derp",
                    env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                out, _ = await asyncio.wait_for(p.communicate(), 30)
            finally:
                srv.close()
            assert p.returncode == 0 and b"OK: B received" in out, out
            assert used[:2] == [ours_port, ts_port]

        asyncio.run(run())
        v = f.vars(0)
        tv = ts_varz(ts_port, ctx)
        assert v["packets_forwarded_out"] >= 23 and v["packets_forwarded_in"] >= 23, v
        assert tv["derp_packets_forwarded_in"] >= 23 and tv["derp_packets_forwarded_out"] >= 23
    finally:
        stop(ours.proc)
        if ours.log is not None:
            ours.log.close()
        stop(ts)
        ts_log.close()
        shutil.rmtree(tmp, ignore_errors=True)
