"""First-hour mistakes with the ``nodeagent`` command, each answered in one line (real processes):
a top-level ``--socket``, a busy WireGuard port, a socket directory the user may not create,
``NODEAGENT_*`` defaults of ``up``, a missing feature's command with flags, journald logging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agentutil import (
    agent_process,
    nodeagent_cmd,
    public_tempdir,
    run_cli,
    state_file,
    wait_for_socket,
)
from tests.netns import make_netns, run_in_netns, skip_unless_netns
from tests.procutil import stop


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("nodeagent: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_top_level_socket_flag_is_honoured() -> None:
    d = public_tempdir()
    missing = os.path.join(d, "missing.sock")
    line = _one_line(run_cli("--socket", missing, "status"))
    assert missing in line
    sock = os.path.join(d, "na.sock")
    with agent_process(["--state-dir", os.path.join(d, "st")], sock):
        for argv in (["--socket", sock, "status"], ["--socket", sock, "debug", "metrics"],
                     ["--socket", missing, "status", "--socket", sock]):  # the later one wins
            r = run_cli(*argv)
            assert r.returncode == 0, (argv, r.stderr)


def test_busy_wireguard_port_is_one_line() -> None:
    skip_unless_netns(tun=True)
    script = (
        "import json, socket, subprocess, sys\n"
        "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
        "s.bind(('::', 0))\n"
        "port = s.getsockname()[1]\n"
        "r = subprocess.run(sys.argv[1:] + ['--port', str(port)], capture_output=True,\n"
        "                   text=True, timeout=60)\n"
        "print(json.dumps([port, r.returncode, r.stderr]))\n")
    d = public_tempdir()
    with make_netns("nausab") as ns:
        r = run_in_netns(ns, [sys.executable, "-c", script, *nodeagent_cmd(), "up", "--socket",
                              os.path.join(d, "na.sock"), "--state-dir", os.path.join(d, "st"),
                              "--tun", "na0"], timeout=90)
        assert r.returncode == 0, r.stderr
        port, rc, stderr = json.loads(r.stdout)
        line = _one_line(subprocess.CompletedProcess([], rc, "", stderr))
        assert f"WireGuard UDP port {port}: Address already in use" in line
        assert "--port" in line
        links = run_in_netns(ns, ["ip", "-o", "link", "show"]).stdout
        assert "na0" not in links  # the TUN device made before the port failed is gone


def test_socket_directory_not_creatable_is_one_line() -> None:
    """As root without CAP_DAC_OVERRIDE (what a non-root user meets at /run/nodeagent): the
    directory of the socket belongs to someone else."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop capabilities")
    d = Path(public_tempdir())
    locked = d / "locked"
    locked.mkdir()
    os.chown(locked, 65534, 65534)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    for sock in (locked / "run" / "na.sock", locked / "na.sock"):
        r = subprocess.run([*drop, *nodeagent_cmd(), "up", "--socket", str(sock),
                            "--state-dir", str(d / "st")], capture_output=True, text=True,
                           timeout=60)
        line = _one_line(r)
        assert str(sock) in line and "Permission denied" in line and "--socket" in line


def test_up_takes_socket_and_state_dir_from_the_environment() -> None:
    d = public_tempdir()
    sock = os.path.join(d, "env.sock")
    st = os.path.join(d, "envstate")
    env = {**os.environ, "NODEAGENT_SOCKET": sock, "NODEAGENT_STATE_DIR": st,
           "NODEAGENT_PORT": "", "NODEAGENT_TUN": ""}
    with agent_process([], sock, env=env):  # agent_process passes --socket; the env the rest
        assert state_file(st).exists()
        assert run_cli("status", env=env).returncode == 0
    env["NODEAGENT_PORT"] = "forty"
    line = _one_line(run_cli("up", env=env))
    assert "NODEAGENT_PORT='forty'" in line


def test_missing_feature_command_with_flags_names_the_feature(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import nodeagent.cli.registry as registry
    from nodeagent.cli.main import main

    monkeypatch.setattr(registry, "discover", lambda: [])  # as if no feature were installed
    for argv in (["derper", "--dev"], ["derper", "-a", ":3340", "--stun=false"],
                 ["debug", "rejects", "--json"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "unrecognized arguments" not in err
        assert "is not installed; install it with: pip install " in err


def _agent_log(d: str, journal: bool) -> list[str]:
    """The stderr lines of an agent started and stopped, stderr a file (as journald's stream
    when ``journal``: JOURNAL_STREAM names the file's device and inode)."""
    sock = os.path.join(d, f"j{int(journal)}.sock")
    log = Path(d) / f"stderr{int(journal)}.log"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(log, "w") as f:
        if journal:
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([*nodeagent_cmd(), "up", "--socket", sock, "--state-dir",
                                 os.path.join(d, "st")], stdout=subprocess.DEVNULL, stderr=f,
                                env=env)
        try:
            wait_for_socket(sock, proc)
        finally:
            assert stop(proc) == 0
    return log.read_text().splitlines()


def test_logs_under_journald_have_no_timestamp_and_a_priority() -> None:
    d = public_tempdir()
    lines = _agent_log(d, journal=True)
    assert lines and all(re.match(r"<[2-7]>[a-z]", ln) for ln in lines), lines
    assert any(ln.startswith("<6>nodeagent: ") and "LocalAPI on" in ln for ln in lines), lines
    plain = _agent_log(d, journal=False)  # a file, not the journal: timestamps stay
    assert plain and all(re.match(r"\d{4}-\d\d-\d\d \d\d:", ln) for ln in plain), plain
