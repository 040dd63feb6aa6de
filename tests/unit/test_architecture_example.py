"""The worked example feature in ARCHITECTURE.md, run as written against a real LocalAPI socket:
the docs cannot drift from the extension API without this test failing."""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Any

import pytest

from nodeagent.backend import LocalBackend
from nodeagent.c2n import C2NRequest
from nodeagent.ipnext import InstalledFeature
from nodeagent.localapi.server import LocalAPIServer
from nodeagent.tailcfg import NetworkMap, Node
from tests.agentutil import localapi

DOC = Path(__file__).resolve().parents[2] / "ARCHITECTURE.md"


def example_module() -> types.ModuleType:
    text = DOC.read_text()
    after = text[text.index("### Adding a feature: a worked example"):]
    code = re.search(r"```python\n(.*?)```", after, re.S)
    assert code is not None, "no python block after the worked-example heading"
    lines = code.group(1).count("\n")
    assert lines <= 45, f"the worked example grew to {lines} lines"
    mod = types.ModuleType("architecture_example")
    exec(compile(code.group(1), str(DOC), "exec"), mod.__dict__)
    return mod


@pytest.mark.asyncio
async def test_worked_example_feature(tmp_path: Any) -> None:
    mod = example_module()
    feature = InstalledFeature(mod.FEATURE, "docs", "0")
    be = LocalBackend(tmp_path / "state", features=[feature])
    be.start()
    server = LocalAPIServer(be, str(tmp_path / "na.sock"))
    await server.start()
    try:
        for addr in ("100.64.0.1/32", "100.64.0.2/32"):
            be.set_netmap(NetworkMap(SelfNode=Node(Addresses=[addr])))
        code, body = await localapi(server.path, "GET", "/localapi/v0/debug-selfchanges")
        assert (code, body) == (200, {"Total": 2})
        resp = await be.c2n.dispatch(C2NRequest("GET", "/debug/selfchanges"))
        assert resp.status == 200 and b'"Total": 2' in resp.body.replace(b'":2', b'": 2')
        code, text = await localapi(server.path, "GET", "/localapi/v0/metrics")
        assert code == 200 and "selfchanges_total 2.0" in text
    finally:
        await server.stop()
        be.shutdown()
    # The total was persisted through the Host's state keys.
    again = LocalBackend(tmp_path / "state", features=[InstalledFeature(mod.FEATURE, "docs", "0")])
    again.start()
    assert again.extensions.plugin("selfchanges").total == 2
