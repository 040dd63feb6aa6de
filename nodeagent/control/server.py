"""The coordination server: registration, map streams, policy, c2n (aiohttp).

Owns the server process's state in memory (open map sessions, the active policy) on top of a
``Store``, and the node-facing HTTP/WebSocket endpoints described in ``nodeagent.control.proto``.
Admin operations live in ``adminops`` (a mixin), their HTTP API in ``admin_routes``; the
registration rules (auth keys, revoked keys, unique names) in ``registration``.

Everything a node says about itself is checked by ``validate`` before it is stored or sent to
peers (HTTP 400, or a fatal ``error`` on the map stream, naming the field). A registration is
refused when it was already seen (``replay.NonceCache``, in memory, for the timestamp window),
when it is dated too far from the server's clock, or when it names the revoked node key of a
deleted node (kept in the store); every refusal is one line to the client and one log line.

State dir layout: ``control.db`` (SQLite, 0600; the server key is a setting in it),
``admin-token`` (0600) and ``control-url`` (where the running server listens, for the CLI).

Policy source: the ``--policy`` file when one is given (re-read on SIGHUP / ``reload_policy``),
else the last policy set through the admin API, else allow-all. ``set_policy`` stores the text in
the database; a restart with ``--policy`` goes back to the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from nacl.public import PrivateKey

from nodeagent.control import mapper, proto, validate
from nodeagent.control.adminops import AdminError, AdminOps
from nodeagent.control.policy import DEFAULT_POLICY_TEXT, Policy, PolicyError, parse_policy
from nodeagent.control.registration import register
from nodeagent.control.replay import NonceCache
from nodeagent.control.store import SQLiteStore, Store
from nodeagent.netguard import raise_nofile_limit, request_timeout, throttle_accept_errors

log = logging.getLogger("nodeagent.control.server")

DEFAULT_DOMAIN = "nodeagent.internal"


@dataclass
class ServerConfig:
    state_dir: Path
    policy_path: Path | None = None
    domain: str = DEFAULT_DOMAIN
    key_expiry: float = 180 * 86400.0  # seconds; 0 = node keys never expire
    keepalive: float = 15.0
    c2n_timeout: float = 10.0
    ephemeral_grace: float = 30.0  # an offline ephemeral node is deleted after this long
    handshake_timeout: float = 10.0


@dataclass(eq=False)
class _Session:
    node_id: int
    ws: web.WebSocketResponse
    chan: proto.Channel
    last_sent: dict[str, Any] | None = None
    pending: dict[int, asyncio.Future[tuple[int, dict[str, str], bytes]]] = field(
        default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, message: dict[str, Any]) -> None:
        # Sequence numbers are assigned at sealing, so sealing and sending must not interleave.
        async with self.lock:
            await self.ws.send_bytes(self.chan.seal(message))


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)


class ControlServer(AdminOps):
    def __init__(self, cfg: ServerConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.store: Store = store or SQLiteStore(cfg.state_dir / "control.db")
        key_hex = self.store.get_setting("server_key")
        if key_hex is None:
            key_hex = bytes(PrivateKey.generate()).hex()
            self.store.set_setting("server_key", key_hex)
        self._server_private = bytes.fromhex(key_hex)
        self.server_public = bytes(PrivateKey(self._server_private).public_key)
        tok_path = cfg.state_dir / "admin-token"
        if tok_path.exists():
            self.admin_token = tok_path.read_text().strip()
        else:
            # Hex, so the token never starts with "-" (argparse would take it for a flag).
            self.admin_token = secrets.token_hex(32)
            _write_secret(tok_path, self.admin_token)
        self.policy = self._initial_policy()
        self.sessions: dict[int, _Session] = {}
        self._c2n_ids = itertools.count(1)
        self._dirty = False
        self._broadcast_task: asyncio.Task[None] | None = None
        self._ephemeral: dict[int, asyncio.TimerHandle] = {}
        self._nonces = NonceCache(proto.MAX_CLOCK_SKEW)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.app = self._make_app()

    # --- policy --------------------------------------------------------------------------------
    def _initial_policy(self) -> Policy:
        if self.cfg.policy_path is not None:
            return self._read_policy_file()
        stored = self.store.get_setting("policy")
        return parse_policy(stored if stored is not None else DEFAULT_POLICY_TEXT)

    def _read_policy_file(self) -> Policy:
        path = self.cfg.policy_path
        assert path is not None
        try:
            text = path.read_text()
        except OSError as e:
            raise PolicyError(f"cannot read policy file {path}: {e.strerror}") from None
        try:
            pol = parse_policy(text)
        except PolicyError as e:
            raise PolicyError(f"{path}:{e}") from None
        for w in pol.warnings:
            log.warning("policy %s:%s", path, w)
        return pol

    def reload_policy(self) -> None:
        """Re-read the ``--policy`` file; a bad file raises and the running policy stays."""
        if self.cfg.policy_path is None:
            return
        self.policy = self._read_policy_file()
        self.changed()

    def set_policy(self, text: str) -> list[str]:
        """Install ``text``; its warnings (``line:column: what``) are returned."""
        pol = parse_policy(text)  # raises PolicyError; nothing changes then
        self.store.set_setting("policy", text)
        self.policy = pol
        self.changed()
        return pol.warnings

    # --- lifecycle -----------------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        from nodeagent.control import admin_routes

        app = web.Application(client_max_size=proto.MAX_MESSAGE)
        app.router.add_get("/key", self._h_key)
        app.router.add_post("/machine/register", self._h_register)
        app.router.add_get("/machine/map", self._h_map)
        admin_routes.add_routes(app, self)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # Strangers reach this port: idle sockets must not pile up (request deadline), the fd
        # limit is the hard one, and accept failures are logged once per interval.
        raise_nofile_limit()
        throttle_accept_errors(asyncio.get_running_loop(), log)
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     keepalive_timeout=request_timeout())
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sock_host, sock_port = server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
        shown = f"[{sock_host}]" if ":" in sock_host else sock_host
        self.url = f"http://{shown}:{sock_port}"
        (self.cfg.state_dir / "control-url").write_text(self.url + "\n")
        log.info("control server listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        for h in self._ephemeral.values():
            h.cancel()
        for s in list(self.sessions.values()):
            await s.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._broadcast_task is not None:
            self._broadcast_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._broadcast_task
        self.store.close()

    # --- change propagation --------------------------------------------------------------------
    def changed(self) -> None:
        """Something netmaps depend on changed: recompute and send to every open stream."""
        self._dirty = True
        if self._broadcast_task is None or self._broadcast_task.done():
            self._broadcast_task = asyncio.get_running_loop().create_task(self._broadcast())

    async def _broadcast(self) -> None:
        while self._dirty:
            self._dirty = False
            if not self.sessions:
                return
            maps = mapper.build_netmaps(self.store.list_nodes(), self.policy,
                                        set(self.sessions), domain=self.cfg.domain,
                                        only=set(self.sessions))
            await asyncio.gather(*(self._push(s, maps.get(nid))
                                   for nid, s in list(self.sessions.items())))

    async def _push(self, s: _Session, nm: dict[str, Any] | None) -> None:
        if nm is None:  # the node was deleted under an open stream
            with contextlib.suppress(Exception):
                await s.send(proto.msg("error", Error="this node was deleted from the tailnet",
                                       Fatal=True))
            await s.ws.close()
            return
        m = mapper.diff(s.last_sent, nm)
        if m is None:
            return
        if m["Type"] == "netmap":
            m["KeepAlive"] = self.cfg.keepalive
        try:
            await s.send(m)
            s.last_sent = nm
        except (ConnectionError, RuntimeError) as e:
            log.info("node %d: send failed: %s", s.node_id, e)

    # --- node endpoints ------------------------------------------------------------------------
    @staticmethod
    def _err(status: int, text: str) -> web.Response:
        return web.Response(status=status, body=proto.encode_error(text),
                            content_type="application/msgpack")

    async def _h_key(self, req: web.Request) -> web.Response:
        problem = proto.version_problem(_query_version(req))
        if problem:
            return self._err(400, problem)
        return web.Response(body=proto.pack({"PublicKey": self.server_public,
                                             "MinCapabilityVersion": proto.MIN_CAPABILITY_VERSION}),
                            content_type="application/msgpack")

    async def _h_register(self, req: web.Request) -> web.Response:
        problem = proto.version_problem(_query_version(req))
        if problem:
            return self._refuse_register(req, None, 400, problem)
        mkey: bytes | None = None
        try:
            env = proto.decode_envelope(await req.read())
            mkey = env.machine_key
            chan = proto.Channel(self._server_private, env.machine_key, server=True)
            r = chan.open_request(env.sealed)
            # Authentic and fresh: this exact request is now used, whatever becomes of it.
            replayed = self._nonces.admit(proto.replay_key(env.machine_key, r.nonce), r.stamp)
            if replayed:
                raise proto.ProtoError(replayed)
            m = validate.check_node_fields(proto.check_message(r.message,
                                                               frozenset(("register",))))
        except proto.ProtoError as e:
            return self._refuse_register(req, mkey, 400, str(e))
        try:
            rec = register(self.store, env.machine_key.hex(), m,
                           key_expiry=self.cfg.key_expiry, now=time.time())
        except AdminError as e:
            return self._refuse_register(req, mkey, e.status, str(e))
        if rec.ephemeral and rec.id not in self.sessions:
            self._schedule_ephemeral_drop(rec.id)  # also goes if it never connects
        self.changed()
        nm = mapper.node_wire(rec, domain=self.cfg.domain, online=rec.id in self.sessions,
                              caps={}, now=time.time())
        body = chan.seal(proto.msg("register-ok", ReqID=m["ReqID"], Node=nm))
        return web.Response(body=proto.pack({"Sealed": body}),
                            content_type="application/msgpack")

    def _refuse_register(self, req: web.Request, mkey: bytes | None, status: int,
                         text: str) -> web.Response:
        who = ("mkey:" + mkey.hex()[:16] + "…") if mkey is not None else "unknown machine"
        log.warning("registration from %s (%s) refused: %s", who, req.remote, text)
        return self._err(status, text)

    async def _h_map(self, req: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=proto.MAX_MESSAGE)
        await ws.prepare(req)
        problem = proto.version_problem(_query_version(req))
        if problem:
            await ws.send_bytes(proto.encode_error(problem))
            await ws.close()
            return ws
        challenge = proto.new_challenge()
        await ws.send_bytes(proto.encode_hello(challenge, self.server_public))
        sess = None
        try:
            sess = await self._map_handshake(ws, challenge)
            if sess is not None:
                await self._map_loop(sess)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if sess is not None:
                self._session_ended(sess)
            await ws.close()
        return ws

    async def _map_handshake(self, ws: web.WebSocketResponse,
                             challenge: bytes) -> _Session | None:
        try:
            first = await ws.receive(timeout=self.cfg.handshake_timeout)
        except TimeoutError:
            return None
        if first.type != WSMsgType.BINARY:
            return None
        try:
            env = proto.decode_envelope(first.data)
            chan = proto.Channel(self._server_private, env.machine_key, server=True)
            m = proto.check_message(chan.open(env.sealed), frozenset(("map",)))
            if m["Challenge"] != challenge:
                raise proto.ProtoError("map request does not answer this stream's challenge")
        except proto.ProtoError as e:
            await ws.send_bytes(proto.encode_error(str(e)))
            return None
        try:
            validate.check_node_fields(m)
        except validate.FieldError as e:
            log.warning("map request from mkey:%s… refused: %s", env.machine_key.hex()[:16], e)
            await ws.send_bytes(chan.seal(proto.msg("error", Error=str(e), Fatal=True)))
            return None
        rec = self.store.node_by_machine(env.machine_key.hex())
        problem = None
        if rec is None:
            problem = "this machine is not registered (log in with an auth key)"
        elif rec.node_key != m["NodeKey"].hex():
            problem = "this node key is not registered to this machine (log in again)"
        elif rec.expired():
            problem = "node key expired: log in again with an auth key"
        if problem or rec is None:
            await ws.send_bytes(chan.seal(proto.msg("error", Error=problem, Fatal=True)))
            return None
        handle = self._ephemeral.pop(rec.id, None)
        if handle is not None:
            handle.cancel()
        old = self.sessions.get(rec.id)
        sess = _Session(rec.id, ws, chan)
        self.sessions[rec.id] = sess
        if old is not None:
            await old.ws.close()
        rec.hostname = m["Hostname"] or rec.hostname
        rec.os, rec.endpoints, rec.home_derp = m["OS"], list(m["Endpoints"]), m["HomeDERP"]
        if m.get("DiscoKey"):
            rec.disco_key = m["DiscoKey"].hex()
        rec.last_seen = time.time()
        self.store.update_node(rec)
        nm = mapper.build_netmaps(self.store.list_nodes(), self.policy, set(self.sessions),
                                  domain=self.cfg.domain, only={rec.id}).get(rec.id)
        if nm is not None:
            await self._push(sess, nm)
        self.changed()
        return sess

    async def _map_loop(self, sess: _Session) -> None:
        ka = asyncio.get_running_loop().create_task(self._keepalives(sess))
        try:
            while True:
                frame = await sess.ws.receive(timeout=self.cfg.keepalive * 3)
                if frame.type != WSMsgType.BINARY:
                    return
                try:
                    m = proto.check_message(sess.chan.open(frame.data), proto.CLIENT_TYPES)
                except proto.ProtoError as e:
                    log.info("node %d: dropping stream: %s", sess.node_id, e)
                    return
                try:
                    validate.check_node_fields(m)
                except validate.FieldError as e:
                    if m["Type"] == "c2n-response":  # the admin waiting for it hears why
                        self._c2n_failed(sess, m["ID"], str(e))
                        continue
                    log.warning("node %d: refused %s, closing its stream: %s", sess.node_id,
                                m["Type"], e)
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await sess.send(proto.msg("error", Error=str(e), Fatal=True))
                    return
                if m["Type"] == "explain":
                    await self.answer_explain(sess, m)
                    continue
                self._on_client_message(sess, m)
        except TimeoutError:
            log.info("node %d: stream silent for too long", sess.node_id)
        finally:
            ka.cancel()

    def _on_client_message(self, sess: _Session, m: dict[str, Any]) -> None:
        t = m["Type"]
        if t == "c2n-response":
            fut = sess.pending.get(m["ID"])
            if fut is not None and not fut.done():
                headers = {str(k): str(v) for k, v in m["Headers"].items()}
                fut.set_result((m["Status"], headers, m["Body"]))
        elif t == "update":
            rec = self.store.get_node(sess.node_id)
            if rec is None:
                return
            if m.get("Endpoints") is not None:
                rec.endpoints = list(m["Endpoints"])
            if m.get("HomeDERP") is not None:
                rec.home_derp = m["HomeDERP"]
            self.store.update_node(rec)
            self.changed()

    def _c2n_failed(self, sess: _Session, cid: int, why: str) -> None:
        log.warning("node %d: bad c2n response: %s", sess.node_id, why)
        fut = sess.pending.get(cid)
        if fut is not None and not fut.done():
            fut.set_exception(AdminError(502, f"the node's c2n response was refused: {why}"))

    async def _keepalives(self, sess: _Session) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not sess.ws.closed:
                await asyncio.sleep(self.cfg.keepalive)
                await sess.send(proto.msg("keepalive"))

    def _session_ended(self, sess: _Session) -> None:
        for fut in sess.pending.values():
            if not fut.done():
                fut.set_exception(AdminError(502, "the node went offline before answering"))
        if self.sessions.get(sess.node_id) is not sess:
            return  # replaced by a newer stream of the same node
        del self.sessions[sess.node_id]
        rec = self.store.get_node(sess.node_id)
        if rec is not None:
            rec.last_seen = time.time()
            self.store.update_node(rec)
            if rec.ephemeral:
                self._schedule_ephemeral_drop(rec.id)
        self.changed()

    def _schedule_ephemeral_drop(self, node_id: int) -> None:
        old = self._ephemeral.pop(node_id, None)
        if old is not None:
            old.cancel()
        self._ephemeral[node_id] = asyncio.get_running_loop().call_later(
            self.cfg.ephemeral_grace, self._drop_ephemeral, node_id)

    def _drop_ephemeral(self, node_id: int) -> None:
        self._ephemeral.pop(node_id, None)
        if node_id not in self.sessions and self.store.get_node(node_id) is not None:
            log.info("deleting offline ephemeral node %d", node_id)
            self.store.delete_node(node_id)
            self.changed()


def _query_version(req: web.Request) -> int | None:
    v = req.query.get("v", "")
    return int(v) if v.isdecimal() and v.isascii() and len(v) < 10 else None
