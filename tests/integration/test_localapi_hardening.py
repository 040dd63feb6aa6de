"""Hostile or careless input over a real LocalAPI socket and to a real ``nodeagent up``: bodies
Python's json cannot hold, bodies over the size limit, a Hostname that is no DNS label, an
operator handing on operator rights, and state files left wrong. Each is refused (or repaired)
with one clear line; the agent keeps serving and never prints a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
import sys
import textwrap
from typing import Any

import aiohttp
import pytest

from nodeagent.agent import Agent
from tests.agentutil import agent_process, localapi, public_tempdir, run_cli, state_file
from tests.procutil import stop

PREFS = "/localapi/v0/prefs"



async def raw_request(sock: str, method: str, path: str,
                      data: bytes | None) -> tuple[int, str, Any]:
    """(status, content type, parsed JSON or text) for a body sent exactly as given."""
    conn = aiohttp.UnixConnector(path=sock)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.request(method, f"http://local-tailscaled.sock{path}", data=data) as r:
            text = await r.text()
            try:
                return r.status, r.content_type, json.loads(text)
            except ValueError:
                return r.status, r.content_type, text


def _one_line_json_error(ctype: str, body: Any, starts: str) -> str:
    assert ctype == "application/json", body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    msg = body["error"]
    assert msg.startswith(starts) and "\n" not in msg and "Traceback" not in msg, msg
    assert len(msg) < 300, msg
    return msg


DEEP = b"[" * 400_000 + b"]" * 400_000


@pytest.mark.asyncio
@pytest.mark.parametrize(("body", "needle"), [
    (b"1" * 5000, "5000 digits"),
    (b'{"NetfilterModeSet": true, "NetfilterMode": ' + b"7" * 5000 + b"}", "5000 digits"),
    (DEEP, "nested too deeply"),
    (b'{"AdvertiseTagsSet": true, "AdvertiseTags": ' + DEEP + b"}", "nested too deeply"),
    (b'{"ShieldsUpSet": true, "ShieldsUp": \xff}', "not UTF-8"),
], ids=["huge-int", "huge-int-in-pref", "deep", "deep-in-pref", "not-utf8"])
async def test_prefs_patch_unusable_json_is_400(agent: Agent, body: bytes, needle: str) -> None:
    sock = agent.opts.socket
    code, ctype, e = await raw_request(sock, "PATCH", PREFS, body)
    assert code == 400, e
    assert needle in _one_line_json_error(ctype, e, "prefs: ")
    code, p = await localapi(sock, "GET", PREFS)  # still serving, nothing changed
    assert code == 200 and p["NetfilterMode"] == 0 and p["AdvertiseTags"] == []


@pytest.mark.asyncio
async def test_body_over_limit_is_json_413(agent: Agent) -> None:
    sock = agent.opts.socket
    big = json.dumps({"ShieldsUpSet": True, "ShieldsUp": True, "pad": "x" * (2 << 20)}).encode()
    code, ctype, e = await raw_request(sock, "PATCH", PREFS, big)
    assert code == 413, e
    msg = _one_line_json_error(ctype, e, "prefs: ")
    assert "too large" in msg and str(1 << 20) in msg
    code, p = await localapi(sock, "GET", PREFS)
    assert code == 200 and p["ShieldsUp"] is False


@pytest.mark.asyncio
async def test_prefs_hostname_is_one_dns_label(agent: Agent) -> None:
    sock = agent.opts.socket
    for bad in ("h" * 64, "two words", "-x", "é" * 32, "a.b"):
        code, ctype, e = await raw_request(
            sock, "PATCH", PREFS, json.dumps({"HostnameSet": True, "Hostname": bad}).encode())
        assert code == 400, (bad, e)
        assert "DNS label" in _one_line_json_error(ctype, e, "prefs: Hostname: ")
    assert agent.backend.prefs.Hostname == ""
    code, p = await localapi(sock, "PATCH", PREFS, {"HostnameSet": True, "Hostname": "h" * 63})
    assert code == 200 and p["Hostname"] == "h" * 63
    assert agent.backend.state.prefs["Hostname"] == "h" * 63


CLIENT = textwrap.dedent("""
    import http.client, json, os, pwd, socket, sys
    pw = pwd.getpwnam(sys.argv[2])
    os.setgroups([]); os.setgid(pw.pw_gid); os.setuid(pw.pw_uid)
    class C(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])
    out = []
    for body in json.loads(sys.argv[3]):
        c = C("local-tailscaled.sock"); c.request("PATCH", "/localapi/v0/prefs", body=body)
        r = c.getresponse(); out.append([r.status, json.loads(r.read())])
    print(json.dumps(out))
