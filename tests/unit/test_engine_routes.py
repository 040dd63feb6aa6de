"""Routing by allowed IPs: the longest prefix wins, per IP version; the pending-open diagnosis
learns whether a peer was reached only through its default route (an exit node)."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any

from nodeagent.engine.core import Engine, PeerConfig, PeerState
from nodeagent.engine.routes import RouteTable


def ip(text: str) -> tuple[int, int]:
    a = ipaddress.ip_address(text)
    return a.version, int(a)


def test_longest_prefix_wins_per_version() -> None:
    t: RouteTable[str] = RouteTable()
    for prefix, value in [("0.0.0.0/0", "default4"), ("100.64.0.0/10", "cgnat"),
                          ("100.64.0.2/32", "host"), ("::/0", "default6"),
                          ("fd7a:115c:a1e0::/48", "ula"), ("100.64.1.9/24", "net")]:
        t.add(prefix, value)
    assert t.lookup(*ip("100.64.0.2")) == "host"
    assert t.lookup(*ip("100.64.0.3")) == "cgnat"
    assert t.lookup(*ip("100.64.1.200")) == "net"  # host bits of a prefix are ignored
    assert t.lookup(*ip("8.8.8.8")) == "default4"
    assert t.lookup(*ip("fd7a:115c:a1e0::9")) == "ula"
    assert t.lookup(*ip("2001:db8::1")) == "default6"
    assert len(t) == 6
    empty: RouteTable[str] = RouteTable()
    assert empty.lookup(*ip("100.64.0.2")) is None and empty.lookup(*ip("::1")) is None


class _Transport:
    def configure(self, peers: list[PeerConfig]) -> None:
        pass

    def send(self, peer_key: str, pkts: list[bytes]) -> None:
        pass

    def peer_state(self, peer_key: str) -> PeerState:
        return PeerState(configured=True)


def _engine(peers: list[PeerConfig]) -> Engine:
    wrapper: Any = SimpleNamespace(set_outbound_sink=lambda sink: None)
    eng = Engine(wrapper, _Transport())
    eng.configure(peers)
    return eng


def test_peer_info_says_when_only_the_default_route_matched() -> None:
    exit_node = PeerConfig("nodekey:" + "11" * 32, "exit",
                           allowed_ips=["100.64.0.3/32", "0.0.0.0/0", "::/0"])
    other = PeerConfig("nodekey:" + "22" * 32, "other",
                       allowed_ips=["100.64.0.2/32", "10.0.0.0/8", "fd7a:115c:a1e0::2/128"])
    eng = _engine([exit_node, other])
    info = eng._peer_info(*ip("8.8.8.8"))
    assert info is not None and info.name == "exit" and info.only_default_route
    info = eng._peer_info(*ip("2001:db8::1"))
    assert info is not None and info.name == "exit" and info.only_default_route
    info = eng._peer_info(*ip("100.64.0.3"))  # the exit node's own address
    assert info is not None and info.name == "exit" and not info.only_default_route
    for addr in ("100.64.0.2", "10.9.8.7", "fd7a:115c:a1e0::2"):
        info = eng._peer_info(*ip(addr))
        assert info is not None and info.name == "other" and not info.only_default_route
    assert _engine([other])._peer_info(*ip("8.8.8.8")) is None
