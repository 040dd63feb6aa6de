"""derpprobe's parsers of network bytes never raise anything but their own error: the DERP map
(fetched over HTTPS or the LocalAPI) and the peer's DER certificate."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.feature("derper")

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["Regions", "Nodes", "RegionID", "HostName", "DERPPort", "1", "900",
                         "InsecureForTests", "STUNPort", "HomeParams", "x"]), kids, max_size=4),
    max_leaves=20)


def _parse(data: bytes) -> None:
    from nodeagent_derper.derpprobe.mapload import MapError, parse_derp_map

    try:
        dm = parse_derp_map(data, "test")
    except MapError as e:
        assert "\n" not in str(e)
        return
    assert dm.Regions


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_as_a_map(data: bytes) -> None:
    _parse(data)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_random_json_as_a_map(obj: Any) -> None:
    _parse(json.dumps(obj).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_as_a_certificate(data: bytes) -> None:
    from nodeagent_derper.derpprobe.probes import CertError, cert_days_left

    try:
        cert_days_left(data)
    except CertError:
        pass
