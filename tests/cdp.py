"""Headless Chromium driven over the Chrome DevTools Protocol (aiohttp websocket), for tests that
need a real browser executing a page's JavaScript: navigate, evaluate, wait for a DOM condition,
click, screenshot. ``CHROMIUM`` is None when the Debian package ``chromium`` is absent.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.procutil import stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(AssertionError):
    pass


class Browser:
    """One headless Chromium with one page, controlled through a flattened CDP session."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.session = ""
        self.console: list[str] = []

    async def start(self, width: int = 1300, height: int = 700) -> None:
        assert CHROMIUM is not None
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-proxy-server", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while True:
            text = port_file.read_text() if port_file.exists() else ""
            if text.count("\n") >= 1:
                break
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise CDPError("chromium did not open its DevTools port in 60 s")
            await asyncio.sleep(0.1)
        port, path = text.split("\n")[:2]
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())
        target = await self.call("Target.createTarget", url="about:blank", session=False)
        att = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True,
                              session=False)
        self.session = att["sessionId"]
        await self.call("Page.enable")
        await self.call("Runtime.enable")

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description")))
                                             for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"])[:500])
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(CDPError("the DevTools connection closed"))

    async def call(self, method: str, *, session: bool = True, timeout: float = 30,
                   **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        i = next(self._ids)
        msg: dict[str, Any] = {"id": i, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        await self._ws.send_str(json.dumps(msg))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise CDPError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", 30, "page load")

    async def eval(self, expr: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise CDPError(f"{expr!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, expr: str, timeout: float, what: str) -> Any:
        """Evaluate ``expr`` every 50 ms until it is truthy; CDPError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            v = await self.eval(expr)
            if v:
                return v
            if time.monotonic() > deadline:
                raise CDPError(f"timed out after {timeout}s waiting for {what}; "
                               f"console: {self.console[-5:]}")
            await asyncio.sleep(0.05)

    async def screenshot(self, path: Path) -> Path:
        r = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if self._http is not None:
            await self._http.close()
        stop(self.proc)
