"""``POST /localapi/v0/ping?ip=IP&type=disco``: a disco ping to a peer, answered as Tailscale's
PingResult (``IP``, ``NodeIP``, ``NodeName``, ``Err``, ``LatencySeconds``, ``Endpoint``,
``DERPRegionID``, ``DERPRegionCode``). One request, one ping: the reply comes with the first
pong (via DERP or a direct address); the client repeats, as ``tailscale ping`` does.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from aiohttp import web

from nodeagent.ipn.status import relay_code
from nodeagent.keys import NODE_PREFIX, parse_public
from nodeagent.localapi.routes import READ, LocalAPIRoutes

if TYPE_CHECKING:
    from nodeagent.backend import LocalBackend
    from nodeagent.tailcfg import Node

PING_WAIT = 10.0  # seconds a request waits for a pong before answering with an error


def _text(status: int, msg: str) -> web.Response:
    return web.Response(status=status, text=msg + "\n")


def _find(backend: LocalBackend, ip: str) -> tuple[Node | None, bool]:
    """(peer owning ``ip``, whether ``ip`` is one of ours)."""
    if ip in backend.self_node.tailscale_ips():
        return None, True
    nm = backend.netmap
    if nm is not None:
        for n in nm.Peers:
            if ip in n.tailscale_ips():
                return n, False
    return None, False


def _name(n: Node) -> str:
    return (n.Name.split(".", 1)[0] if n.Name else "") or n.HostName


def register_ping_route(backend: LocalBackend, routes: LocalAPIRoutes) -> None:
    async def ping(request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return _text(405, "want POST")
        ip = request.query.get("ip", "")
        if not ip:
            return _text(400, "missing 'ip' parameter")
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            return _text(400, "invalid IP")
        kind = request.query.get("type", "")
        if not kind:
            return _text(400, "missing 'type' parameter")
        if kind != "disco":
            return _text(400, f"ping type {kind!r}: only disco pings are supported")
        result: dict[str, Any] = {"IP": ip}
        peer, local = _find(backend, ip)
        if local:
            return web.json_response({**result, "Err": f"{ip} is local Tailscale IP",
                                      "IsLocalIP": True})
        if peer is None:
            return web.json_response({**result, "Err": "no matching peer"})
        ips = peer.tailscale_ips()
        result.update(NodeIP=ips[0] if ips else "", NodeName=_name(peer))
        paths = backend.paths
        if paths is None:
            return web.json_response({**result, "Err": "local tailscaled stopped"})
        try:
            key = parse_public(peer.Key, NODE_PREFIX)
        except ValueError:
            return web.json_response({**result, "Err": "unknown peer"})
        pong = await paths.ping(key, PING_WAIT)
        if pong is None:
            return web.json_response({**result, "Err": "timeout waiting for a pong"})
        result.update(LatencySeconds=pong.latency, Endpoint=pong.endpoint, PeerRelay="",
                      DERPRegionID=pong.derp_region, DERPRegionCode=relay_code(
                          backend, pong.derp_region))
        return web.json_response(result, dumps=_compact)

    routes.add("ping", ping, {"POST": READ})


def _compact(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))
