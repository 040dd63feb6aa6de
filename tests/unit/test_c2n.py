"""The c2n router: dispatch, 404/405, uninstalled-feature 404, handler failures."""

from __future__ import annotations

import json

import pytest

from nodeagent.c2n import C2NRequest, C2NResponse, C2NRouter
from nodeagent.ipnext.known import KNOWN_FEATURES


@pytest.mark.asyncio
async def test_dispatch_and_errors() -> None:
    r = C2NRouter()

    async def echo(req: C2NRequest) -> C2NResponse:
        return C2NResponse.json({"path": req.route_path, "q": req.query, "body": req.body.decode()})

    async def boom(req: C2NRequest) -> C2NResponse:
        raise RuntimeError("kaput")

    r.add("GET", "/echo", echo)
    r.add("POST", "/boom", boom)
    with pytest.raises(ValueError):
        r.add("GET", "/echo", echo)
    resp = await r.dispatch(C2NRequest("GET", "/echo?a=1", body=b"hi"))
    assert resp.status == 200 and json.loads(resp.body) == {"path": "/echo", "q": {"a": ["1"]},
                                                             "body": "hi"}
    resp = await r.dispatch(C2NRequest("POST", "/echo"))
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    resp = await r.dispatch(C2NRequest("GET", "/nope"))
    assert resp.status == 404 and "/nope" in json.loads(resp.body)["error"]
    resp = await r.dispatch(C2NRequest("POST", "/boom"))
    assert resp.status == 500 and "kaput" in json.loads(resp.body)["error"]
    assert r.routes() == [("GET", "/echo"), ("POST", "/boom")]


@pytest.mark.asyncio
async def test_uninstalled_feature_route_names_feature() -> None:
    resp = await C2NRouter().dispatch(C2NRequest("GET", "/debug/rejects"))
    body = json.loads(resp.body)
    assert resp.status == 404 and body["feature"] == "connreject"
    install = KNOWN_FEATURES["connreject"].install  # the command fits this install
    assert install.startswith("pip install ") and body["error"].endswith(install)
    assert body["install"] == install
