"""Registration of a node in the store: what ``POST /machine/register`` does once the request
is authentic, fresh and its fields valid (the store is its only I/O).

Owns the rules: a node key revoked with its deleted node, or registered to another machine, is
refused (403); a machine already registered with this unexpired node key needs no auth key;
otherwise an auth key is needed that exists and is not revoked, expired or (single-use) already
used (401). A new node gets a DNS name unique in the tailnet from its hostname and its tailnet
addresses from the store; its node key expires ``key_expiry`` seconds after registration (never
for tagged nodes, or when ``key_expiry`` is 0).
"""

from __future__ import annotations

import logging
from typing import Any

from nodeagent.control import mapper
from nodeagent.control.adminops import AdminError, hash_authkey
from nodeagent.control.store import AuthKeyRecord, NodeRecord, Store

# The server's logger: registrations belong to its log (and its log level).
log = logging.getLogger("nodeagent.control.server")


def register(store: Store, mkey: str, m: dict[str, Any], *, key_expiry: float,
             now: float) -> NodeRecord:
    """Register machine ``mkey`` (hex) with the checked ``register`` message ``m``: the node's
    record, new or updated; :class:`AdminError` (403/401) when refused."""
    nkey = m["NodeKey"].hex()
    if store.node_key_revoked(nkey):
        raise AdminError(403, "this node key was revoked when its node was deleted; log in "
                              "again with a new node key")
    mine = store.node_by_machine(mkey)
    other = store.node_by_node_key(nkey)
    if other is not None and other.machine_key != mkey:
        raise AdminError(403, "this node key is registered to another machine")
    if mine is not None and mine.node_key == nkey and not mine.expired(now):
        return mine  # already registered: no auth key needed, none consumed
    auth = m["AuthKey"]
    if not auth:
        if mine is not None and mine.expired(now):
            raise AdminError(401, "node key expired: log in again with an auth key")
        raise AdminError(401, "this machine is not registered: an auth key is needed")
    key = check_authkey(store, auth, now)
    disco = (m.get("DiscoKey") or b"").hex()
    expiry = 0.0 if key.tags or not key_expiry else now + key_expiry
    if mine is None:
        v4, v6 = store.addresses_for(mkey)
        rec = NodeRecord(id=0, machine_key=mkey, node_key=nkey,
                         name=unique_name(store, m["Hostname"], None),
                         hostname=m["Hostname"], user=key.user, ipv4=v4, ipv6=v6,
                         disco_key=disco, tags=list(key.tags), created=now,
                         key_expiry=expiry, ephemeral=key.ephemeral, os=m["OS"])
        rec = store.add_node(rec)
    else:
        rec = mine
        rec.node_key, rec.user, rec.tags = nkey, key.user, list(key.tags)
        rec.key_expiry, rec.ephemeral, rec.os = expiry, key.ephemeral, m["OS"]
        rec.disco_key = disco or rec.disco_key
        if m["Hostname"] != rec.hostname:
            rec.hostname = m["Hostname"]
            rec.name = unique_name(store, m["Hostname"], rec.id)
        store.update_node(rec)
    key.used += 1
    store.update_authkey(key)
    log.info("registered node %d %s (%s) for %s", rec.id, rec.name, rec.ipv4, key.user)
    return rec


def check_authkey(store: Store, secret: str, now: float) -> AuthKeyRecord:
    """The auth key whose secret is ``secret``, if usable at ``now``; else :class:`AdminError`
    401 saying why."""
    key = store.authkey_by_hash(hash_authkey(secret))
    if key is None:
        raise AdminError(401, "invalid auth key")
    if key.revoked:
        raise AdminError(401, "auth key has been revoked")
    if key.expires and key.expires <= now:
        raise AdminError(401, "auth key has expired")
    if not key.reusable and key.used:
        raise AdminError(401, "auth key was already used (create a --reusable one "
                              "for several nodes)")
    return key


def unique_name(store: Store, hostname: str, own_id: int | None) -> str:
    """A DNS label from ``hostname`` that no other node (than ``own_id``) has: ``-1``, ``-2``,
    ... appended as needed."""
    base = mapper.dns_label(hostname)
    taken = {n.name for n in store.list_nodes() if n.id != own_id}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name
