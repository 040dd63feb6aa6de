"""Wire types of the tailnet: nodes, user profiles, the network map and DERP map.

Shapes follow Tailscale's ``tailcfg`` package so JSON and LocalAPI output keep Tailscale's names.
Types are plain dataclasses; the control protocol encodes them with msgpack via ``to_wire`` /
``from_wire`` and the LocalAPI renders them through ``nodeagent.ipn.status``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Node attribute (CapMap key) that switches connection-rejection diagnostics on.
NODE_ATTR_CONN_REJECT = "debug-conn-reject"


@dataclass
class UserProfile:
    ID: int = 0
    LoginName: str = ""
    DisplayName: str = ""
    ProfilePicURL: str = ""


@dataclass
class Node:
    """One node of the tailnet as control describes it (self or peer)."""

    ID: int = 0
    StableID: str = ""
    Name: str = ""  # FQDN with trailing dot, e.g. "host.tailnet.example."
    HostName: str = ""
    User: int = 0
    Key: str = ""  # node public key, "nodekey:<hex>"
    KeyExpiry: float = 0.0  # unix seconds, 0 = never
    Machine: str = ""  # "mkey:<hex>"
    DiscoKey: str = ""  # "discokey:<hex>"
    Addresses: list[str] = field(default_factory=list)  # CIDRs, e.g. "100.64.0.1/32"
    AllowedIPs: list[str] = field(default_factory=list)
    PrimaryRoutes: list[str] = field(default_factory=list)
    Endpoints: list[str] = field(default_factory=list)  # "ip:port"
    HomeDERP: int = 0  # region ID, 0 = none
    OS: str = ""
    Created: float = 0.0
    LastSeen: float = 0.0
    Online: bool | None = None
    Expired: bool = False
    Tags: list[str] = field(default_factory=list)
    CapMap: dict[str, list[Any] | None] = field(default_factory=dict)

    def has_cap(self, cap: str) -> bool:
        return cap in self.CapMap

    def tailscale_ips(self) -> list[str]:
        """Single-address prefixes of Addresses, rendered without the prefix length."""
        out = []
        for a in self.Addresses:
            ip, _, bits = a.partition("/")
            if not bits or bits in ("32", "128"):
                out.append(ip)
        return out


@dataclass
class DERPNode:
    Name: str = ""
    RegionID: int = 0
    HostName: str = ""
    IPv4: str = ""
    IPv6: str = ""
    STUNPort: int = 0
    DERPPort: int = 0
    InsecureForTests: bool = False
    CanPort80: bool = False


@dataclass
class DERPRegion:
    RegionID: int = 0
    RegionCode: str = ""
    RegionName: str = ""
    Nodes: list[DERPNode] = field(default_factory=list)


@dataclass
class DERPMap:
    Regions: dict[int, DERPRegion] = field(default_factory=dict)


@dataclass
class NetworkMap:
    """What control tells this node: itself, its peers, its packet filter and the DERP map."""

    SelfNode: Node = field(default_factory=Node)
    Peers: list[Node] = field(default_factory=list)
    PacketFilter: list[dict[str, Any]] = field(default_factory=list)  # FilterRule JSON shape
    DERPMap: DERPMap | None = None
    UserProfiles: dict[int, UserProfile] = field(default_factory=dict)
    Domain: str = ""

    def peer_by_key(self, key: str) -> Node | None:
        for p in self.Peers:
            if p.Key == key:
                return p
        return None


def to_wire(obj: Any) -> Any:
    """Dataclass tree → plain dicts/lists (msgpack/JSON-ready)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_wire(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_wire(v) for v in obj]
    return obj


class WireError(ValueError):
    """A control message did not have the shape of the type it claims to be."""


def _from(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k in known:  # unknown keys are ignored: newer servers may add fields
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise WireError(f"{where}: {e}") from None


def node_from_wire(data: Any, where: str = "node") -> Node:
    n = _from(Node, data, where)
    for name in ("Addresses", "AllowedIPs", "PrimaryRoutes", "Endpoints", "Tags"):
        v = getattr(n, name)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise WireError(f"{where}.{name}: expected a list of strings")
    if not isinstance(n.CapMap, dict):
        raise WireError(f"{where}.CapMap: expected an object")
    return n


def derpmap_from_wire(data: Any, where: str = "DERPMap") -> DERPMap:
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected an object")
    regions: dict[int, DERPRegion] = {}
    raw = data.get("Regions") or {}
    if not isinstance(raw, dict):
        raise WireError(f"{where}.Regions: expected an object")
    for rid, r in raw.items():
        region = _from(DERPRegion, r, f"{where}.Regions[{rid}]")
        region.Nodes = [
            _from(DERPNode, n, f"{where}.Regions[{rid}].Nodes[{i}]")
            for i, n in enumerate(region.Nodes or [])
        ]
        try:
            regions[int(rid)] = region
        except ValueError:
            raise WireError(f"{where}.Regions: region id {rid!r} is not a number") from None
    return DERPMap(Regions=regions)


def _user_id(k: Any) -> int:
    try:
        return int(k)
    except (TypeError, ValueError):
        raise WireError(f"netmap.UserProfiles: key {k!r} is not a user ID") from None


def netmap_from_wire(data: Any) -> NetworkMap:
    if not isinstance(data, dict):
        raise WireError("netmap: expected an object")
    nm = NetworkMap()
    nm.SelfNode = node_from_wire(data.get("SelfNode") or {}, "netmap.SelfNode")
    peers = data.get("Peers") or []
    if not isinstance(peers, list):
        raise WireError("netmap.Peers: expected a list")
    nm.Peers = [node_from_wire(p, f"netmap.Peers[{i}]") for i, p in enumerate(peers)]
    pf = data.get("PacketFilter") or []
    if not isinstance(pf, list):
        raise WireError("netmap.PacketFilter: expected a list")
    nm.PacketFilter = pf
    if data.get("DERPMap") is not None:
        nm.DERPMap = derpmap_from_wire(data["DERPMap"])
    ups = data.get("UserProfiles") or {}
    if not isinstance(ups, dict):
        raise WireError("netmap.UserProfiles: expected an object")
    nm.UserProfiles = {
        _user_id(k): _from(UserProfile, v, f"netmap.UserProfiles[{k}]") for k, v in ups.items()
    }
    nm.Domain = str(data.get("Domain") or "")
    return nm
