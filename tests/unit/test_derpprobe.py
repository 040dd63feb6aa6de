"""derpprobe without a fleet: loading DERP maps (file, http, local; every failure one line),
the certificate check, the ``--once`` table, the per-node rows and HTML page, the Prometheus
view and the command line's usage errors."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.feature("derper")

NODE = {"Name": "900a", "RegionID": 900, "HostName": "derp.example.net", "IPv4": "192.0.2.1",
        "DERPPort": 443, "STUNPort": 3478}
MAP = {"Regions": {"900": {"RegionID": 900, "RegionCode": "ex", "Nodes": [NODE]},
                   "901": {"RegionID": 901, "Nodes": [
                       {**NODE, "Name": "901a", "RegionID": 901},
                       {**NODE, "Name": "901b", "RegionID": 901, "InsecureForTests": True}]}}}


def load(source: str, socket_path: str = "/nonexistent/na.sock") -> Any:
    from nodeagent_derper.derpprobe.mapload import load_derp_map

    return load_derp_map(source, socket_path=socket_path, timeout=5)


def map_error(source: str, **kw: Any) -> str:
    from nodeagent_derper.derpprobe.mapload import MapError

    with pytest.raises(MapError) as ei:
        load(source, **kw)
    msg = str(ei.value)
    assert "\n" not in msg and msg
    return msg


# --- maps ---------------------------------------------------------------------------------------


def test_file_map_loads_with_tailscale_field_names(tmp_path: Path) -> None:
    p = tmp_path / "map.json"
    p.write_text(json.dumps(MAP))
    dm = load(f"file://{p}")
    assert sorted(dm.Regions) == [900, 901]
    b = dm.Regions[901].Nodes[1]
    assert (b.Name, b.HostName, b.IPv4, b.DERPPort, b.InsecureForTests) == (
        "901b", "derp.example.net", "192.0.2.1", 443, True)
    assert dm.Regions[900].Nodes[0].InsecureForTests is False


@pytest.mark.parametrize(("content", "needle"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"null", "no DERP map"),
    (b"[]", "not a DERP map"),
    (b'{"Regions": [1]}', "not a DERP map"),
    (b'{"Regions": {"x": {"Nodes": []}}}', "not a DERP map"),
    (b'{"Regions": {"1": {"Nodes": [{"DERPPort": "443"}]}}}', "not a DERP map"),
    (b'{"Regions": {}}', "has no regions"),
    (b'{"Regions": {"1": {"RegionID": 1, "Nodes": [{"Name": "1a"}]}}}', "without HostName"),
])
def test_bad_map_files_are_one_line_errors(tmp_path: Path, content: bytes, needle: str) -> None:
    p = tmp_path / "map.json"
    p.write_bytes(content)
    msg = map_error(f"file://{p}")
    assert needle in msg and str(p) in msg


def test_unreadable_sources(tmp_path: Path) -> None:
    assert "No such file" in map_error(f"file://{tmp_path}/missing.json")
    assert "Is a directory" in map_error(f"file://{tmp_path}")
    for bad in ("ftp://x/map", "/etc/map.json", "https://", "derpmap"):
        assert "want https://..., http://..., file:///path or local" in map_error(bad)
    msg = map_error("local", socket_path=str(tmp_path / "na.sock"))
    assert "local agent's DERP map" in msg and "na.sock" in msg


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = {"/map": json.dumps(MAP).encode(), "/junk": b"<html>"}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_http_map(http_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "*")
    assert sorted(load(f"{http_server}/map").Regions) == [900, 901]
    assert "HTTP 404" in map_error(f"{http_server}/nothing")
    assert "not JSON" in map_error(f"{http_server}/junk")
    from tests.derptls import free_port

    assert "cannot fetch DERP map" in map_error(f"http://127.0.0.1:{free_port()}/map")


# --- the certificate check ---------------------------------------------------------------------


def _cert(not_before: dt.datetime, not_after: dt.datetime) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derp.example.net")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def test_cert_days_left() -> None:
    from nodeagent_derper.derpprobe.probes import CertError, cert_days_left

    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    der = _cert(now - dt.timedelta(days=10), now + dt.timedelta(days=30, hours=12))
    assert cert_days_left(der, now) == pytest.approx(30.5)
    with pytest.raises(CertError, match="expired 2030-01-31"):
        cert_days_left(der, now + dt.timedelta(days=31))
    with pytest.raises(CertError, match="not valid before 2029-12-22"):
        cert_days_left(der, now - dt.timedelta(days=11))
    with pytest.raises(CertError, match="does not parse"):
        cert_days_left(b"\x30\x03\x02\x01\x00", now)


# --- results: table, rows, page, metrics -------------------------------------------------------


def _results() -> list[Any]:
    from nodeagent_derper.derpprobe.probes import FAIL, OK, SKIP, ProbeResult

    def r(node: str, probe: str, status: str = OK, **kw: Any) -> ProbeResult:
        region = int(node[:3])
        return ProbeResult(region, node, "127.0.0.1", probe, status, at=1000.0, **kw)

    return [
        r("901b", "tls", latency=0.004, cert_days_left=80.2),
        r("901a", "login", latency=0.0123),
        r("901a", "mesh", peer="901b", latency=0.002),
        r("901b", "mesh", FAIL, peer="901a", error="packet to 901a did not arrive within 5s"),
        r("901b", "login", latency=0.011),
        r("901a", "stun", SKIP, error="no IPv4 address"),
        r("902a", "login", FAIL, error="TCP connect failed: <Connection refused>"),
        r("902a", "packet", FAIL, error="probe client could not log in"),
    ]


def test_once_table_sorted_with_status_latency_and_detail() -> None:
    from nodeagent_derper.derpprobe.report import render_table, summary_line

    lines = render_table(_results()).splitlines()
    assert lines[0].split() == ["REGION", "NODE", "PROBE", "STATUS", "LATENCY", "DETAIL"]
    cols = [ln.split(None, 4)[:4] if " mesh to " not in ln else ln.split()[:6]
            for ln in lines[1:]]
    assert [c[1] for c in cols] == ["901a"] * 3 + ["901b"] * 3 + ["902a"] * 2
    assert lines[1].split()[:5] == ["901", "901a", "login", "ok", "12.3"]
    assert lines[2].split()[2:6] == ["mesh", "to", "901b", "ok"]
    assert "skip" in lines[3] and lines[3].endswith("no IPv4 address")
    assert lines[5].split()[2:5] == ["mesh", "to", "901a"] and " FAIL " in lines[5]
    assert lines[6].endswith("certificate valid for 80 more days")
    assert "FAIL" in lines[7] and lines[7].endswith("<Connection refused>")
    assert summary_line(_results()) == "8 probes of 3 nodes: 4 ok, 3 failed, 1 skipped"


def test_node_rows_and_page() -> None:
    from nodeagent_derper.derpprobe.report import node_rows, render_page

    nodes = [(901, "901a", "127.0.0.1"), (901, "901b", "127.0.0.1"),
             (902, "902a", "127.0.0.1"), (903, "903a", "127.0.0.1")]
    last = {(902, "902a"): ("login: TCP connect failed: <Connection refused>", 990.0),
            (901, "901a"): ("stun: old trouble", 400.0)}
    rows = node_rows(nodes, _results(), last)
    assert [r.health for r in rows] == ["ok", "fail", "fail", "unknown"]
    assert rows[1].failing == ["mesh"] and rows[2].failing == ["login", "packet"]
    assert rows[0].cells["mesh"].text == "1/1 peers, ≤ 2.0 ms"
    assert rows[1].cells["tls"].text == "80 days left"
    page = render_page(rows, source="file:///m.json", interval=15, last_round=1000.0,
                       round_seconds=0.25, now=1005.0)
    assert page.startswith("<!DOCTYPE html>") and '<meta http-equiv="refresh" content="15">' in page
    assert '<tr id="node-902-902a" class="fail" data-node="902a" data-health="fail" ' \
           'data-failing="login packet">' in page
    assert '<tr id="node-901-901a" class="ok"' in page
    assert '<tr id="node-903-903a" class="unknown"' in page
    assert "&lt;Connection refused&gt;" in page and "<Connection" not in page
    assert "stun: old trouble<small>10 min ago</small>" in page  # the last error stays shown
    assert '<span id="failing">2</span> failing' in page and "in 0.2 s" in page
    assert "<script" not in page and "http://" not in page.replace("http-equiv", "")
    empty = render_page(node_rows(nodes, []), source="local", interval=15, last_round=None,
                        round_seconds=None, map_error="cannot get <map>")
    assert "no round finished yet" in empty and "cannot get &lt;map&gt;" in empty


def test_metrics() -> None:
    from nodeagent_derper.derpprobe.service import ProbeService
    from prometheus_client import generate_latest

    from nodeagent.tailcfg import derpmap_from_wire

    svc = ProbeService(derpmap_from_wire(MAP), source="file:///m", socket_path="",
                       interval=15, timeout=5)
    svc.results = {r.key: r for r in _results()}
    svc.counts = {(*r.key, r.status): 3 for r in _results()}
    svc.rounds = 3
    text = generate_latest(svc.registry).decode()
    lines = set(text.splitlines())
    assert 'derpprobe_probe_ok{node="901a",peer="901b",probe="mesh",region="901"} 1.0' in lines
    assert 'derpprobe_probe_ok{node="902a",peer="",probe="login",region="902"} 0.0' in lines
    assert not any(ln.startswith('derpprobe_probe_ok{node="901a",peer="",probe="stun"')
                   for ln in lines)  # skipped: absent
    assert 'derpprobe_node_ok{node="901a",region="901"} 1.0' in lines
    assert 'derpprobe_node_ok{node="901b",region="901"} 0.0' in lines
    assert ('derpprobe_probe_latency_seconds{node="901a",peer="",probe="login",region="901"} '
            '0.0123') in lines
    assert 'derpprobe_tls_cert_days_left{node="901b",region="901"} 80.2' in lines
    assert ('derpprobe_probe_results_total{node="902a",peer="",probe="login",region="902",'
            'result="fail"} 3.0') in lines
    assert "derpprobe_rounds_total 3.0" in lines and "derpprobe_map_ok 1.0" in lines
    assert "derpprobe_map_nodes 3.0" in lines


# --- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "code", "needle"), [
    (["--no-such-flag"], 2, "unrecognized"),
    (["--interval", "0"], 2, "--interval must be more than 0"),
    (["--interval", "soon"], 2, "invalid duration"),
    (["--timeout=-1s"], 2, "invalid duration"),
    (["--listen", "nowhere"], 2, "--listen"),
    (["--derp-map", "ftp://x"], 2, "want https://"),
    (["-once", "-derp-map=file:///nonexistent/map.json"], 1, "cannot read DERP map"),
    (["--derp-map", "local", "--socket", "/nonexistent/na.sock"], 1, "no agent socket"),
])
def test_cli_errors_are_one_line(argv: list[str], code: int, needle: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from nodeagent_derper.derpprobe.cli import main

    assert main(argv) == code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("derpprobe: "), err
    assert needle in lines[0], lines[0]


def test_console_script_and_nodeagent_command_are_registered() -> None:
    from importlib import metadata

    eps = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert eps.get("derpprobe") == "nodeagent_derper.derpprobe.cli:main"
    from nodeagent.cli.registry import CLIRegistry, load_feature_commands

    reg = CLIRegistry()
    load_feature_commands(reg)
    cmd = reg.commands[("derpprobe",)]
    assert cmd.passthrough and not cmd.needs_socket and "needs the" not in cmd.help


def test_cli_address_in_use_is_one_line(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from nodeagent_derper.derpprobe.cli import main

    p = tmp_path / "map.json"
    p.write_text(json.dumps(MAP))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--derp-map", f"file://{p}", "--listen", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("derpprobe: cannot listen")]
    assert len(lines) == 1 and "Traceback" not in err, err
