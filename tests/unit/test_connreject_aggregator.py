"""The connreject Aggregator: keys, merging, LRU order and eviction, gate, JSON shape."""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import pytest

pytestmark = pytest.mark.feature("connreject")


@pytest.fixture
def mod() -> Any:
    import nodeagent_connreject.aggregator as m

    return m


def ev(mod: Any, direction: str = "outgoing", dst: str = "100.64.0.2:22",
       src: str = "100.64.0.1:5000", reason: str = "acl", proto: int = 6, source: str = "tsmp_recv",
       maybe_broken: bool = False, t: int = 0) -> Any:
    return mod.Event(direction, proto, src, dst, reason, source, maybe_broken, Last=t)


def test_starts_disabled_and_drops(mod: Any) -> None:
    a = mod.Aggregator()
    assert a.enabled is False
    a.note(ev(mod))
    assert a.outgoing() == [] and a.dropped_disabled == 1
    assert a.set_enabled(True) is False
    assert a.set_enabled(True) is True


def test_repeat_merges_count_and_refreshes_fields(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod, src="100.64.0.1:1000", t=10))
    a.note(ev(mod, src="100.64.0.1:2000", dst="100.64.0.2:22", source="pendopen_timeout",
              maybe_broken=True, t=20))
    (e,) = a.outgoing()
    assert (e.First, e.Last, e.Count) == (10, 20, 2)
    assert e.Src == "100.64.0.1:2000" and e.Source == "pendopen_timeout" and e.MaybeBroken


def test_ports_not_in_key_but_reason_and_proto_are(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod, dst="100.64.0.2:22"))
    a.note(ev(mod, dst="100.64.0.2:80"))
    a.note(ev(mod, dst="100.64.0.2:22", reason="shields"))
    a.note(ev(mod, dst="100.64.0.2:22", proto=17))
    assert [e.Count for e in a.outgoing()] == [2, 1, 1]


def test_incoming_keyed_on_source_address(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod, "incoming", src="[fd7a:115c:a1e0::1]:40000", dst="[fd7a:115c:a1e0::2]:22"))
    a.note(ev(mod, "incoming", src="[fd7a:115c:a1e0::1]:40001", dst="[fd7a:115c:a1e0::2]:23"))
    a.note(ev(mod, "incoming", src="[fd7a:115c:a1e0::3]:40001", dst="[fd7a:115c:a1e0::2]:22"))
    assert [e.Count for e in a.incoming()] == [2, 1]
    assert a.outgoing() == []


def test_unknown_direction_dropped(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod, direction=""))
    a.note(ev(mod, direction="sideways"))
    assert a.outgoing() == [] and a.incoming() == [] and a.dropped_bad == 2


def test_lru_order_and_eviction_per_direction(mod: Any) -> None:
    a = mod.Aggregator(max_entries=3)
    a.set_enabled(True)
    for i in range(1, 5):
        a.note(ev(mod, dst=f"100.64.0.{i}:22"))
    assert [e.Dst for e in a.outgoing()] == ["100.64.0.2:22", "100.64.0.3:22", "100.64.0.4:22"]
    a.note(ev(mod, dst="100.64.0.2:22"))  # a repeat becomes most recent
    a.note(ev(mod, dst="100.64.0.5:22"))  # evicts 0.3, the least recent now
    assert [e.Dst for e in a.outgoing()] == ["100.64.0.4:22", "100.64.0.2:22", "100.64.0.5:22"]
    a.note(ev(mod, "incoming", src="100.64.0.9:1"))  # the other direction has its own buffer
    assert len(a.outgoing()) == 3 and len(a.incoming()) == 1
    assert a.evicted == 2


def test_max_entries_zero_disables_recording(mod: Any) -> None:
    a = mod.Aggregator(max_entries=0)
    a.set_enabled(True)
    a.note(ev(mod))
    assert a.outgoing() == []


def test_disabling_clears_and_response_empty(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod))
    a.note(ev(mod, "incoming"))
    a.set_enabled(False)
    assert a.response() == {"Enabled": False, "Outgoing": [], "Incoming": []}
    a.set_enabled(True)
    assert a.outgoing() == [] and a.incoming() == []


def test_json_field_names_and_formats(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod, t=1_777_927_729_123_456_789))
    a.note(ev(mod, "incoming", src="[fd7a:115c:a1e0::1]:5", dst="[fd7a:115c:a1e0::2]:22",
              source="tsmp_sent", t=1_777_927_730_000_000_000))
    body = json.loads(json.dumps(a.response()))
    assert list(body) == ["Enabled", "Outgoing", "Incoming"] and body["Enabled"] is True
    out = body["Outgoing"][0]
    assert set(out) == {"First", "Last", "Count", "Direction", "Proto", "Src", "Dst", "Reason",
                        "Source", "MaybeBroken"}
    assert out["First"] == "2026-05-04T20:48:49.123456789Z"
    assert out["Proto"] == 6 and isinstance(out["Proto"], int)
    assert out["Count"] == 1 and out["MaybeBroken"] is False
    inc = body["Incoming"][0]
    assert inc["First"] == "2026-05-04T20:48:50Z"
    assert inc["Src"] == "[fd7a:115c:a1e0::1]:5" and inc["Source"] == "tsmp_sent"


def test_now_filled_in_when_unset(mod: Any) -> None:
    a = mod.Aggregator()
    a.set_enabled(True)
    a.note(ev(mod))
    (e,) = a.response()["Outgoing"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", e["Last"])
    assert e["First"] == e["Last"]


def test_threads_and_loop_can_note_concurrently(mod: Any) -> None:
    a = mod.Aggregator(max_entries=16)
    a.set_enabled(True)

    def worker(k: int) -> None:
        for i in range(2000):
            a.note(ev(mod, dst=f"100.64.{k}.{i % 20}:22"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = a.outgoing()
    assert len(events) == 16
    assert sum(a.noted.values()) == 8000


def test_default_max_entries_mobile(mod: Any) -> None:
    assert mod.default_max_entries("linux") == 256
    assert mod.default_max_entries("android") == 32
    assert mod.default_max_entries("ios") == 32
