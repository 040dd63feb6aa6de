"""The ``nodeagent`` command as a user runs it: up, status, features, version, errors."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.agentutil import agent_process, public_tempdir, run_cli, state_file
from tests.conftest import feature_installed


def test_up_status_and_clean_shutdown() -> None:
    d = public_tempdir()
    sock = os.path.join(d, "na.sock")
    with agent_process(["--state-dir", os.path.join(d, "st")], sock) as proc:
        curl = subprocess.run(["curl", "-sf", "--unix-socket", sock,
                               "http://local-tailscaled.sock/localapi/v0/status"],
                              capture_output=True, text=True, timeout=10)
        assert curl.returncode == 0 and '"BackendState"' in curl.stdout
        st = run_cli("status", "--socket", sock)
        assert st.returncode == 0 and "NeedsLogin" in st.stdout
        js = run_cli("status", "--json", "--socket", sock)
        assert js.returncode == 0 and '"Self"' in js.stdout
        env = {**os.environ, "NODEAGENT_SOCKET": sock}
        assert run_cli("status", env=env).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert not os.path.exists(sock)
    mode = os.stat(state_file(os.path.join(d, "st"))).st_mode & 0o777
    assert mode == 0o600


def test_user_errors_are_one_line() -> None:
    d = public_tempdir()
    r = run_cli("status", "--socket", os.path.join(d, "missing.sock"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "nodeagent up" in r.stderr
    r = run_cli("status", "--bogus-flag")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "--bogus-flag" in r.stderr
    st = os.path.join(d, "st")
    os.makedirs(st)
    state_file(st).write_text("{corrupt")
    r = run_cli("up", "--socket", os.path.join(d, "s.sock"), "--state-dir", st)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and str(state_file(st)) in r.stderr
    assert state_file(st).read_text() == "{corrupt"


def test_second_agent_on_same_socket_refused() -> None:
    d = public_tempdir()
    sock = os.path.join(d, "na.sock")
    with agent_process(["--state-dir", os.path.join(d, "a")], sock):
        r = run_cli("up", "--socket", sock, "--state-dir", os.path.join(d, "b"))
        assert r.returncode == 1 and "already serving" in r.stderr
        assert "Traceback" not in r.stderr


def test_version_and_features() -> None:
    v = run_cli("version")
    assert v.returncode == 0 and "capability version 139" in v.stdout
    f = run_cli("features")
    assert f.returncode == 0
    names = {line.split("\t")[0] for line in f.stdout.splitlines()}
    expected = {n for n in ("connreject", "derper") if feature_installed(n)}
    assert names == expected


@pytest.mark.omitted("connreject")
def test_debug_rejects_cli_names_install_command() -> None:
    r = run_cli("debug", "rejects")
    assert r.returncode == 1 and "pip install 'nodeagent[connreject]'" in r.stderr
