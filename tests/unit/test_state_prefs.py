"""Persisted state (atomic, 0600, clear errors on corruption) and masked prefs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nodeagent.backend import LocalBackend
from nodeagent.ipn.prefs import Prefs, PrefsError, apply_masked
from nodeagent.ipn.state import StateError, StateStore


def test_state_created_0600_and_identity_stable(tmp_path: Path) -> None:
    a = LocalBackend(tmp_path)
    mode = stat.S_IMODE(os.stat(tmp_path / "nodeagent.state").st_mode)
    assert mode == 0o600
    b = LocalBackend(tmp_path)
    assert a.node_public_key == b.node_public_key
    assert a.node_public_key.startswith("nodekey:") and len(a.node_public_key) == 8 + 64
    assert a.state.machine_key != a.state.node_key


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"format": 1}',
                                     b'{"format":1,"machine_key":"zz","node_key":"00","disco_key":"00"}'])
def test_corrupt_state_is_one_line_error_naming_file(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "nodeagent.state"
    f.write_bytes(content)
    with pytest.raises(StateError) as ei:
        StateStore(tmp_path).load_or_create()
    msg = str(ei.value)
    assert str(f) in msg and "\n" not in msg
    assert f.read_bytes() == content  # never silently replaced


def test_save_is_atomic_no_temp_left(tmp_path: Path) -> None:
    be = LocalBackend(tmp_path)
    be.edit_prefs({"ShieldsUpSet": True, "ShieldsUp": True})
    assert [p.name for p in tmp_path.iterdir()] == ["nodeagent.state"]
    assert LocalBackend(tmp_path).prefs.ShieldsUp is True


def test_masked_prefs() -> None:
    p = Prefs()
    changed = apply_masked(p, {"WantRunningSet": True, "WantRunning": False, "ShieldsUp": True,
                               "Hostname": "x"})
    assert changed == ["WantRunning"] and p.ShieldsUp is False and p.Hostname == ""
    with pytest.raises(PrefsError, match="ShieldsUp"):
        apply_masked(p, {"ShieldsUpSet": True, "ShieldsUp": "yes"})
    with pytest.raises(PrefsError, match="AdvertiseTags"):
        apply_masked(p, {"AdvertiseTagsSet": True, "AdvertiseTags": [1]})
    with pytest.raises(PrefsError):
        apply_masked(p, ["not", "an", "object"])
    # A bad field anywhere in the body changes nothing.
    with pytest.raises(PrefsError):
        apply_masked(p, {"WantRunningSet": True, "WantRunning": True, "NetfilterModeSet": True,
                         "NetfilterMode": "x"})
    assert p.WantRunning is False
    assert "Config" in p.to_json(None)
