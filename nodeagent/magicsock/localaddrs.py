"""This host's own candidate endpoints: unicast interface addresses with the WireGuard port.

Tailscale's rule in short (``reference/magicsock.md`` §3 item 7): up interfaces' addresses, minus
loopback, link-local, multicast and the tailnet's own ranges; at most ``MAX_ENDPOINTS`` in all.
"""

from __future__ import annotations

import ipaddress
import logging

from nodeagent.tailcfg import MAX_ENDPOINTS

log = logging.getLogger("nodeagent.magicsock")

_TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
_TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def interface_addresses() -> list[str]:
    """Every address on this network namespace's interfaces (netlink). Runs in a fresh thread:
    pyroute2 must not share the event loop's thread."""
    from pyroute2 import IPRoute

    from nodeagent.tundev.netconf import call_in_netns

    def read() -> list[str]:
        with IPRoute() as ipr:
            return [a for msg in ipr.get_addr() if (a := msg.get_attr("IFA_ADDRESS"))]

    return call_in_netns(None, read, timeout=10)


def local_endpoints(port: int, addrs: list[str] | None = None) -> list[str]:
    """``ip:port`` for this host's usable addresses; [] when ``port`` is 0 or listing fails."""
    if not port:
        return []
    if addrs is None:
        try:
            addrs = interface_addresses()
        except Exception as e:  # endpoints are an optimisation; never fail over them
            log.warning("cannot list local addresses for endpoints: %s", e)
            return []
    out = []
    for addr in addrs:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
            continue
        if ip in (_TAILNET_V4 if ip.version == 4 else _TAILNET_V6):
            continue  # our own tailnet address: not a path to us
        out.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    eps = sorted(set(out))
    return eps[:MAX_ENDPOINTS]
