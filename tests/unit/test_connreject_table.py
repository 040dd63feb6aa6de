"""The ``debug rejects`` table: rows aggregate several ports, so the port column says it is the
last one seen."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.feature("connreject")


def test_port_column_is_labelled_last_port() -> None:
    from nodeagent_connreject.cli import format_rejects

    ev = {"First": "2026-11-25T00:00:00Z", "Last": "2026-11-25T00:00:30Z", "Count": 2,
          "Direction": "outgoing", "Proto": 6, "Src": "100.64.0.1:5000",
          "Dst": "100.64.0.2:8443", "Reason": "acl", "Source": "tsmp_recv",
          "MaybeBroken": False}
    text = format_rejects({"Enabled": True, "Outgoing": [ev], "Incoming": []}, {}, 1.0e10)
    head, row = text.splitlines()[:2]
    col = head.index("LAST PORT")
    assert " PORT " not in head.replace("LAST PORT", "")
    assert row[col:].startswith("8443")
