"""Network maps: store records + compiled policy → each node's netmap, and netmap deltas.

Owns what a node is told about itself and its peers (wire dicts in ``nodeagent.tailcfg`` shape)
and how a change is sent: a full map when anything but the peer list changed, otherwise a delta
of changed peers (full peer entries, keyed by ``ID``) and removed peer IDs. ``apply_delta`` is the
client's inverse. Dict keys on the wire are strings (msgpack decoders insist on it).
"""

from __future__ import annotations

import re
import time
import zlib
from typing import Any

from nodeagent.control.policy import Policy, PolicyNode
from nodeagent.control.store import NodeRecord
from nodeagent.tailcfg import NetworkMap, Node, node_from_wire

TAGGED_USER = "tagged-devices"
_LABEL_BAD = re.compile(r"[^a-z0-9-]+")


def dns_label(hostname: str) -> str:
    """A hostname → a DNS label (lowercase letters, digits, dashes; at most 63 characters)."""
    label = _LABEL_BAD.sub("-", hostname.lower().split(".")[0]).strip("-")[:63].strip("-")
    return label or "node"


def user_id(user: str) -> int:
    """A stable small integer for a user name (user names are the identity; IDs are cosmetic)."""
    return (zlib.crc32(user.encode()) & 0x7FFFFFFF) or 1


def policy_node(rec: NodeRecord) -> PolicyNode:
    return PolicyNode(rec.id, rec.name, rec.hostname, rec.user, tuple(rec.tags),
                      (rec.ipv4, rec.ipv6))


def node_wire(rec: NodeRecord, *, domain: str, online: bool, caps: dict[str, list[Any]],
              now: float) -> dict[str, Any]:
    addrs = [f"{rec.ipv4}/32", f"{rec.ipv6}/128"]
    return {
        "ID": rec.id,
        "StableID": f"n{rec.id}",
        "Name": f"{rec.name}.{domain}.",
        "HostName": rec.hostname,
        "User": user_id(TAGGED_USER if rec.tags else rec.user),
        "Key": "nodekey:" + rec.node_key,
        "KeyExpiry": rec.key_expiry,
        "Machine": "mkey:" + rec.machine_key,
        "DiscoKey": "discokey:" + rec.disco_key if rec.disco_key else "",
        "Addresses": addrs,
        "AllowedIPs": list(addrs),
        "PrimaryRoutes": [],
        "Endpoints": list(rec.endpoints),
        "HomeDERP": rec.home_derp,
        "OS": rec.os,
        "Created": rec.created,
        "LastSeen": rec.last_seen,
        "Online": online,
        "Expired": rec.expired(now),
        "Tags": list(rec.tags),
        "CapMap": caps,
    }


def build_netmaps(records: list[NodeRecord], policy: Policy, online: set[int], *,
                  domain: str, only: set[int] | None = None) -> dict[int, dict[str, Any]]:
    """Wire netmaps for every node id in ``only`` (default: all nodes)."""
    now = time.time()
    compiled = policy.compile(policy_node(r) for r in records)
    peers = {r.id: node_wire(r, domain=domain, online=r.id in online, caps={}, now=now)
             for r in records}
    profiles: dict[str, dict[str, Any]] = {}
    for r in records:
        u = TAGGED_USER if r.tags else r.user
        profiles[str(user_id(u))] = {"ID": user_id(u), "LoginName": u, "DisplayName": u,
                                     "ProfilePicURL": ""}
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if only is not None and r.id not in only:
            continue
        rules, caps = compiled[r.id]
        self_node = node_wire(r, domain=domain, online=r.id in online, caps=caps, now=now)
        out[r.id] = {
            "SelfNode": self_node,
            "Peers": [p for pid, p in peers.items() if pid != r.id],
            "PacketFilter": rules,
            "DERPMap": policy.derp_map_wire,
            "UserProfiles": profiles,
            "Domain": domain,
        }
    return out


def diff(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """The message that brings a node from ``old`` to ``new``; None when nothing changed."""
    if old is None or any(old.get(k) != v for k, v in new.items() if k != "Peers"):
        return {"Type": "netmap", "NetMap": new}
    before = {p["ID"]: p for p in old["Peers"]}
    after = {p["ID"]: p for p in new["Peers"]}
    changed = [p for pid, p in after.items() if before.get(pid) != p]
    removed = [pid for pid in before if pid not in after]
    if not changed and not removed:
        return None
    return {"Type": "delta", "PeersChanged": changed, "PeersRemoved": removed}


def apply_delta(nm: NetworkMap, changed: list[Node], removed: list[int]) -> NetworkMap:
    """A new NetworkMap with the delta applied (the input is left untouched)."""
    peers = {p.ID: p for p in nm.Peers}
    for pid in removed:
        peers.pop(pid, None)
    for p in changed:
        peers[p.ID] = p
    return NetworkMap(SelfNode=nm.SelfNode, Peers=[peers[k] for k in sorted(peers)],
                      PacketFilter=nm.PacketFilter, DERPMap=nm.DERPMap,
                      UserProfiles=nm.UserProfiles, Domain=nm.Domain)


def peers_from_wire(raw: list[Any]) -> list[Node]:
    """Delta peer entries → Nodes; raises tailcfg.WireError on bad shapes."""
    return [node_from_wire(p, f"delta.PeersChanged[{i}]") for i, p in enumerate(raw)]
