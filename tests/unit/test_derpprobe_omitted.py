"""Without the derper feature, ``nodeagent derpprobe`` names the install command (one line)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.omitted("derper")
def test_derpprobe_without_the_feature_names_the_install_command() -> None:
    r = subprocess.run([sys.executable, "-m", "nodeagent.cli.main", "derpprobe", "--once",
                        "--derp-map", "local"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "needs a feature that is not installed" in r.stderr and "derper" in r.stderr
    assert "install it with: pip install " in r.stderr
