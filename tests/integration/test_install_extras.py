"""The README's wheelhouse commands, run as a user would from a clone: in a fresh venv they install
exactly the core and the one extra asked for, the features command shows it, and the "not
installed" answer for another feature is a pip command (not the bare extra, which no index has).

One venv; pip's cache is shared with the machine's, so only the first run downloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The README's commands (section "Installing from a wheelhouse"), with dist in a temp dir.
WHEEL_CMD = ["-m", "pip", "wheel", "--no-deps", "-w", "{dist}", ".", "./features/connreject",
             "./features/derper"]
INSTALL_CMD = ["-m", "pip", "install", "--find-links", "{dist}", "nodeagent[connreject]"]


def _run(argv: list[str], timeout: float = 420, **kw: object) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r.stdout


def test_readme_commands_match() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python3 " + " ".join(WHEEL_CMD).replace("{dist}", "dist") in readme
    install = " ".join(INSTALL_CMD[2:]).replace("{dist}", "dist").replace(
        "nodeagent[connreject]", "'nodeagent[connreject]'")
    assert install in readme


@pytest.mark.timeout(900)
def test_wheelhouse_installs_core_and_one_extra(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    fill = [a.replace("{dist}", str(dist)) for a in WHEEL_CMD]
    _run([sys.executable, *fill], cwd=ROOT)
    assert sorted(p.name.split("-")[0] for p in dist.glob("*.whl")) == [
        "nodeagent", "nodeagent_connreject", "nodeagent_derper"]
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    py = str(venv / "bin" / "python")
    _run([py, *[a.replace("{dist}", str(dist)) for a in INSTALL_CMD]], cwd=tmp_path)
    installed = {d["name"].lower().replace("_", "-")
                 for d in json.loads(_run([py, "-m", "pip", "list", "--format=json"]))}
    assert {"nodeagent", "nodeagent-connreject"} <= installed
    assert not installed & {"nodeagent-derper", "acme", "josepy"}, installed
    na = str(venv / "bin" / "nodeagent")
    features = _run([na, "features"], cwd=tmp_path)
    assert [ln.split("\t")[0] for ln in features.splitlines()] == ["connreject"]
    r = subprocess.run([na, "derper", "--dev"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "pip install --find-links " in r.stderr and "'nodeagent[derper]'" in r.stderr