""")


async def _as_user(sock: str, user: str, bodies: list[dict[str, Any]]) -> list[Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, sock, user, json.dumps([json.dumps(b) for b in bodies]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return list(json.loads(out))


@pytest.mark.asyncio
async def test_operator_cannot_hand_on_operator_rights(agent: Agent) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    sock = agent.opts.socket
    code, p = await localapi(sock, "PATCH", PREFS, {"OperatorUserSet": True,
                                                    "OperatorUser": "nobody"})
    assert code == 200 and p["OperatorUser"] == "nobody"
    res = await _as_user(sock, "nobody", [
        {"ShieldsUpSet": True, "ShieldsUp": True},  # the operator may write prefs ...
        {"OperatorUserSet": True, "OperatorUser": "root"},  # ... but not name another operator
        {"OperatorUserSet": True, "OperatorUser": ""},  # ... nor drop the operator
        {"OperatorUserSet": True, "OperatorUser": "daemon", "RunSSHSet": True, "RunSSH": True},
        {"OperatorUserSet": True, "OperatorUser": "nobody", "RunSSHSet": True, "RunSSH": True},
    ])
    assert res[0][0] == 200 and res[0][1]["ShieldsUp"] is True
    for code, e in res[1:4]:
        assert code == 403, e
        msg = e["error"]
        assert "OperatorUser" in msg and "access denied" in msg and "\n" not in msg
    assert res[4][0] == 200 and res[4][1]["RunSSH"] is True  # restating it changes nothing
    assert agent.backend.prefs.OperatorUser == "nobody"
    assert agent.backend.state.prefs["OperatorUser"] == "nobody"
    # Root (the agent's own user here) still may change it.
    code, p = await localapi(sock, "PATCH", PREFS, {"OperatorUserSet": True, "OperatorUser": ""})
    assert code == 200 and "OperatorUser" not in p  # omitted when empty, as Tailscale does
    res = await _as_user(sock, "nobody", [{"ShieldsUpSet": True, "ShieldsUp": False}])
    assert res[0][0] == 403  # no longer the operator


def _state_dir_with(d: str, edit: dict[str, Any]) -> str:
    """A state dir from a real first start, its prefs then edited as a hand (or a bug) might."""
    st = os.path.join(d, "st")
    sock = os.path.join(d, "first.sock")
    with agent_process(["--state-dir", st], sock) as proc:
        assert stop(proc) == 0
    raw = json.loads(state_file(st).read_text())
    raw["prefs"].update(edit)
    state_file(st).write_text(json.dumps(raw))
    os.chmod(state_file(st), 0o644)  # as a hand edit may leave it: the refusal is still one line
    return st


@pytest.mark.parametrize("edit", [{"WantRunning": "yes"}, {"Hostname": 5},
                                  {"AdvertiseRoutes": {"10.0.0.0/8": True}}])
def test_up_with_wrong_typed_state_is_one_line(edit: dict[str, Any]) -> None:
    d = public_tempdir()
    st = _state_dir_with(d, edit)
    before = state_file(st).read_bytes()
    r = run_cli("up", "--socket", os.path.join(d, "s.sock"), "--state-dir", st)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and str(state_file(st)) in r.stderr
    assert next(iter(edit)) in r.stderr
    assert state_file(st).read_bytes() == before


def test_up_repairs_stray_temp_files_and_loose_mode_with_one_line_each() -> None:
    d = public_tempdir()
    st = _state_dir_with(d, {})
    f = state_file(st)
    os.chmod(f, 0o644)
    stray = os.path.join(st, ".nodeagent.state.k3j9x_1")
    with open(stray, "w") as fh:
        fh.write('{"format": 1, "machine_')
    sock = os.path.join(d, "na.sock")
    with agent_process(["--state-dir", st], sock) as proc:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
        assert not os.path.exists(stray)
        assert run_cli("status", "--socket", sock).returncode == 0
        assert stop(proc) == 0
        err = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in err
    temp_lines = [ln for ln in err.splitlines() if ".nodeagent.state.k3j9x_1" in ln]
    mode_lines = [ln for ln in err.splitlines() if "0644" in ln]
    assert len(temp_lines) == 1 and st in temp_lines[0], err
    assert len(mode_lines) == 1 and str(f) in mode_lines[0] and "0600" in mode_lines[0], err


def test_up_hostname_option_checked() -> None:
    d = public_tempdir()
    st = os.path.join(d, "st")
    r = run_cli("up", "--socket", os.path.join(d, "s.sock"), "--state-dir", st,
                "--hostname", "not a label")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "--hostname" in r.stderr and "DNS label" in r.stderr
    assert not os.path.exists(st)
