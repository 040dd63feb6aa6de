"""The soak benchmark in its short form (≤ 60 s): a real derper under clients, churn, slowloris
and garbage must end with RSS within bound and nothing left over (``benchmarks/soak.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.feature("derper")

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def test_short_soak() -> None:
    r = subprocess.run([sys.executable, str(SOAK), "--duration", "30", "--clients", "500"],
                       capture_output=True, text=True, timeout=150)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "left over after every client closed: 0 DERP connections" in r.stdout
