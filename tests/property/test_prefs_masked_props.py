"""Property tests of the masked-prefs parser (LocalAPI ``PATCH prefs``, ``check-prefs``, ``start``):
any JSON body either applies or raises :class:`PrefsError` with one line, and a refused body
changes nothing; the GET rendering always has Tailscale's keys."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.ipn.prefs import (
    TAILSCALE_ONLY,
    Prefs,
    PrefsError,
    apply_masked,
    masked_from_full,
    persist_json,
)

NAMES = [*Prefs.__dataclass_fields__, *TAILSCALE_ONLY, "Config", "Bogus"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=3),
    max_leaves=8)
keys = st.sampled_from(NAMES) | st.sampled_from([n + "Set" for n in NAMES]) | st.text(max_size=12)
bodies = st.dictionaries(keys, json_values | st.booleans(), max_size=8) | json_values


def _apply(p: Prefs, body: Any) -> None:
    before = copy.deepcopy(p)
    try:
        apply_masked(p, body)
    except PrefsError as e:
        assert "\n" not in str(e)
        assert p == before  # a refused body changes nothing


@given(bodies)
def test_masked_body_applies_or_refuses_in_one_line(body: Any) -> None:
    _apply(Prefs(), body)


@given(bodies)
def test_full_prefs_body_applies_or_refuses_in_one_line(body: Any) -> None:
    _apply(Prefs(), masked_from_full(body))


@given(st.dictionaries(st.sampled_from(["NodeID", "UserProfile", "x"]), json_values, max_size=3))
def test_rendering_keeps_tailscale_keys(login: dict[str, Any]) -> None:
    d = Prefs().to_json(persist_json(login))
    assert {"ControlURL", "WantRunning", "AutoUpdate", "AllowSingleHosts", "Config"} <= set(d)
    assert d["Config"] is None or set(d["Config"]["PrivateNodeKey"][8:]) == {"0"}
