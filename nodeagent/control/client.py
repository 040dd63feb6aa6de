"""The node's control connection: registration, the map stream, endpoint reports and c2n.

Owns one node's conversation with a coordination server (protocol in ``nodeagent.control.proto``).
The agent supplies callbacks and never sees the wire:

    client = ControlClient(url, machine_key, node_key, hostname="a", state=persisted.login,
                           on_state_change=save)
    await client.register(auth_key)          # ControlFatalError on refusal (one-line message)
    await client.run(on_netmap, c2n_handler_from_router(router))   # until close()

``run`` keeps the stream alive, reconnecting with exponential backoff and jitter; it returns
after ``close()`` and raises :class:`ControlFatalError` only for problems that retrying cannot fix
(node deleted or expired, capability version refused, server key changed). ``on_netmap`` gets a
complete ``NetworkMap`` after every full map and every delta; it may be sync or async.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

from nodeagent.c2n import C2NRequest, C2NRouter
from nodeagent.control import mapper, proto
from nodeagent.keys import KeyPair
from nodeagent.tailcfg import NetworkMap, Node, node_from_wire
from nodeagent.version import CAPABILITY_VERSION

log = logging.getLogger("nodeagent.control.client")

C2NCallback = Callable[[str, str, bytes], Awaitable[tuple[int, dict[str, str], bytes]]]
NetmapCallback = Callable[[NetworkMap], Any]
StatusCallback = Callable[[str, str], Any]  # (state, detail): "connected"/"disconnected"


class ControlError(Exception):
    """A control problem; the message is one line. Retryable unless a ControlFatalError."""


class ControlFatalError(ControlError):
    """Retrying will not help: the user must act (new auth key, upgrade, re-pin...)."""


def c2n_handler_from_router(router: C2NRouter) -> C2NCallback:
    """Adapt the agent's c2n router to the client's ``(method, path, body)`` callback."""
    async def handle(method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        resp = await router.dispatch(C2NRequest(method, path, {}, body))
        return resp.status, dict(resp.headers), resp.body
    return handle


class ControlClient:
    def __init__(self, server_url: str, machine_key: KeyPair, node_key: KeyPair, *,
                 hostname: str, state: MutableMapping[str, Any] | None = None,
                 on_state_change: Callable[[], None] | None = None,
                 disco_key: bytes | None = None, os_name: str = "linux",
                 endpoints: list[str] | None = None,
                 capability_version: int = CAPABILITY_VERSION,
                 backoff_min: float = 0.25, backoff_max: float = 30.0,
                 request_timeout: float = 15.0) -> None:
        self.url = server_url.rstrip("/")
        self.machine_key = machine_key
        self.node_key = node_key
        self.hostname = hostname
        self.state: MutableMapping[str, Any] = state if state is not None else {}
        self._on_state_change = on_state_change
        self.disco_key = disco_key
        self.os_name = os_name
        self.capability_version = capability_version
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.timeout = request_timeout
        self._endpoints = list(endpoints or [])
        self._home_derp = 0
        self._dirty = asyncio.Event()
        self._closed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self.netmap: NetworkMap | None = None
        self.connected = False
        self._send: Callable[[dict[str, Any]], Awaitable[None]] | None = None  # while streaming
        self._explains: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._explain_ids = 0

    # --- public API ----------------------------------------------------------------------------
    def update_endpoints(self, endpoints: list[str]) -> None:
        """Report this node's endpoints (``ip:port``); sent now if connected, else on connect."""
        if list(endpoints) != self._endpoints:
            self._endpoints = list(endpoints)
            self._dirty.set()

    def set_home_derp(self, region: int) -> None:
        if region != self._home_derp:
            self._home_derp = region
            self._dirty.set()

    async def explain(self, src: str, dst: str, port: int, ip_proto: int,
                      timeout: float = 5.0) -> dict[str, Any]:
        """Ask control why its policy allows or denies a flow this node took part in (``src``
        and ``dst`` are IPs); the ``nodeagent.control.explain`` JSON. :class:`ControlError`
        (one line) when not connected, on timeout, or when control refuses."""
        send = self._send
        if send is None or not self.connected:
            raise ControlError("not connected to control")
        self._explain_ids += 1
        rid = self._explain_ids
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._explains[rid] = fut
        try:
            await send(proto.msg("explain", ID=rid, Src=src, Dst=dst, Port=int(port),
                                 Proto=int(ip_proto)))
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ControlError(f"control did not answer within {timeout:g}s") from None
        except (ConnectionError, RuntimeError):
            raise ControlError("the control stream broke while asking") from None
        finally:
            self._explains.pop(rid, None)
        if reply.get("Error") is not None:
            raise ControlError(f"control refused: {reply['Error']}")
        result = reply.get("Result")
        if not isinstance(result, dict):
            raise ControlError("control sent an explanation without a result")
        return result

    async def close(self) -> None:
        self._closed.set()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def register(self, auth_key: str = "") -> Node:
        """Log this machine in (a no-op for an already registered, unexpired node key)."""
        chan = await self._channel()
        req_id = os.urandom(16)
        m = proto.msg("register", NodeKey=self.node_key.public, AuthKey=auth_key,
                      Hostname=self.hostname, OS=self.os_name, DiscoKey=self.disco_key,
                      ReqID=req_id)
        body = proto.encode_envelope(self.capability_version, self.machine_key.public,
                                     chan.seal(m))
        try:
            async with self._session().post(self._u("/machine/register"), data=body) as r:
                data = await r.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ControlError(f"cannot reach control server {self.url}: {_why(e)}") from None
        try:
            reply = proto.check_message(chan.open(proto.decode_reply(data)),
                                        frozenset(("register-ok",)))
            if reply["ReqID"] != req_id:
                raise proto.ProtoError("registration reply answers another request")
            return node_from_wire(reply["Node"])
        except proto.ServerError as e:
            raise ControlFatalError(f"control server refused registration: {e}") from None
        except (proto.ProtoError, ValueError) as e:
            raise ControlError(f"bad registration reply from {self.url}: {e}") from None

    async def run(self, on_netmap: NetmapCallback, c2n_handler: C2NCallback | None = None, *,
                  on_status: StatusCallback | None = None) -> None:
        try:
            await self._run(on_netmap, c2n_handler, on_status)
        finally:  # also when the caller cancels run() instead of calling close()
            if self._http is not None:
                await self._http.close()
                self._http = None

    async def _run(self, on_netmap: NetmapCallback, c2n_handler: C2NCallback | None,
                   on_status: StatusCallback | None) -> None:
        attempt = 0
        while not self._closed.is_set():
            got_map = asyncio.Event()
            try:
                await self._stream(on_netmap, c2n_handler, got_map, on_status)
                reason = "stream closed by the server"
            except ControlFatalError:
                self._set_connected(False, "fatal", on_status)
                raise
            except (ControlError, proto.ProtoError) as e:
                reason = str(e)
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                reason = f"cannot reach {self.url}: {_why(e)}"
            self._set_connected(False, reason, on_status)
            if self._closed.is_set():
                return
            attempt = 0 if got_map.is_set() else attempt + 1
            delay = min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 16))
            delay *= random.uniform(0.5, 1.0)  # jitter: nodes must not reconnect in lockstep
            log.info("control stream down (%s); retrying in %.2fs", reason, delay)
            try:
                await asyncio.wait_for(self._closed.wait(), delay)
            except TimeoutError:
                pass

    # --- internals -----------------------------------------------------------------------------
    def _u(self, path: str) -> str:
        return f"{self.url}{path}?v={self.capability_version}"

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout,
                                              sock_read=None))
        return self._http

    def _set_connected(self, up: bool, detail: str, cb: StatusCallback | None) -> None:
        if up != self.connected:
            self.connected = up
            if cb is not None:
                cb("connected" if up else "disconnected", detail)

    async def _server_key(self) -> bytes:
        """The pinned server key; fetched and pinned on first use, checked every time."""
        try:
            async with self._session().get(self._u("/key"),
                                           timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                data = await r.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ControlError(f"cannot reach control server {self.url}: {_why(e)}") from None
        try:
            key = proto.decode_key_reply(data)
        except proto.ServerError as e:
            raise ControlFatalError(f"control server {self.url}: {e}") from None
        except proto.ProtoError as e:
            raise ControlError(f"bad key reply from {self.url}: {e}") from None
        self._check_pin(key)
        return key

    def _check_pin(self, key: bytes) -> None:
        pins = self.state.setdefault("server_keys", {})
        pinned = pins.get(self.url)
        if pinned is None:
            pins[self.url] = key.hex()
            if self._on_state_change is not None:
                self._on_state_change()
        elif pinned != key.hex():
            raise ControlFatalError(
                f"control server {self.url} presented key {key.hex()[:16]}…, but "
                f"{pinned[:16]}… is pinned; if the server was reinstalled, remove the pin "
                "from the node's state and log in again")

    async def _channel(self) -> proto.Channel:
        return proto.Channel(self.machine_key.private, await self._server_key(), server=False)

    async def _stream(self, on_netmap: NetmapCallback, c2n_handler: C2NCallback | None,
                      got_map: asyncio.Event, on_status: StatusCallback | None) -> None:
        chan = await self._channel()
        ws_url = self._u("/machine/map")
        async with self._session().ws_connect(ws_url, max_msg_size=proto.MAX_MESSAGE,
                                              timeout=aiohttp.ClientWSTimeout(
                                                  ws_close=self.timeout)) as ws:
            hello = await ws.receive(timeout=self.timeout)
            if hello.type != aiohttp.WSMsgType.BINARY:
                raise ControlError("control server closed the stream before its hello")
            try:
                challenge, skey = proto.decode_hello(hello.data)
            except proto.ServerError as e:
                raise ControlFatalError(f"control server {self.url}: {e}") from None
            self._check_pin(skey)
            self._dirty.clear()
            first = proto.msg("map", NodeKey=self.node_key.public, Challenge=challenge,
                              Hostname=self.hostname, OS=self.os_name,
                              Endpoints=list(self._endpoints), HomeDERP=self._home_derp,
                              DiscoKey=self.disco_key)
            await ws.send_bytes(proto.encode_envelope(self.capability_version,
                                                      self.machine_key.public, chan.seal(first)))
            lock = asyncio.Lock()

            async def send(m: dict[str, Any]) -> None:
                async with lock:  # sequence numbers follow sending order
                    await ws.send_bytes(chan.seal(m))

            keepalive = 60.0
            self._send = send
            loop = asyncio.get_running_loop()
            sender = loop.create_task(self._sender(send, keepalive))
            tasks: set[asyncio.Task[None]] = set()
            closer = asyncio.get_running_loop().create_task(self._closed.wait())
            try:
                while True:
                    recv = asyncio.ensure_future(ws.receive(timeout=keepalive * 2.5))
                    done, _ = await asyncio.wait({recv, closer},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if closer in done:
                        recv.cancel()
                        return
                    frame = recv.result()
                    if frame.type != aiohttp.WSMsgType.BINARY:
                        return
                    m = self._open(chan, frame.data)
                    t = m["Type"]
                    if t == "netmap":
                        ka = max(0.05, float(m["KeepAlive"]))
                        if ka != keepalive:  # the sender may be waiting on the old interval
                            keepalive = ka
                            sender.cancel()
                            sender = loop.create_task(self._sender(send, keepalive))
                        self.netmap = proto.decode_netmap(m["NetMap"])
                        self._set_connected(True, "", on_status)
                        got_map.set()
                        await _call(on_netmap, self.netmap)
                    elif t == "delta" and self.netmap is not None:
                        try:
                            changed = mapper.peers_from_wire(m["PeersChanged"])
                        except ValueError as e:
                            raise proto.ProtoError(f"bad delta: {e}") from None
                        self.netmap = mapper.apply_delta(self.netmap, changed,
                                                         m["PeersRemoved"])
                        await _call(on_netmap, self.netmap)
                    elif t == "c2n":
                        task = asyncio.get_running_loop().create_task(
                            self._c2n(m, c2n_handler, send))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    elif t == "explain-result":
                        fut = self._explains.get(m["ID"])
                        if fut is not None and not fut.done():
                            fut.set_result(m)
                    elif t == "error":
                        cls = ControlFatalError if m["Fatal"] else ControlError
                        raise cls(f"control server: {m['Error']}")
            finally:
                self._send = None
                for fut in self._explains.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("control stream closed"))
                closer.cancel()
                sender.cancel()
                for task in tasks:
                    task.cancel()

    def _open(self, chan: proto.Channel, data: bytes) -> dict[str, Any]:
        try:
            return proto.check_message(chan.open(data), proto.SERVER_TYPES)
        except proto.ProtoError:
            # A plaintext error can only come before authentication; show it if it is one.
            try:
                proto.decode_reply(data)
            except proto.ServerError as e:
                raise ControlFatalError(f"control server {self.url}: {e}") from None
            except proto.ProtoError:
                pass
            raise

    async def _sender(self, send: Callable[[dict[str, Any]], Awaitable[None]],
                      interval: float) -> None:
        try:
            while True:
                try:
                    await asyncio.wait_for(self._dirty.wait(), interval)
                except TimeoutError:
                    await send(proto.msg("keepalive"))
                    continue
                self._dirty.clear()
                await send(proto.msg("update", Endpoints=list(self._endpoints),
                                     HomeDERP=self._home_derp))
        except (ConnectionError, RuntimeError) as e:
            log.debug("control sender stopped: %s", e)

    async def _c2n(self, m: dict[str, Any], handler: C2NCallback | None,
                   send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if handler is None:
            status, headers, body = 501, {}, b'{"error": "this node serves no c2n requests"}'
        else:
            try:
                status, headers, body = await handler(m["Method"], m["Path"], m["Body"])
            except Exception as e:  # the answer must come back even when a handler breaks
                log.exception("c2n %s %s failed", m["Method"], m["Path"])
                status, headers, body = 500, {}, f"c2n handler failed: {e}".encode()
        try:
            await send(proto.msg("c2n-response", ID=m["ID"], Status=int(status),
                                 Headers=dict(headers), Body=bytes(body)))
        except (ConnectionError, RuntimeError) as e:
            log.info("c2n response lost: %s", e)


async def _call(cb: Callable[[Any], Any], arg: Any) -> None:
    try:
        r = cb(arg)
        if inspect.isawaitable(r):
            await r
    except Exception:  # a broken consumer must not tear down the control stream
        log.exception("netmap callback failed")


def _why(e: BaseException) -> str:
    s = str(e) or type(e).__name__
    return s.splitlines()[0][:200]
