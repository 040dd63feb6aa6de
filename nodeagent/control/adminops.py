"""Administrator operations of the coordination server: auth keys, node lookup, deletion (which
revokes the node key), expiry, c2n requests, and the admin view of a node.

Owns the semantics behind the admin API; ``ControlServer`` mixes this class in, and
``admin_routes`` exposes it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from nodeagent.control import proto
from nodeagent.control.store import AuthKeyRecord, NodeRecord

if TYPE_CHECKING:
    from nodeagent.control.policy import Policy, PolicyNode
    from nodeagent.control.server import ServerConfig, _Session
    from nodeagent.control.store import Store

AUTHKEY_PREFIX = "nakey-"
log = logging.getLogger("nodeagent.control.server")


class AdminError(Exception):
    """An admin request that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def hash_authkey(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class AdminOps:
    """Mixin for ControlServer; relies on its store, policy, sessions and config."""

    store: Store
    policy: Policy
    sessions: dict[int, _Session]
    cfg: ServerConfig
    _c2n_ids: itertools.count[int]

    def changed(self) -> None:
        raise NotImplementedError

    async def _push(self, s: _Session, nm: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def create_authkey(self, *, user: str = "admin", reusable: bool = False,
                       ephemeral: bool = False, tags: list[str] | None = None,
                       expiry: float = 90 * 86400.0) -> tuple[str, AuthKeyRecord]:
        tags = list(tags or [])
        for t in tags:
            if t not in self.policy.tag_owners:
                raise AdminError(400, f"{t!r} is not declared in the policy's tagOwners")
        secret = AUTHKEY_PREFIX + secrets.token_hex(24)
        now = time.time()
        rec = AuthKeyRecord(id=0, key_hash=hash_authkey(secret), prefix=secret[:14], user=user,
                            reusable=reusable, ephemeral=ephemeral, tags=tags, created=now,
                            expires=now + expiry if expiry else 0.0)
        return secret, self.store.add_authkey(rec)

    def find_node(self, sel: str) -> NodeRecord:
        nodes = self.store.list_nodes()
        hits = [n for n in nodes if sel in (str(n.id), f"n{n.id}", n.name, n.ipv4, n.ipv6,
                                            "nodekey:" + n.node_key)]
        if not hits:
            hits = [n for n in nodes if n.hostname == sel]
        if not hits:
            raise AdminError(404, f"no node {sel!r}")
        if len(hits) > 1:
            raise AdminError(409, f"{sel!r} matches several nodes "
                                  f"({', '.join(n.name for n in hits)}); use the ID")
        return hits[0]

    async def delete_node(self, sel: str) -> NodeRecord:
        """Delete a node; its node key is revoked for good (the machine may log in again with a
        new node key)."""
        rec = self.find_node(sel)
        self.store.revoke_node_key(rec.node_key, time.time())
        self.store.delete_node(rec.id)
        sess = self.sessions.get(rec.id)
        self.changed()
        if sess is not None:
            await self._push(sess, None)
        return rec

    def expire_node(self, sel: str) -> NodeRecord:
        rec = self.find_node(sel)
        rec.key_expiry = time.time()
        self.store.update_node(rec)
        self.changed()
        return rec

    async def c2n(self, sel: str, method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None,
                  timeout: float | None = None) -> tuple[int, dict[str, str], bytes]:
        rec = self.find_node(sel)
        sess = self.sessions.get(rec.id)
        if sess is None:
            seen = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.last_seen))
                    if rec.last_seen else "never")
            raise AdminError(409, f"node {rec.name} is offline (last seen {seen})")
        timeout = self.cfg.c2n_timeout if timeout is None else timeout
        cid = next(self._c2n_ids)
        fut: asyncio.Future[tuple[int, dict[str, str], bytes]] = (
            asyncio.get_running_loop().create_future())
        sess.pending[cid] = fut
        try:
            await sess.send(proto.msg("c2n", ID=cid, Method=method.upper(), Path=path,
                                      Headers=dict(headers or {}), Body=body))
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise AdminError(504, f"node {rec.name} did not answer within {timeout:g}s") from None
        except (ConnectionError, RuntimeError):
            raise AdminError(502, f"node {rec.name}: the stream broke while sending") from None
        finally:
            sess.pending.pop(cid, None)

    def policy_nodes(self) -> list[PolicyNode]:
        """Every node as the policy compiler sees it (for explanations)."""
        from nodeagent.control.mapper import policy_node

        return [policy_node(r) for r in self.store.list_nodes()]

    def policy_source(self) -> str:
        """How line references name the running policy: its file, or ``policy``."""
        return str(self.cfg.policy_path) if self.cfg.policy_path is not None else "policy"

    def explain_for_node(self, node_id: int, m: dict[str, Any]) -> dict[str, Any]:
        """Answer a node's ``explain`` request (``Result`` or ``Error`` fields): refused
        unless the node is the flow's source or destination."""
        from nodeagent.control.explain import answer_node_request

        return answer_node_request(self.policy, self.policy_nodes(), node_id, m["Src"],
                                   m["Dst"], m["Port"], m["Proto"], file=self.policy_source())

    async def answer_explain(self, sess: _Session, m: dict[str, Any]) -> None:
        """Reply to a node's ``explain`` request on its stream; a broken explanation is an
        ``Error`` reply, never the end of the stream."""
        try:
            reply = self.explain_for_node(sess.node_id, m)
        except Exception as e:  # a bug here must not cut the node off control
            log.exception("node %d: explain failed", sess.node_id)
            reply = {"Error": f"control could not explain this flow: {type(e).__name__}"}
        if "Error" in reply:
            log.info("node %d: explain %s -> %s:%s refused: %s", sess.node_id, m["Src"],
                     m["Dst"], m["Port"], reply["Error"])
        with contextlib.suppress(ConnectionError, RuntimeError):
            await sess.send(proto.msg("explain-result", ID=m["ID"], **reply))

    def node_json(self, rec: NodeRecord) -> dict[str, Any]:
        return {"ID": rec.id, "Name": rec.name, "HostName": rec.hostname, "User": rec.user,
                "Tags": rec.tags, "Addresses": [rec.ipv4, rec.ipv6],
                "NodeKey": "nodekey:" + rec.node_key, "MachineKey": "mkey:" + rec.machine_key,
                "Online": rec.id in self.sessions, "LastSeen": rec.last_seen,
                "Created": rec.created, "KeyExpiry": rec.key_expiry,
                "Expired": rec.expired(), "Ephemeral": rec.ephemeral,
                "Endpoints": rec.endpoints, "HomeDERP": rec.home_derp, "OS": rec.os}
