"""The agent's data plane: TUN device, packet filter, Wrapper, engine and transport, kept in step
with the netmap.

``DataPlane.start()`` opens the TUN device and attaches the Wrapper and engine to the backend (so
extensions get their tundev/engine hooks). ``apply_netmap()`` turns each netmap into kernel
state (addresses and routes on the TUN, through netlink), a new packet filter swapped into the
Wrapper whole (filters are immutable; the new one shares the old one's flow table, so replies to
flows opened before a policy push still pass) and the engine's peer set (the transport
keeps sessions of peers that did not change). A netmap that cannot be applied is logged in one
line and the previous state stays.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from nodeagent.engine.core import Engine, PeerConfig, Transport
from nodeagent.filter import Filter, FilterRuleError, parse_rules
from nodeagent.tailcfg import NetworkMap
from nodeagent.tundev import netconf
from nodeagent.tundev.device import TunDevice
from nodeagent.tundev.wrapper import Wrapper

log = logging.getLogger("nodeagent.dataplane")

TAILNET_ROUTES = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
DEFAULT_MTU = 1280


class DataPlane:
    def __init__(self, backend: Any, transport: Transport, *, tun_name: str,
                 mtu: int = DEFAULT_MTU, tun: Any = None) -> None:
        self.backend = backend
        self.transport = transport
        self.tun_name = tun_name
        self.mtu = mtu
        self.tun: Any = tun
        self.wrapper: Wrapper | None = None
        self.engine: Engine | None = None
        self.addresses: list[str] = []
        self.routes: set[str] = set()

    @property
    def filter(self) -> Filter | None:
        """The packet filter in force (the Wrapper's; None before ``start``)."""
        return self.wrapper.filter if self.wrapper is not None else None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.tun is None:
            self.tun = TunDevice.create(self.tun_name, mtu=self.mtu)
        prefs = self.backend.prefs
        self.wrapper = Wrapper(self.tun, Filter([], [], shields_up=prefs.ShieldsUp))
        self.engine = Engine(self.wrapper, self.transport, loop=loop,
                             fast_failure=prefs.FastFailure)
        self.backend.set_tundev(self.wrapper)
        self.backend.set_engine(self.engine)
        self.wrapper.start(loop)
        log.info("data plane: TUN %s up (mtu %d)", self.tun.name, self.mtu)

    def apply_netmap(self, nm: NetworkMap) -> None:
        """Install addresses, routes, filter and peers from a netmap."""
        assert self.wrapper is not None and self.engine is not None
        try:
            rules = parse_rules(nm.PacketFilter or [])
        except FilterRuleError as e:
            log.error("netmap: packet filter refused, keeping the previous one: %s", e)
            rules = None
        addrs = [_host_prefix(a) for a in nm.SelfNode.Addresses]
        if rules is not None or addrs != self.addresses:
            old = self.wrapper.filter
            self.wrapper.set_filter(Filter(rules if rules is not None else old.rules, addrs,
                                           shields_up=self.backend.prefs.ShieldsUp,
                                           flows=old.flows))
        self._sync_addresses(addrs)
        peers = [PeerConfig(key=n.Key, name=n.HostName or n.Name,
                            allowed_ips=list(n.AllowedIPs or n.Addresses),
                            endpoints=list(n.Endpoints), disco_key=n.DiscoKey,
                            home_derp=n.HomeDERP, online=n.Online)
                 for n in nm.Peers if n.Key]
        self._sync_routes(peers)
        self.engine.configure(peers)

    def _sync_addresses(self, addrs: list[str]) -> None:
        name = self.tun.name
        netns = getattr(self.tun, "netns", None)
        for a in self.addresses:
            if a not in addrs:
                try:
                    netconf.del_address(name, a, netns=netns)
                except netconf.NetconfError as e:
                    log.warning("%s", e)
        for a in addrs:
            if a not in self.addresses:
                try:
                    netconf.add_address(name, a, netns=netns)
                except netconf.NetconfError as e:
                    if e.errno != 17:  # EEXIST: already there (e.g. after a restart)
                        log.error("%s", e)
        self.addresses = addrs

    def _sync_routes(self, peers: list[PeerConfig]) -> None:
        want = set(TAILNET_ROUTES)
        for p in peers:
            for prefix in p.allowed_ips:
                net = ipaddress.ip_network(prefix, strict=False)
                if not any(net.subnet_of(ipaddress.ip_network(t))  # type: ignore[arg-type]
                           for t in TAILNET_ROUTES if ipaddress.ip_network(t).version
                           == net.version):
                    want.add(str(net))
        add = sorted(want - self.routes)
        gone = sorted(self.routes - want)
        if add and hasattr(self.tun, "add_routes"):
            try:
                self.tun.add_routes(add)
            except Exception as e:  # a bad route must not stop the rest of the netmap
                log.error("routes: %s", e)
        if gone and hasattr(self.tun, "del_routes"):
            try:
                self.tun.del_routes(gone)
            except Exception as e:
                log.warning("routes: %s", e)
        self.routes = want

    def close(self) -> None:
        self.backend.set_engine(None)
        self.backend.set_tundev(None)
        if self.engine is not None:
            self.engine.close()
        if self.wrapper is not None:
            self.wrapper.close()
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()


def _host_prefix(addr: str) -> str:
    """Self addresses as single-host prefixes (control sends ``100.64.0.1/32``)."""
    if "/" in addr:
        return addr
    return f"{addr}/{32 if ':' not in addr else 128}"
