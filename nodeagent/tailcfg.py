"""Wire types of the tailnet: nodes, user profiles, the network map and DERP map.

Shapes follow Tailscale's ``tailcfg`` package so JSON and LocalAPI output keep Tailscale's names.
Types are plain dataclasses; the control protocol encodes them with msgpack via ``to_wire`` /
``from_wire`` and the LocalAPI renders them through ``nodeagent.ipn.status``.

Endpoints (``"ip:port"``, ``"[ipv6]:port"``) are checked by one function, :func:`check_endpoint`,
on both sides: the control server refuses a node that advertises a bad one, and a node drops
bad ones from the peers of a netmap (:func:`drop_bad_endpoints`) before using them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from nodeagent.packet.parse import parse_endpoint

# Node attribute (CapMap key) that switches connection-rejection diagnostics on.
NODE_ATTR_CONN_REJECT = "debug-conn-reject"

# How many endpoints one node may advertise (control refuses more; a node uses no more of a
# peer's), and the longest endpoint text ("[" + 45-character IPv6 + "]:65535" fits).
MAX_ENDPOINTS = 32
MAX_ENDPOINT_LEN = 64
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


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


# --- endpoints -------------------------------------------------------------------------------

def check_endpoint(text: Any) -> tuple[str, int]:
    """An endpoint a node may advertise and a peer may send to → ``(address text, port)``.

    The syntax is ``nodeagent.packet.parse_endpoint``'s (``ip:port``, ``[ipv6]:port``); on top,
    the text is at most :data:`MAX_ENDPOINT_LEN` characters, the port is 1-65535, an IPv6
    address has no zone, and the address is unicast (not unspecified, multicast or the IPv4
    broadcast address). Raises ValueError with a short reason and nothing else, whatever
    ``text`` is.
    """
    if not isinstance(text, str):
        raise ValueError(f"endpoint is {type(text).__name__}, not text")
    if len(text) > MAX_ENDPOINT_LEN:
        raise ValueError(f"endpoint of {len(text)} characters is over the {MAX_ENDPOINT_LEN} "
                         "limit")
    if not text.isascii() or "%" in text:
        raise ValueError(f"{text!r} is not ip:port (no zones, ASCII only)")
    version, ip, port = parse_endpoint(text)  # ValueError naming the problem
    if port == 0:
        raise ValueError(f"port 0 is not a destination in {text!r}")
    addr = ipaddress.ip_address(ip) if version == 4 else ipaddress.IPv6Address(ip)
    if addr.is_unspecified or addr.is_multicast or addr == _BROADCAST:
        raise ValueError(f"{text!r}: {addr} is not a unicast address")
    return str(addr), port


def drop_bad_endpoints(nm: NetworkMap) -> tuple[NetworkMap, int, str]:
    """``nm`` with every peer's Endpoints cut to the ones :func:`check_endpoint` accepts (the
    first :data:`MAX_ENDPOINTS` of them), how many were dropped, and the first reason.

    Peers that need no change are shared with ``nm``; ``nm`` itself is left untouched.
    """
    dropped, first = 0, ""
    peers: list[Node] = []
    for p in nm.Peers:
        good: list[str] = []
        who = f"peer {str(p.HostName or p.ID)[:63]!r}"
        for i, ep in enumerate(p.Endpoints):
            if len(good) == MAX_ENDPOINTS:
                dropped += len(p.Endpoints) - i
                first = first or f"{who}: more than {MAX_ENDPOINTS} endpoints"
                break
            try:
                check_endpoint(ep)
            except ValueError as e:
                dropped += 1
                first = first or f"{who}: {e}"
                continue
            good.append(ep)
        peers.append(p if len(good) == len(p.Endpoints) else dataclasses.replace(p, Endpoints=good))
    if not dropped:
        return nm, 0, ""
    return dataclasses.replace(nm, Peers=peers), dropped, first
