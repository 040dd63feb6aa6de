"""Filter rules: the ``FilterRule`` value type and its Tailscale JSON wire shape.

Owns parsing of control's packet filter (``tailcfg.FilterRule`` JSON) into validated
``FilterRule`` values, the inverse rendering, and the protocol facts a rule's matching depends on
(the default protocol list, which protocols carry ports). Matching itself lives in ``match``.

Wire shape accepted::

    [{"SrcIPs": ["100.64.0.1", "100.64.0.0/10", "*", "fd7a::/48", "10.0.0.1-10.0.0.9"],
      "DstPorts": [{"IP": "100.64.0.2" | "*" | CIDR, "Ports": {"First": 22, "Last": 22}}],
      "IPProto": [6, 17]}]

* ``"*"`` means every IPv4 and IPv6 address (it expands to ``0.0.0.0/0`` and ``::/0``).
* A prefix with host bits set is accepted and masked; ``a-b`` address ranges become CIDRs.
* ``IPProto`` absent, ``null`` or empty means TCP, UDP, ICMPv4 and ICMPv6 (Tailscale's default).
  Entries are IANA numbers (0-255); the names ``tcp``, ``udp``, ``icmp``, ``ipv6-icmp``/``icmpv6``,
  ``sctp``, ``igmp``, ``gre`` and decimal strings are accepted too.
* ``SrcIPs`` / ``DstPorts`` absent or ``null`` mean an empty list: such a rule (e.g. a capability
  grant with only ``CapGrant``) matches no packet. Unknown keys are ignored.
* Bad input raises :class:`FilterRuleError` with a single line naming the rule index and field.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTO_ICMP = 1
PROTO_IGMP = 2
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_GRE = 47
PROTO_ICMPV6 = 58
PROTO_SCTP = 132

# Used when a rule names no protocols, as Tailscale does.
DEFAULT_PROTOS: tuple[int, ...] = (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6)
# Protocols whose packets carry ports that a DstPorts range is compared against.
PORT_PROTOS = frozenset((PROTO_TCP, PROTO_UDP, PROTO_SCTP))
# ICMP is matched by address only: any port range of a matching destination admits it.
ICMP_PROTOS = frozenset((PROTO_ICMP, PROTO_ICMPV6))
ALL_PORTS = (0, 0xFFFF)

_PROTO_NAMES = {
    "icmp": PROTO_ICMP,
    "igmp": PROTO_IGMP,
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
    "gre": PROTO_GRE,
    "ipv6-icmp": PROTO_ICMPV6,
    "icmpv6": PROTO_ICMPV6,
    "sctp": PROTO_SCTP,
}

ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ALL_V6 = ipaddress.IPv6Network("::/0")


class FilterRuleError(ValueError):
    """A packet filter rule could not be parsed; the message is one line naming rule and field."""


@dataclass(slots=True, frozen=True)
class NetPortRange:
    """One destination entry: an address prefix and an inclusive port range."""

    net: Network
    first: int = 0
    last: int = 0xFFFF


@dataclass(slots=True, frozen=True)
class FilterRule:
    """Packets from any of ``srcs`` to any of ``dsts`` using one of the protocols are allowed.

    ``protos`` empty means :data:`DEFAULT_PROTOS` (see :attr:`effective_protos`).
    """

    srcs: tuple[Network, ...]
    dsts: tuple[NetPortRange, ...]
    protos: tuple[int, ...] = ()

    @property
    def effective_protos(self) -> tuple[int, ...]:
        return self.protos or DEFAULT_PROTOS


def _show(v: Any) -> str:
    """A short single-line rendering of a bad value for an error message."""
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _err(idx: int, field: str, msg: str) -> FilterRuleError:
    return FilterRuleError(f"rule {idx}: {field}: {msg}")


def parse_prefixes(s: Any) -> tuple[Network, ...]:
    """One SrcIPs/IP string → prefixes; raises ValueError (caller adds the rule/field context)."""
    if not isinstance(s, str):
        raise ValueError(f"expected a string, got {type(s).__name__}")
    return _parse_prefix_str(s)


# Netmaps repeat the same address strings across rules (every rule names this node as its
# destination), and ipaddress parsing dominates rule parsing, so parsed strings are remembered.
@functools.lru_cache(maxsize=16384)
def _parse_prefix_str(s: str) -> tuple[Network, ...]:
    if s == "*":
        return (ALL_V4, ALL_V6)
    try:
        if "-" in s:
            lo_s, _, hi_s = s.partition("-")
            lo = ipaddress.ip_address(lo_s)
            hi = ipaddress.ip_address(hi_s)
            if lo.version != hi.version or lo > hi:
                raise ValueError(s)
            return tuple(ipaddress.summarize_address_range(lo, hi))  # type: ignore[arg-type]
        if "%" in s:  # zoned addresses never name a tailnet peer
            raise ValueError(s)
        return (ipaddress.ip_network(s, strict=False),)
    except (ValueError, TypeError):
        raise ValueError(f"bad prefix {_show(s)}") from None


def _parse_port(idx: int, field: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise _err(idx, field, f"expected an integer 0-65535, got {_show(v)}")
    return v


def _parse_proto(idx: int, field: str, v: Any) -> int:
    if isinstance(v, str):
        name = v.strip().lower()
        if name.isdecimal() and name.isascii() and len(name) <= 3:
            v = int(name)
        elif name in _PROTO_NAMES:
            return _PROTO_NAMES[name]
        else:
            raise _err(idx, field, f"bad protocol {_show(v)}")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
        raise _err(idx, field, f"bad protocol {_show(v)}")
    return v


def _list_field(idx: int, rule: dict[str, Any], key: str) -> list[Any]:
    v = rule.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _err(idx, key, f"expected a list, got {type(v).__name__}")
    return v


def _parse_dst(idx: int, j: int, d: Any) -> list[NetPortRange]:
    base = f"DstPorts[{j}]"
    if not isinstance(d, dict):
        raise _err(idx, base, f"expected an object, got {type(d).__name__}")
    if "IP" not in d:
        raise _err(idx, f"{base}.IP", "missing")
    try:
        nets = parse_prefixes(d["IP"])
    except ValueError as e:
        raise _err(idx, f"{base}.IP", str(e)) from None
    ports = d.get("Ports")
    if ports is None:
        raise _err(idx, f"{base}.Ports", "missing")
    if not isinstance(ports, dict):
        raise _err(idx, f"{base}.Ports", f"expected an object, got {type(ports).__name__}")
    first = _parse_port(idx, f"{base}.Ports.First", ports.get("First", 0))
    last = _parse_port(idx, f"{base}.Ports.Last", ports.get("Last", 0))
    if first > last:
        raise _err(idx, f"{base}.Ports", f"First {first} > Last {last}")
    return [NetPortRange(n, first, last) for n in nets]


def _parse_rule(idx: int, rule: Any) -> FilterRule:
    if not isinstance(rule, dict):
        raise FilterRuleError(f"rule {idx}: expected an object, got {type(rule).__name__}")
    srcs: list[Network] = []
    for j, s in enumerate(_list_field(idx, rule, "SrcIPs")):
        try:
            srcs.extend(parse_prefixes(s))
        except ValueError as e:
            raise _err(idx, f"SrcIPs[{j}]", str(e)) from None
    dsts: list[NetPortRange] = []
    for j, d in enumerate(_list_field(idx, rule, "DstPorts")):
        dsts.extend(_parse_dst(idx, j, d))
    protos: list[int] = []
    for j, v in enumerate(_list_field(idx, rule, "IPProto")):
        pr = _parse_proto(idx, f"IPProto[{j}]", v)
        if pr not in protos:
            protos.append(pr)
    return FilterRule(tuple(dict.fromkeys(srcs)), tuple(dict.fromkeys(dsts)), tuple(protos))


def parse_rules(obj: Any) -> list[FilterRule]:
    """Parse a packet filter in Tailscale's ``[FilterRule...]`` JSON shape (already decoded)."""
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise FilterRuleError(f"rules: expected a list, got {type(obj).__name__}")
    return [_parse_rule(i, r) for i, r in enumerate(obj)]


def _net_wire(n: Network) -> str:
    """Single hosts render as a bare address, the way control writes them."""
    if n.prefixlen == n.max_prefixlen:
        return str(n.network_address)
    return str(n)


def rules_to_wire(rules: Iterable[FilterRule]) -> list[dict[str, Any]]:
    """Render rules back to the JSON shape; ``parse_rules(rules_to_wire(r)) == r``."""
    out: list[dict[str, Any]] = []
    for r in rules:
        w: dict[str, Any] = {
            "SrcIPs": [_net_wire(n) for n in r.srcs],
            "DstPorts": [
                {"IP": _net_wire(d.net), "Ports": {"First": d.first, "Last": d.last}}
                for d in r.dsts
            ],
        }
        if r.protos:
            w["IPProto"] = list(r.protos)
        out.append(w)
    return out
