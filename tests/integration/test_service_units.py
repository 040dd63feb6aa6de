"""The systemd units in contrib/ pass ``systemd-analyze verify`` (with ExecStart= pointing at the
programs installed here, as an admin would point them), and the variables they, the example
environment file and the README's table name are the ones ``nodeagent up`` reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent.cli.up_options import UP_FLAGS

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"
UNITS = {"nodeagent.service": "nodeagent", "nodeagent-derper.service": "derper"}
EXTRA_VARS = {"NODEAGENT_SOCKET", "NODEAGENT_LOG"}  # read by every command, not only `up`


def test_units_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    copies = []
    for unit, program in UNITS.items():
        text = (CONTRIB / unit).read_text()
        assert f"ExecStart=/usr/local/bin/{program} " in text
        exe = shutil.which(program) or sys.executable  # derper may be absent (core env)
        copy = tmp_path / unit
        copy.write_text(text.replace(f"/usr/local/bin/{program}", exe))
        copies.append(str(copy))
    r = subprocess.run(["systemd-analyze", "verify", *copies], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr
    # The check is real: a mistyped hardening option is reported.
    bad = Path(copies[0])
    bad.write_text(bad.read_text().replace("ProtectSystem=strict", "ProtectSystem=strictt"))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True,
                       timeout=120)
    assert "ProtectSystem" in r.stderr or "strictt" in r.stderr


def test_units_are_hardened() -> None:
    agent = (CONTRIB / "nodeagent.service").read_text()
    for line in ("ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW", "StateDirectory=nodeagent",
                 "RuntimeDirectory=nodeagent", "EnvironmentFile=-/etc/default/nodeagent"):
        assert line in agent.splitlines(), line
    derper = (CONTRIB / "nodeagent-derper.service").read_text()
    for line in ("ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "DynamicUser=yes",
                 "StateDirectory=nodeagent-derper"):
        assert line in derper.splitlines(), line


def test_documented_variables_are_the_ones_read() -> None:
    read = {f.env for f in UP_FLAGS.values()} | EXTRA_VARS
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running as a service", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `(NODEAGENT_[A-Z_]+)`", section, re.M))
    assert table == read
    example = set(re.findall(r"^#?(NODEAGENT_[A-Z_]+)=", (CONTRIB / "nodeagent.default")
                             .read_text(), re.M))
    assert example == read
    unit = set(re.findall(r"(NODEAGENT_[A-Z_]+)=", (CONTRIB / "nodeagent.service").read_text()))
    assert unit <= read
