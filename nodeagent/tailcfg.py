"""Wire types of the tailnet: nodes, user profiles, the network map and DERP map.

Shapes follow Tailscale's ``tailcfg`` package so JSON and LocalAPI output keep Tailscale's names.
Types are plain dataclasses; the control protocol encodes them with msgpack via ``to_wire`` /
``from_wire`` and the LocalAPI renders them through ``nodeagent.ipn.status``.

Endpoints (``"ip:port"``, ``"[ipv6]:port"``) are checked by one function, :func:`check_endpoint`,
on both sides: the control server refuses a node that advertises a bad one, and a node drops
bad ones from the peers of a netmap (:func:`drop_bad_endpoints`) before using them.

The DERP map keeps all of Tailscale's DERP fields; :func:`derpmap_to_json` gives the exact JSON
shape Tailscale serves (LocalAPI ``derpmap``) and :func:`marshal_json` writes JSON text the way
Go's ``encoding/json`` does.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
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
    """One DERP (and/or STUN) server of a region; Tailscale's field names and meanings."""

    Name: str = ""
    RegionID: int = 0
    HostName: str = ""
    CertName: str = ""  # expected TLS name, or "sha256-raw:<hex>" pinning a self-signed leaf
    IPv4: str = ""  # forced IPv4 address; a non-IP value (conventionally "none") disables IPv4
    IPv6: str = ""  # likewise for IPv6
    STUNPort: int = 0  # 0 = 3478, negative = no STUN
    STUNOnly: bool = False
    DERPPort: int = 0  # 0 = 443
    InsecureForTests: bool = False  # skip TLS certificate verification
    STUNTestIP: str = ""  # STUN goes to this IP instead (tests)
    CanPort80: bool = False

    def is_test_node(self) -> bool:
        """Tailscale's "test node": IPv4 127.0.0.1 or a STUNTestIP (probed in both families
        whatever the interfaces say)."""
        return self.IPv4 == "127.0.0.1" or self.STUNTestIP != ""


@dataclass
class DERPRegion:
    RegionID: int = 0
    RegionCode: str = ""
    RegionName: str = ""
    Latitude: float = 0.0
    Longitude: float = 0.0
    Avoid: bool = False  # deprecated: not chosen as a new home, still measured at first
    NoMeasureNoHome: bool = False  # neither measured nor chosen as home
    Nodes: list[DERPNode] = field(default_factory=list)


@dataclass
class DERPHomeParams:
    RegionScore: dict[int, float] = field(default_factory=dict)  # latency multiplier per region


@dataclass
class DERPMap:
    Regions: dict[int, DERPRegion] = field(default_factory=dict)
    HomeParams: DERPHomeParams | None = None
    OmitDefaultRegions: bool = False  # JSON name "omitDefaultRegions"


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


_DERP_STR = ("Name", "HostName", "CertName", "IPv4", "IPv6", "STUNTestIP", "RegionCode",
             "RegionName")
_DERP_INT = ("RegionID", "STUNPort", "DERPPort")
_DERP_BOOL = ("STUNOnly", "InsecureForTests", "CanPort80", "Avoid", "NoMeasureNoHome")
_DERP_FLOAT = ("Latitude", "Longitude")


