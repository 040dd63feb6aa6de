"""Rendering of ``GET /localapi/v0/status`` in Tailscale's ipnstate.Status shape: its field
names and order, ``omitempty`` fields only when set, and the fields of features nodeagent does
not have (PeerAPI, Taildrop, peer relays, cert domains) at their "none" values."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from nodeagent.keys import NODE_PREFIX, parse_public
from nodeagent.tailcfg import Node
from nodeagent.version import __version__

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend

ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(ts: float | None) -> str:
    """Unix seconds → RFC 3339 UTC with nanosecond digits trimmed as Go does; 0/None → zero time."""
    if not ts:
        return ZERO_TIME
    t = dt.datetime.fromtimestamp(ts, tz=dt.UTC)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{t.microsecond:06d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def relay_code(backend: LocalBackend, region: int) -> str:
    """The DERP map's code for ``region`` ("" when unknown or 0)."""
    nm = backend.netmap
    if not region or nm is None or nm.DERPMap is None:
        return ""
    r = nm.DERPMap.Regions.get(region)
    return r.RegionCode if r else ""


def _path_status(backend: LocalBackend, key: str) -> dict[str, Any] | None:
    """magicsock's view of a peer (CurAddr, Active, LastWrite), or None when it has none."""
    paths = backend.paths
    if paths is None:
        return None
    try:
        raw = parse_public(key, NODE_PREFIX)
    except ValueError:
        return None
    return paths.peer_status(raw)


def peer_status(backend: LocalBackend, n: Node, *, is_self: bool = False) -> dict[str, Any]:
    stats = backend.peer_stats(n.Key) if not is_self else {}
    # A peer whose paths magicsock chooses is Active when we *sent* to it (data or a user's
    # ping) within 45 s, as Tailscale reports it: not when the engine last received from it.
    in_magicsock = False
    if not is_self and (ps := _path_status(backend, n.Key)) is not None:
        stats = {**stats, **ps}
        in_magicsock = True
    out: dict[str, Any] = {
        "ID": n.StableID or (str(n.ID) if n.ID else ""),
        "PublicKey": n.Key,
        "HostName": n.HostName,
        "DNSName": n.Name,
        "OS": n.OS or ("linux" if is_self else ""),
        "UserID": n.User,
        "TailscaleIPs": n.tailscale_ips(),
        "AllowedIPs": list(n.AllowedIPs),
        "Tags": list(n.Tags),
        "PrimaryRoutes": list(n.PrimaryRoutes),
        "Addrs": list(n.Endpoints) or None,
        "CurAddr": stats.get("CurAddr", ""),
        "Relay": relay_code(backend, n.HomeDERP),
        "PeerRelay": "",
        "RxBytes": stats.get("RxBytes", 0),
        "TxBytes": stats.get("TxBytes", 0),
        "Created": rfc3339(n.Created),
        "LastWrite": rfc3339(stats.get("LastWrite")),
        "LastSeen": rfc3339(n.LastSeen),
        "LastHandshake": rfc3339(stats.get("LastHandshake")),
        "Online": bool(n.Online) if not is_self else backend.backend_state == "Running",
        "ExitNode": False,
        "ExitNodeOption": any(r in ("0.0.0.0/0", "::/0") for r in n.AllowedIPs),
        "Active": bool(stats.get("Active", False)),
        "PeerAPIURL": None,  # no PeerAPI in nodeagent
        "TaildropTarget": 0,  # TaildropTargetUnknown: no Taildrop
        "NoFileSharingReason": "",
        "CapMap": dict(n.CapMap),
        "InNetworkMap": True,
        "InMagicSock": in_magicsock or bool(stats),
        "InEngine": bool(stats),
        "Expired": n.Expired,
        "KeyExpiry": rfc3339(n.KeyExpiry) if n.KeyExpiry else None,
    }
    # Tailscale omits these when empty (``omitempty``).
    return {k: v for k, v in out.items() if k not in _OMITEMPTY or v}


_OMITEMPTY = frozenset({"AllowedIPs", "Tags", "PrimaryRoutes", "CapMap", "Expired", "KeyExpiry"})


def build_status(backend: LocalBackend, *, peers: bool = True) -> dict[str, Any]:
    nm = backend.netmap
    self_node = backend.self_node
    users: dict[str, Any] = {}
    if nm is not None:
        for uid, up in nm.UserProfiles.items():
            users[str(uid)] = {"ID": up.ID, "LoginName": up.LoginName,
                               "DisplayName": up.DisplayName}
            if up.ProfilePicURL:  # omitted when empty, as Tailscale does
                users[str(uid)]["ProfilePicURL"] = up.ProfilePicURL
    suffix = nm.Domain if nm is not None else ""
    peer_map: dict[str, Any] = {}
    if peers and nm is not None:
        for p in nm.Peers:
            peer_map[p.Key] = peer_status(backend, p)
    return {
        "Version": __version__,
        "TUN": backend.wrapper is not None,
        "BackendState": backend.backend_state,
        "HaveNodeKey": True,
        "AuthURL": "",
        "TailscaleIPs": self_node.tailscale_ips(),
        "Self": peer_status(backend, self_node, is_self=True),
        "Health": list(backend.health()),
        "MagicDNSSuffix": suffix,
        "CurrentTailnet": (
            {"Name": suffix, "MagicDNSSuffix": suffix, "MagicDNSEnabled": False}
            if nm is not None else None
        ),
        "CertDomains": None,
        "Peer": peer_map,
        "User": users,
        "ClientVersion": None,
    }
