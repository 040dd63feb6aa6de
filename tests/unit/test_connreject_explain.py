"""The node's plain sentences per rejection reason (nodeagent_connreject.explain)."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.feature("connreject")

NOW = 1_000_000.0
OK = {"Name": "beta", "Online": True, "HasDiscoKey": True, "HomeDERP": 900, "SelfHomeDERP": 900,
      "InEngine": True, "LastHandshake": NOW - 30, "CurAddr": "", "Active": True}


def test_peer_unreachable_names_the_failed_facts() -> None:
    from nodeagent_connreject.explain import path_sentence

    st: dict[str, Any] = {**OK, "HomeDERP": 0, "Online": False, "LastHandshake": 0.0}
    s = path_sentence("peer-unreachable", "100.64.0.2", 22, st, NOW)
    assert s.startswith("No working path to beta: beta has no home DERP region and no direct "
                        "address; beta is not connected to control; no WireGuard handshake")
    assert s.endswith("Check `nodeagent netcheck` and `nodeagent ping beta`.")
    assert "no longer" not in path_sentence("peer-unreachable", "100.64.0.2", 22, OK, NOW)
    assert path_sentence("peer-unreachable", "100.64.0.9", 22, None, NOW) == \
        "No node in the netmap owns 100.64.0.9 now."


def test_timeout_says_what_pendopen_saw() -> None:
    from nodeagent_connreject.explain import path_sentence

    s = path_sentence("timeout", "100.64.0.2", 5432, OK, NOW)
    assert "no answer within 5 s" in s and "last handshake 30s ago" in s and "port 5432" in s


def test_acl_sentences() -> None:
    from nodeagent_connreject.explain import acl_sentence

    assert acl_sentence("outgoing", {"Allowed": False, "Sentence": "Denied: x."}) == "Denied: x."
    assert "allows it now" in acl_sentence("incoming", {"Allowed": True})
    assert acl_sentence("outgoing", None, "not connected to control") == (
        "The tailnet policy refused it at the peer's filter; control could not be asked why "
        "(not connected to control).")


def test_split_endpoint() -> None:
    from nodeagent_connreject.explain import split_endpoint

    assert split_endpoint("100.64.0.1:22") == ("100.64.0.1", 22)
    assert split_endpoint("[fd7a::1]:443") == ("fd7a::1", 443)
    assert split_endpoint("") == ("", 0)
