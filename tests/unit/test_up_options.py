"""``nodeagent up``'s flags and their NODEAGENT_* environment defaults: flags win, empty variables
are unset, bad values are one line naming the flag or variable, and what Tailscale does with
``--login-server`` without a scheme (nothing: refused) and ``--auth-key`` (needs a server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.agent import AgentOptions
from nodeagent.cli import core_commands
from nodeagent.cli.main import build_parser
from nodeagent.cli.registry import CLIError, CLIRegistry
from nodeagent.cli.up_options import UP_FLAGS, up_options


def _opts(argv: list[str]) -> AgentOptions:
    reg = CLIRegistry()
    core_commands.register(reg)
    args = build_parser(reg).parse_args(["up", *argv])
    return up_options(args, "/tmp/x.sock")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for f in UP_FLAGS.values():
        monkeypatch.delenv(f.env, raising=False)


def test_defaults_without_flags_or_env() -> None:
    o = _opts([])
    assert (o.state_dir, o.port, o.tun, o.login_server, o.auth_key, o.hostname) == (
        "/var/lib/nodeagent", 41641, None, None, None, None)


def test_env_supplies_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEAGENT_STATE_DIR", "/srv/na")
    monkeypatch.setenv("NODEAGENT_PORT", "41700")
    monkeypatch.setenv("NODEAGENT_TUN", "na9")
    monkeypatch.setenv("NODEAGENT_HOSTNAME", "envhost")
    monkeypatch.setenv("NODEAGENT_LOGIN_SERVER", "http://127.0.0.1:8080")
    monkeypatch.setenv("NODEAGENT_AUTH_KEY", "envkey")
    o = _opts([])
    assert (o.state_dir, o.port, o.tun, o.hostname, o.login_server, o.auth_key) == (
        "/srv/na", 41700, "na9", "envhost", "http://127.0.0.1:8080", "envkey")
    o = _opts(["--state-dir", "/d", "--port", "0", "--tun", "t0", "--hostname", "flaghost",
               "--login-server", "https://c.example", "--auth-key", "flagkey"])
    assert (o.state_dir, o.port, o.tun, o.hostname, o.login_server, o.auth_key) == (
        "/d", 0, "t0", "flaghost", "https://c.example", "flagkey")


def test_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for f in UP_FLAGS.values():
        monkeypatch.setenv(f.env, "")
    o = _opts([])
    assert (o.state_dir, o.port, o.tun) == ("/var/lib/nodeagent", 41641, None)


@pytest.mark.parametrize("env,value,expect", [
    ("NODEAGENT_PORT", "abc", "NODEAGENT_PORT='abc': not a port number"),
    ("NODEAGENT_PORT", "70000", "NODEAGENT_PORT 70000: must be 0..65535"),
    ("NODEAGENT_HOSTNAME", "not a label", "NODEAGENT_HOSTNAME"),
    ("NODEAGENT_LOGIN_SERVER", "10.0.0.1:8080", "did you mean http://10.0.0.1:8080?"),
    ("NODEAGENT_NETMAP_FILE", "/x.json", "NODEAGENT_NETMAP_FILE needs --tun NAME"),
    ("NODEAGENT_AUTH_KEY", "k", "NODEAGENT_AUTH_KEY needs --login-server URL"),
])
def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, env: str,
                                          value: str, expect: str) -> None:
    monkeypatch.setenv(env, value)
    if env == "NODEAGENT_LOGIN_SERVER":
        monkeypatch.setenv("NODEAGENT_TUN", "na0")
    with pytest.raises(CLIError) as ei:
        _opts([])
    msg = str(ei.value)
    assert expect in msg and "\n" not in msg


@pytest.mark.parametrize("url", ["10.0.0.1:8080", "control.example.com", "ftp://c.example",
                                 "http://", "http://h:99999"])
def test_login_server_needs_an_http_url(url: str) -> None:
    with pytest.raises(CLIError) as ei:
        _opts(["--tun", "na0", "--login-server", url])
    assert str(ei.value).startswith(f"--login-server {url!r}: ")


def test_auth_key_without_login_server_is_refused() -> None:
    with pytest.raises(CLIError, match=r"^--auth-key needs --login-server URL"):
        _opts(["--auth-key", "k"])
    with pytest.raises(CLIError, match=r"^--auth-key needs --login-server URL"):
        _opts(["--tun", "na0", "--netmap-file", "/x.json", "--auth-key", "k"])


def test_auth_key_from_file(tmp_path: Path) -> None:
    key = tmp_path / "authkey"
    key.write_text("secret-key\n")
    o = _opts(["--tun", "na0", "--login-server", "http://c:1", "--auth-key", f"file:{key}"])
    assert o.auth_key == "secret-key"
    with pytest.raises(CLIError, match="cannot read"):
        _opts(["--tun", "na0", "--login-server", "http://c:1", "--auth-key",
               f"file:{tmp_path / 'missing'}"])
