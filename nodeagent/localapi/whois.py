"""``GET /localapi/v0/whois?addr=...``: which node (and user) owns a tailnet address or node key.

Owns the parsing of the ``addr`` parameter (``IP``, ``IP:port``, ``[v6]:port`` or
``nodekey:<64 hex>``), the lookup in the current netmap (this node itself and its peers, as
Tailscale answers whois for its own address and key too) and the rendering of the answer in the
shape of Tailscale's ``apitype.WhoIsResponse``: ``Node`` (the tailcfg.Node fields the agent
knows), ``UserProfile`` and ``CapMap`` (``null``: the agent's packet filter grants no peer
capabilities). The answer is tab-indented JSON as tailscaled writes it.

Errors use Tailscale's texts: 400 ``missing 'addr' parameter``, ``invalid nodekey in 'addr'
parameter``, ``invalid 'addr' parameter``; 404 ``no match for IP:port``. The derper's
``--verify-clients`` relies on 200 / 404 for ``nodekey:`` lookups.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodeagent.ipn.status import rfc3339
from nodeagent.keys import DISCO_PREFIX, MACHINE_PREFIX, NODE_PREFIX
from nodeagent.localapi.routes import READ, LocalAPIRoutes, json_error
from nodeagent.tailcfg import Node, marshal_json

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend
    from nodeagent.tailcfg import NetworkMap

NOT_FOUND = "no match for IP:port"
_HEX = frozenset("0123456789abcdefABCDEF")


class AddrError(ValueError):
    """An ``addr`` parameter whois cannot use; the message is Tailscale's 400 text."""


def parse_addr(addr: str) -> tuple[str, str]:
    """``("nodekey", "nodekey:<lowercase hex>")`` or ``("ip", "<canonical IP>")``; AddrError
    otherwise. A port, when given, must be 0..65535; it does not take part in the lookup."""
    if not addr:
        raise AddrError("missing 'addr' parameter")
    if addr.startswith(NODE_PREFIX):
        h = addr[len(NODE_PREFIX):]
        if len(h) != 64 or not _HEX.issuperset(h):
            raise AddrError("invalid nodekey in 'addr' parameter")
        return "nodekey", NODE_PREFIX + h.lower()
    host = addr
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0 or not addr[end + 1:].startswith(":"):
            raise AddrError("invalid 'addr' parameter")
        host, port = addr[1:end], addr[end + 2:]
        if ":" not in host:
            raise AddrError("invalid 'addr' parameter")  # "[1.2.3.4]:80" is not an address
        _check_port(port)
    elif addr.count(":") == 1:
        host, port = addr.split(":")
        _check_port(port)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AddrError("invalid 'addr' parameter") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise AddrError("invalid 'addr' parameter")
    return "ip", str(ip)


def _check_port(port: str) -> None:
    if not port.isascii() or not port.isdigit() or len(port) > 5 or int(port) > 65535:
        raise AddrError("invalid 'addr' parameter")


def find_node(backend: LocalBackend, kind: str, value: str) -> tuple[Node, bool] | None:
    """(node, is self) for a parsed ``addr``, looking at this node and the netmap's peers;
    None when nothing matches (and always before the first netmap)."""
    nm: NetworkMap | None = backend.netmap
    if nm is None:
        return None
    me = backend.self_node
    candidates = [(me, True), *((p, False) for p in nm.Peers)]
    for n, is_self in candidates:
        if kind == "nodekey":
            if n.Key.lower() == value:
                return n, is_self
        elif value in _ips(n):
            return n, is_self
    return None


def _ips(n: Node) -> list[str]:
    out = []
    for ip in n.tailscale_ips():
        try:
            out.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            continue
    return out


def _key(text: str, prefix: str) -> str | None:
    """A key for the JSON answer, or None (left out) when it is not ``prefix<64 hex>``: Go's
    decoder in the CLI refuses an empty or malformed key, but takes a missing one."""
    h = text[len(prefix):] if text.startswith(prefix) else ""
    return prefix + h.lower() if len(h) == 64 and _HEX.issuperset(h) else None


def node_json(backend: LocalBackend, n: Node, is_self: bool) -> dict[str, Any]:
    """``n`` in tailcfg.Node's JSON shape (Go's field names; omitempty fields left out when
    empty)."""
    out: dict[str, Any] = {
        "ID": n.ID,
        "StableID": n.StableID or (str(n.ID) if n.ID else ""),
        "Name": n.Name,
        "User": n.User,
    }
    for name, text, prefix in (("Key", n.Key, NODE_PREFIX), ("Machine", n.Machine, MACHINE_PREFIX),
                               ("DiscoKey", n.DiscoKey, DISCO_PREFIX)):
        k = _key(text, prefix)
        if k is not None:
            out[name] = k
        if name == "Key":
            out["KeyExpiry"] = rfc3339(n.KeyExpiry)
    out["Addresses"] = list(n.Addresses)
    out["AllowedIPs"] = list(n.AllowedIPs)
    if n.Endpoints:
        out["Endpoints"] = list(n.Endpoints)
    if n.HomeDERP:
        out["HomeDERP"] = n.HomeDERP
    hostinfo: dict[str, Any] = {}
    if n.HostName:
        hostinfo["Hostname"] = n.HostName
    os_name = n.OS or ("linux" if is_self else "")
    if os_name:
        hostinfo["OS"] = os_name
    out["Hostinfo"] = hostinfo
    out["Created"] = rfc3339(n.Created)
    if n.Tags:
        out["Tags"] = list(n.Tags)
    if n.PrimaryRoutes:
        out["PrimaryRoutes"] = list(n.PrimaryRoutes)
    if n.LastSeen:
        out["LastSeen"] = rfc3339(n.LastSeen)
    online = (backend.backend_state == "Running") if is_self else n.Online
    if online is not None:
        out["Online"] = bool(online)
    out["MachineAuthorized"] = True  # control only sends authorized nodes
    if n.CapMap:
        out["CapMap"] = {k: v for k, v in n.CapMap.items()}
    if n.Name:
        out["ComputedName"] = n.Name.split(".", 1)[0]
        out["ComputedNameWithHost"] = out["ComputedName"] if not n.HostName or \
            n.HostName == out["ComputedName"] else f"{out['ComputedName']} ({n.HostName})"
    if n.Expired:
        out["Expired"] = True
    return out


def whois_json(backend: LocalBackend, n: Node, is_self: bool) -> dict[str, Any]:
    """The whole ``apitype.WhoIsResponse`` for a found node."""
    nm = backend.netmap
    up = nm.UserProfiles.get(n.User) if nm is not None else None
    profile = {"ID": n.User, "LoginName": "", "DisplayName": "", "ProfilePicURL": ""}
    if up is not None:
        profile = {"ID": up.ID, "LoginName": up.LoginName, "DisplayName": up.DisplayName,
                   "ProfilePicURL": up.ProfilePicURL}
    return {"Node": node_json(backend, n, is_self), "UserProfile": profile, "CapMap": None}


def register_whois_route(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    async def whois(request: web.Request) -> web.StreamResponse:
        try:
            kind, value = parse_addr(request.query.get("addr", ""))
        except AddrError as e:
            return json_error(400, str(e))
        found = find_node(backend, kind, value)
        if found is None:
            return json_error(404, NOT_FOUND)
        body = marshal_json(whois_json(backend, *found), "\t") + "\n"
        return web.Response(text=body, content_type="application/json")

    routes.add("whois", whois, {"GET": READ})
