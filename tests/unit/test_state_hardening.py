"""State files the agent did not expect (wrong-typed values, crash leftovers, loose modes) and
prefs limits (Hostname a DNS label, OperatorUser kept from the operator): one line each, never a
traceback."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodeagent.backend import LocalBackend
from nodeagent.ipn.prefs import Prefs, PrefsError, PrefsPermissionError, apply_masked
from nodeagent.ipn.state import StateError, StateStore
from nodeagent.localapi.handlers import BodyError, parse_json_body


def _state_with(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A real state file from a first start, then edited as a hand (or a bug) might."""
    LocalBackend(tmp_path)
    f = tmp_path / "nodeagent.state"
    raw = json.loads(f.read_text())
    edit(raw)
    f.write_text(json.dumps(raw))
    return f


def _state_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nodeagent.state"]


def _set_pref(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw["prefs"].__setitem__(name, value)


@pytest.mark.parametrize(("edit", "needle"), [
    (_set_pref("WantRunning", "yes"), "WantRunning"),
    (_set_pref("Hostname", 5), "Hostname"),
    (_set_pref("AdvertiseTags", {"tag:x": True}), "AdvertiseTags"),
    (_set_pref("NetfilterMode", [1]), "NetfilterMode"),
    (_set_pref("ConnRejectMaxEntries", -1), "ConnRejectMaxEntries"),
    (lambda raw: raw["login"].__setitem__("server_keys", ["https://c.example"]), "server_keys"),
])
def test_wrong_typed_state_is_one_line_error(tmp_path: Path,
                                             edit: Callable[[dict[str, Any]], None],
                                             needle: str) -> None:
    f = _state_with(tmp_path, edit)
    before = f.read_bytes()
    with pytest.raises(StateError) as ei:
        LocalBackend(tmp_path)
    msg = str(ei.value)
    assert str(f) in msg and needle in msg and "\n" not in msg
    assert f.read_bytes() == before  # never silently replaced


@pytest.mark.parametrize("name", ["not a label", "a" * 64])
def test_old_state_with_a_non_label_hostname_still_starts(
        tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    # Earlier versions accepted any Hostname string: keep the identity, drop the name, say so.
    _state_with(tmp_path, _set_pref("Hostname", name))
    caplog.set_level(logging.WARNING, "nodeagent.state")
    b = LocalBackend(tmp_path)
    assert b.prefs.Hostname == ""
    lines = [r.getMessage() for r in _state_records(caplog) if "Hostname" in r.getMessage()]
    assert len(lines) == 1 and "OS hostname" in lines[0]


@pytest.mark.parametrize("content", [
    b'{"format": 1, "n": ' + b"1" * 5000 + b"}",
    b"[" * 400_000 + b"]" * 400_000,
], ids=["huge-int", "deep"])
def test_unreadable_json_in_state_is_one_line_error(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "nodeagent.state"
    f.write_bytes(content)
    os.chmod(f, 0o600)
    with pytest.raises(StateError) as ei:
        StateStore(tmp_path).load_or_create()
    msg = str(ei.value)
    assert str(f) in msg and "corrupt" in msg and "\n" not in msg
    assert f.read_bytes() == content


def test_stray_temp_files_removed_at_start(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    be = LocalBackend(tmp_path)
    for n in (".nodeagent.state.abc123", ".nodeagent.state.x_9"):
        (tmp_path / n).write_text('{"half": ')
    (tmp_path / ".nodeagent.state.dir").mkdir()  # not a temp file of ours: left alone
    (tmp_path / "other.file").write_text("keep")
    with caplog.at_level(logging.INFO, logger="nodeagent.state"):
        again = LocalBackend(tmp_path)
    assert again.node_public_key == be.node_public_key
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".nodeagent.state.dir", "nodeagent.state", "other.file"]
    lines = [r.getMessage() for r in _state_records(caplog)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert ".nodeagent.state.abc123" in lines[0] and str(tmp_path) in lines[0]


def test_no_log_line_without_stray_files(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    LocalBackend(tmp_path)
    with caplog.at_level(logging.INFO, logger="nodeagent.state"):
        LocalBackend(tmp_path)
    assert _state_records(caplog) == []


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o606, 0o777])
def test_loose_state_mode_tightened_with_one_warning(tmp_path: Path, mode: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    be = LocalBackend(tmp_path)
    f = tmp_path / "nodeagent.state"
    os.chmod(f, mode)
    with caplog.at_level(logging.INFO, logger="nodeagent.state"):
        again = LocalBackend(tmp_path)
    assert again.node_public_key == be.node_public_key
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    records = _state_records(caplog)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(records) == 1 and len(warnings) == 1
    line = warnings[0].getMessage()
    assert str(f) in line and f"{mode:04o}" in line and "0600" in line and "\n" not in line


@pytest.mark.parametrize("name", ["a" * 63, "web-1", "X", "0day", ""])
def test_hostname_dns_label_accepted(name: str) -> None:
    p = Prefs()
    apply_masked(p, {"HostnameSet": True, "Hostname": name})
    assert p.Hostname == name


@pytest.mark.parametrize("name", ["a" * 64, "é" * 32, "two words", "-lead", "trail-",
                                  "dot.ted", "under_score", "x" * 100_000, "nl\n"],
                         ids=lambda n: repr(n[:20]))
def test_hostname_not_a_label_refused(name: str) -> None:
    p = Prefs(Hostname="keep")
    with pytest.raises(PrefsError) as ei:
        apply_masked(p, {"HostnameSet": True, "Hostname": name, "ShieldsUpSet": True,
                         "ShieldsUp": True})
    msg = str(ei.value)
    assert msg.startswith("Hostname: ") and "\n" not in msg and len(msg) < 200
    assert p.Hostname == "keep" and p.ShieldsUp is False


def test_hostname_option_checked(tmp_path: Path) -> None:
    with pytest.raises(PrefsError, match="Hostname"):
        LocalBackend(tmp_path / "st", hostname="bad name")
    assert not (tmp_path / "st").exists()  # refused before any state is made


def test_refused_loose_state_file_is_one_line(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A file refused as corrupt is not also warned about (nor changed): one line in all."""
    f = _state_with(tmp_path, _set_pref("WantRunning", "yes"))
    os.chmod(f, 0o644)
    with caplog.at_level(logging.INFO, logger="nodeagent.state"), pytest.raises(StateError):
        LocalBackend(tmp_path)
    assert _state_records(caplog) == []
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644


def test_protected_field_refused_and_nothing_changed() -> None:
    p = Prefs(OperatorUser="alice")
    body = {"OperatorUserSet": True, "OperatorUser": "mallory", "ShieldsUpSet": True,
            "ShieldsUp": True}
    with pytest.raises(PrefsPermissionError, match="OperatorUser"):
        apply_masked(p, body, protected=("OperatorUser",))
    assert p.OperatorUser == "alice" and p.ShieldsUp is False
    # Restating the current value is no change, so it is allowed.
    changed = apply_masked(p, {**body, "OperatorUser": "alice"}, protected=("OperatorUser",))
    assert changed == ["ShieldsUp"] and p.OperatorUser == "alice"
    assert apply_masked(p, body) == ["OperatorUser"] and p.OperatorUser == "mallory"


def test_error_lines_about_values_stay_short() -> None:
    deep: list[Any] = []
    for _ in range(900):
        deep = [deep]
    for value in (deep, "y" * 1_000_000):
        with pytest.raises(PrefsError) as ei:
            apply_masked(Prefs(), {"ShieldsUpSet": True, "ShieldsUp": value})
        assert len(str(ei.value)) < 200


@pytest.mark.parametrize(("raw", "needle"), [
    (b"1" * 5000, "5000 digits"),
    (b'{"a": -' + b"9" * 65 + b"}", "65 digits"),
    (b"[" * 400_000 + b"]" * 400_000, "nested too deeply"),
    (b"\xff{}", "not UTF-8"),
    (b"{", "not JSON"),
], ids=["huge-int", "huge-negative-int", "deep", "not-utf8", "not-json"])
def test_json_body_limits_are_one_line(raw: bytes, needle: str) -> None:
    with pytest.raises(BodyError) as ei:
        parse_json_body(raw, "prefs")
    msg = str(ei.value)
    assert msg.startswith("prefs: ") and needle in msg and "\n" not in msg
