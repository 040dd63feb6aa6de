"""The ``derper`` command as a subprocess: --dev smoke (204, DERP, varz, SIGTERM), one-line
errors for bad input, the key config file, Go-style flags, and 403 on /debug/ for a client in
another network namespace (non-tailnet 198.18.0.0/15 addresses over a veth)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from tests.derperproc import (
    DERPER,
    ENV,
    assert_one_line_error,
    popen_dev_derper,
    run_derper,
    wait_http,
)
from tests.derptls import free_port
from tests.netns import make_netns, popen_in_netns, run_in_netns, skip_unless_netns, veth_pair

pytestmark = pytest.mark.feature("derper")

def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError("derper did not exit within 15 s of SIGTERM") from None
    return proc.returncode, err


# --- bad input --------------------------------------------------------------------------------


def test_bad_flags_are_one_line_usage_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_derper("--no-such-flag"), 2, "unrecognized")
    assert_one_line_error(run_derper("--stun=maybe"), 2, "invalid")
    assert_one_line_error(run_derper("-a", "nonsense"), 2, "listen address")
    assert_one_line_error(run_derper("--certmode", "gcp"), 2, "certmode")
    assert_one_line_error(run_derper("--dev", "--verify-client-url", "ftp://x"), 2,
                          "--verify-client-url 'ftp://x': want an http:// or https:// URL")
    assert_one_line_error(run_derper("--dev", "--home", "ftp://x"), 2, "--home")
    assert_one_line_error(run_derper("--dev", "--tcp-write-timeout", "2 fortnights"), 2,
                          "invalid duration")


def test_runtime_errors_are_one_line(tmp_path: Path) -> None:
    key = tmp_path / "sub" / "derper.key"
    r = run_derper("-c", str(key), "--certmode", "manual", "--hostname", "derp.test",
                   "--certdir", str(tmp_path / "certs"), "-a", "127.0.0.1:0", "--stun=false")
    assert_one_line_error(r, 1, "derp.test.crt does not exist")
    # The config was created on the way: JSON, mode 0600, a 32-byte key.
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = json.loads(key.read_text())["PrivateKey"]
    assert text.startswith("privkey:") and len(bytes.fromhex(text[8:])) == 32
    bad = tmp_path / "bad.key"
    bad.write_text("{not json")
    assert_one_line_error(run_derper("-c", str(bad), "--dev"), 1, "not JSON")
    bad.write_text('{"PrivateKey": "privkey:1234"}')
    assert_one_line_error(run_derper("-c", str(bad), "--dev"), 1, "64 hex")
    unreadable = tmp_path / "dir.key"
    unreadable.mkdir()
    assert_one_line_error(run_derper("-c", str(unreadable), "--dev"), 1, "cannot read config")
    mesh = tmp_path / "mesh"
    mesh.write_text("zz\n")
    assert_one_line_error(run_derper("--dev", "--mesh-psk-file", str(mesh)), 1, "mesh key")
    # A port already taken.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_derper("--dev", "-a", f"127.0.0.1:{port}", "--stun=false")
    assert_one_line_error(r, 1, "cannot listen")


def test_go_style_flags_and_tls_rule() -> None:
    from nodeagent_derper.app import DerperOptions, split_hostport, uses_tls
    from nodeagent_derper.cli import build_parser, go_style

    p = build_parser()
    ns = p.parse_args(go_style(["-hostname", "x.test", "-stun=false", "-a=:8443",
                                "--http-port=-1", "-derp"], p))
    assert (ns.hostname, ns.stun, ns.addr, ns.http_port, ns.derp) == \
        ("x.test", False, ":8443", -1, True)
    assert ns.tcp_write_timeout == 2.0
    for text, secs in (("0", 0.0), ("500ms", 0.5), ("1m30s", 90.0), ("1.5", 1.5)):
        assert p.parse_args(go_style([f"-tcp-write-timeout={text}"], p)).tcp_write_timeout == secs
    assert split_hostport("[::1]:3340") == ("::1", 3340)
    assert split_hostport(":https") == ("", 443)
    k = b"\x01" * 32
    assert uses_tls(DerperOptions(k, addr=":443"))
    assert not uses_tls(DerperOptions(k, addr=":8080"))
    assert uses_tls(DerperOptions(k, addr=":8080", certmode="manual"))
    assert not uses_tls(DerperOptions(k, addr=":443", dev=True))


def test_version_and_nodeagent_hook() -> None:
    r = run_derper("--version")
    assert r.returncode == 0 and r.stdout.strip()
    r = subprocess.run([sys.executable, "-m", "nodeagent.cli.main", "derper", "--", "--version"],
                       capture_output=True, text=True, timeout=30, env=ENV)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# --- --dev smoke --------------------------------------------------------------------------------


def test_dev_smoke_204_derp_varz_sigterm() -> None:
    port, stun_port = free_port(), free_port(socket.SOCK_DGRAM)
    proc = popen_dev_derper(port, stun_port, stdout=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/derp/probe", proc)
        req = urllib.request.Request(base + "/generate_204",
                                     headers={"X-Tailscale-Challenge": "ts_127.0.0.1"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 204
            assert r.headers["X-Tailscale-Response"] == "response ts_127.0.0.1"

        async def derp_and_stun() -> None:
            from nodeagent.derp.client import DerpClient, ReceivedPacket
            from nodeagent.stun.client import stun_query

            a = await DerpClient.connect(base + "/derp", bytes(PrivateKey.generate()))
            b = await DerpClient.connect(base + "/derp", bytes(PrivateKey.generate()))
            try:
                await a.send(b.public_key, b"hello over dev derper")
                while True:
                    ev = await asyncio.wait_for(b.recv(), 5)
                    if isinstance(ev, ReceivedPacket):
                        break
                assert (ev.src, ev.data) == (a.public_key, b"hello over dev derper")
            finally:
                await a.close()
                await b.close()
            (ip, _), _ = await stun_query("127.0.0.1", stun_port, 3.0)
            assert ip == "127.0.0.1"

        asyncio.run(derp_and_stun())
        with urllib.request.urlopen(base + "/debug/varz", timeout=5) as r:
            varz = r.read()
        assert b'stun_requests_total{disposition="success"} 1.0' in varz
        if shutil.which("promtool") is not None:
            pr = subprocess.run(["promtool", "check", "metrics"], input=varz,
                                capture_output=True, timeout=30)
            assert pr.returncode == 0, (pr.stdout + pr.stderr).decode()
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err and "shutting down" in err


def test_debug_denied_from_other_namespace() -> None:
    skip_unless_netns()
    with make_netns("dsrv") as srv, make_netns("dcli") as cli:
        # 198.18.0.0/15 (benchmark range): neither loopback nor tailnet, so no debug access.
        veth_pair(srv, cli, "198.18.0.1/30", "198.18.0.2/30")
        port = 8080
        proc = popen_in_netns(srv, [*DERPER, "--dev", "-a", f":{port}", "--stun=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=ENV)
        try:
            deadline = time.monotonic() + 20
            while True:  # poll readiness from inside the server's namespace
                r = run_in_netns(srv, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       f"http://127.0.0.1:{port}/debug/"], timeout=10)
                if r.stdout == "200":
                    break
                assert proc.poll() is None and time.monotonic() < deadline, r.stdout
                time.sleep(0.05)

            def code(path: str) -> str:
                r = run_in_netns(cli, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       f"http://198.18.0.1:{port}{path}"], timeout=10)
                return r.stdout

            assert code("/generate_204") == "204"  # reachable from there...
            assert code("/debug/") == "403"  # ...but debug is refused
            assert code("/debug/varz") == "403"
            assert code("/debug/pprof/goroutine") == "403"
        finally:
            rc, err = stop(proc)
        assert rc == 0, err