def _check_derp_fields(obj: Any, where: str) -> None:
    """Wrong-typed DERP fields are refused (Go's decoder refuses them too); absent is fine."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f.name
        if name in _DERP_STR and not isinstance(v, str):
            raise WireError(f"{where}.{name}: expected a string")
        if name in _DERP_INT and (isinstance(v, bool) or not isinstance(v, int)):
            raise WireError(f"{where}.{name}: expected an integer")
        if name in _DERP_BOOL and not isinstance(v, bool):
            raise WireError(f"{where}.{name}: expected true or false")
        if name in _DERP_FLOAT:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise WireError(f"{where}.{name}: expected a finite number")
            setattr(obj, name, float(v))


def _region_key(k: Any, where: str) -> int:
    if isinstance(k, bool):
        raise WireError(f"{where}: region id {k!r} is not a number")
    try:
        return int(k)
    except (TypeError, ValueError):
        raise WireError(f"{where}: region id {k!r} is not a number") from None


def derpmap_from_wire(data: Any, where: str = "DERPMap") -> DERPMap:
    """A DERPMap from its JSON/msgpack shape. Unknown keys are ignored (newer servers add
    fields); a known field of the wrong type is a :class:`WireError`."""
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected an object")
    regions: dict[int, DERPRegion] = {}
    raw = data.get("Regions") or {}
    if not isinstance(raw, dict):
        raise WireError(f"{where}.Regions: expected an object")
    for rid, r in raw.items():
        rw = f"{where}.Regions[{rid}]"
        region = _from(DERPRegion, r, rw)
        nodes = region.Nodes if region.Nodes is not None else []
        if not isinstance(nodes, list):
            raise WireError(f"{rw}.Nodes: expected a list")
        region.Nodes = [_from(DERPNode, n, f"{rw}.Nodes[{i}]") for i, n in enumerate(nodes)]
        _check_derp_fields(region, rw)
        for i, n in enumerate(region.Nodes):
            _check_derp_fields(n, f"{rw}.Nodes[{i}]")
        regions[_region_key(rid, f"{where}.Regions")] = region
    dm = DERPMap(Regions=regions)
    hp = data.get("HomeParams")
    if hp is not None:
        if not isinstance(hp, dict):
            raise WireError(f"{where}.HomeParams: expected an object")
        scores = hp.get("RegionScore") or {}
        if not isinstance(scores, dict):
            raise WireError(f"{where}.HomeParams.RegionScore: expected an object")
        params = DERPHomeParams()
        for k, v in scores.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise WireError(f"{where}.HomeParams.RegionScore[{k}]: expected a finite "
                                "number")
            params.RegionScore[_region_key(k, f"{where}.HomeParams.RegionScore")] = float(v)
        dm.HomeParams = params
    omit = data.get("omitDefaultRegions", data.get("OmitDefaultRegions", False))
    if not isinstance(omit, bool):
        raise WireError(f"{where}.omitDefaultRegions: expected true or false")
    dm.OmitDefaultRegions = omit
    return dm


def _go_map(m: dict[int, Any]) -> dict[str, Any]:
    """Go encodes a map with integer keys as decimal strings sorted as strings."""
    return {k: m[int(k)] for k in sorted(str(i) for i in m)}


def derpmap_to_json(dm: DERPMap | None) -> dict[str, Any] | None:
    """``dm`` in the JSON shape Tailscale's tailcfg encodes (field order, ``omitempty``
    fields left out, region IDs as string keys); None stays None (JSON ``null``)."""
    if dm is None:
        return None
    out: dict[str, Any] = {}
    if dm.HomeParams is not None:
        hp: dict[str, Any] = {}
        if dm.HomeParams.RegionScore:
            hp["RegionScore"] = _go_map(dm.HomeParams.RegionScore)
        out["HomeParams"] = hp
    regions: dict[int, Any] = {}
    for rid, r in dm.Regions.items():
        reg: dict[str, Any] = {"RegionID": r.RegionID, "RegionCode": r.RegionCode,
                               "RegionName": r.RegionName}
        for name in ("Latitude", "Longitude", "Avoid", "NoMeasureNoHome"):
            if getattr(r, name):
                reg[name] = getattr(r, name)
        reg["Nodes"] = [_derpnode_json(n) for n in r.Nodes]
        regions[rid] = reg
    out["Regions"] = _go_map(regions)
    if dm.OmitDefaultRegions:
        out["omitDefaultRegions"] = True
    return out


def _derpnode_json(n: DERPNode) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": n.Name, "RegionID": n.RegionID, "HostName": n.HostName}
    for name in ("CertName", "IPv4", "IPv6", "STUNPort", "STUNOnly", "DERPPort",
                 "InsecureForTests", "STUNTestIP", "CanPort80"):
        if getattr(n, name):
            out[name] = getattr(n, name)
    return out


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028",
               "\u2029": "\\u2029"}


def _go_floats(obj: Any) -> Any:
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 1e21:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _go_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_go_floats(v) for v in obj]
    return obj


def marshal_json(obj: Any, indent: str | None = None) -> str:
    """JSON text as Go's ``encoding/json`` writes it: compact (``indent=None``) or indented with
    ``indent`` and ``": "`` after keys, UTF-8 kept, and ``<``, ``>``, ``&``, U+2028, U+2029
    escaped as Go's HTML-safe encoder does; a whole float is written without ``.0`` (Go's
    ``40``, not ``40.0``). No trailing newline."""
    obj = _go_floats(obj)
    if indent is None:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False)
    # These characters can only occur inside JSON strings, so replacing them everywhere is safe.
    for ch, esc in _GO_ESCAPES.items():
        if ch in text:
            text = text.replace(ch, esc)
    return text


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
