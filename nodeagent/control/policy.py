"""Tailnet policy: parsing the HuJSON policy file and compiling it per node.

Owns the policy file's meaning. Accepted shape (a subset of Tailscale's policy file)::

    {
      "groups":    {"group:eng": ["alice@example.com"]},
      "hosts":     {"lab": "10.1.0.0/16"},
      "tagOwners": {"tag:server": ["alice@example.com"]},
      "acls": [
        {"action": "accept", "src": ["group:eng", "tag:ci"],
         "dst": ["tag:server:22,80-90", "100.64.0.0/10:*"], "proto": "tcp"},
      ],
      "nodeAttrs": [{"target": ["*"], "attr": ["debug-conn-reject"]}],
      "derpMap":   {"Regions": {"900": {"RegionID": 900, "Nodes": [...]}}},
    }

Selectors (``src`` and the part of ``dst`` before the last ``:``): ``*``, ``tag:x`` (must be
declared in ``tagOwners``), ``group:x``, ``autogroup:member`` (untagged nodes),
``autogroup:tagged``, a ``hosts`` alias, an IP or CIDR (IPv6 may be bracketed: ``[fd7a::1]:22``),
or a name matching a node's user, name or hostname. Names need not exist yet: nodes join later;
but a name no node can have (not a DNS label, no ``@``) must be declared in ``hosts``.
Ports: ``*``, ``22``, ``1000-2000`` or a comma list of those. ``proto`` is a name or IANA number.

Compilation per node yields Tailscale's ``FilterRule`` JSON (only rules whose destination includes
that node, with destinations narrowed to that node's own addresses) and its ``CapMap``. Every error
carries the ``line:column`` of the offending value. ``Policy.warnings`` lists what is accepted but
probably a mistake (``line:column: what``): a node attribute nodeagent does not know (a typo).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nodeagent.control import hujson
from nodeagent.tailcfg import NODE_ATTR_CONN_REJECT, DERPMap, WireError, derpmap_from_wire

DEFAULT_POLICY_TEXT = """// Default policy: every node may reach every other node on every port.
{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}
"""

_TOP_KEYS = ("acls", "tagOwners", "nodeAttrs", "derpMap", "groups", "hosts")
_ACL_KEYS = ("action", "src", "dst", "proto")
_ATTR_KEYS = ("target", "attr")
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132,
           "igmp": 2, "gre": 47, "esp": 50, "ah": 51}
_AUTOGROUPS = ("autogroup:member", "autogroup:tagged")
# Node attributes something in nodeagent acts on; others are passed on with a warning.
KNOWN_NODE_ATTRS = (NODE_ATTR_CONN_REJECT,)
_NODE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """The policy was refused; the message starts with ``line:column:``."""


@dataclass(frozen=True)
class PolicyNode:
    """What the compiler needs to know about one node."""

    id: int
    name: str
    hostname: str
    user: str
    tags: tuple[str, ...]
    addresses: tuple[str, ...]  # bare IPs


@dataclass(frozen=True)
class ACL:
    src: tuple[str, ...]
    dst: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    protos: tuple[int, ...]
    line: int = field(default=0, compare=False)  # where the entry starts in the policy text
    column: int = field(default=0, compare=False)


@dataclass
class Policy:
    text: str
    acls: list[ACL] = field(default_factory=list)
    tag_owners: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    hosts: dict[str, Net] = field(default_factory=dict)
    node_attrs: list[tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=list)
    derp_map: DERPMap | None = None
    derp_map_wire: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)  # "line:column: what", accepted anyway

    def compile(self, nodes: Iterable[PolicyNode]) -> dict[int, tuple[list[dict[str, Any]],
                                                                      dict[str, list[Any]]]]:
        """Per node id: (packet filter rules, CapMap)."""
        c = _Compiler(self, list(nodes))
        return {n.id: (c.filter_for(n), c.capmap_for(n)) for n in c.nodes}


def parse_policy(text: str) -> Policy:
    """Parse and validate policy text; :class:`PolicyError` (``line:column: what``) if bad."""
    try:
        doc = hujson.parse(text)
    except hujson.HuJSONError as e:
        raise PolicyError(str(e)) from None
    try:
        return _build(doc)
    except hujson.HuJSONError as e:
        raise PolicyError(str(e)) from None


# --- validation ------------------------------------------------------------------------------

def _obj(doc: hujson.Document, path: hujson.Path, v: Any, what: str,
         keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise doc.error(path, f"{what}: expected an object")
    if keys is not None:
        for k in v:
            if k not in keys:
                raise doc.error((*path, k), f"{what}: unknown field {k!r} "
                                            f"(known: {', '.join(keys)})")
    return v


def _strs(doc: hujson.Document, path: hujson.Path, v: Any, what: str) -> list[str]:
    if not isinstance(v, list):
        raise doc.error(path, f"{what}: expected a list of strings")
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s:
            raise doc.error((*path, i), f"{what}: expected a non-empty string")
    return v


def _net(s: str) -> Net | None:
    try:
        return ipaddress.ip_network(s, strict=False)
    except ValueError:
        return None


def _build(doc: hujson.Document) -> Policy:
    top = _obj(doc, (), doc.value, "policy", _TOP_KEYS)
    pol = Policy(text=doc.text)
    for g, members in _obj(doc, ("groups",), top.get("groups", {}), "groups").items():
        if not g.startswith("group:") or len(g) <= 6:
            raise doc.error(("groups", g), f"group name {g!r} must look like group:<name>")
        pol.groups[g] = _strs(doc, ("groups", g), members, g)
    for h, v in _obj(doc, ("hosts",), top.get("hosts", {}), "hosts").items():
        net = _net(v) if isinstance(v, str) else None
        if net is None:
            raise doc.error(("hosts", h), f"host {h!r}: expected an IP or CIDR string")
        pol.hosts[h] = net
    for t, owners in _obj(doc, ("tagOwners",), top.get("tagOwners", {}), "tagOwners").items():
        if not t.startswith("tag:") or len(t) <= 4:
            raise doc.error(("tagOwners", t), f"tag {t!r} must look like tag:<name>")
        pol.tag_owners[t] = _strs(doc, ("tagOwners", t), owners, t)
    acls = top.get("acls", [])
    if not isinstance(acls, list):
        raise doc.error(("acls",), "acls: expected a list")
    for i, raw in enumerate(acls):
        pol.acls.append(_acl(doc, pol, ("acls", i), raw))
    attrs = top.get("nodeAttrs", [])
    if not isinstance(attrs, list):
        raise doc.error(("nodeAttrs",), "nodeAttrs: expected a list")
    for i, raw in enumerate(attrs):
        p = ("nodeAttrs", i)
        a = _obj(doc, p, raw, "nodeAttrs entry", _ATTR_KEYS)
        for k in _ATTR_KEYS:
            if k not in a:
                raise doc.error(p, f"nodeAttrs entry: missing {k!r}")
        targets = _strs(doc, (*p, "target"), a["target"], "target")
        for j, t in enumerate(targets):
            _check_selector(doc, pol, (*p, "target", j), t)
        names = _strs(doc, (*p, "attr"), a["attr"], "attr")
        for j, name in enumerate(names):
            if name not in KNOWN_NODE_ATTRS:
                line, col = doc.where((*p, "attr", j))
                close = difflib.get_close_matches(name, KNOWN_NODE_ATTRS, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                pol.warnings.append(f"{line}:{col}: nodeAttrs: unknown attribute {name!r} "
                                    f"({hint}nodes get it, but nodeagent does not use it)")
        pol.node_attrs.append((tuple(targets), tuple(names)))
    if "derpMap" in top:
        dm = _obj(doc, ("derpMap",), top["derpMap"], "derpMap")
        try:
            pol.derp_map = derpmap_from_wire(dm)
        except WireError as e:
            raise doc.error(("derpMap",), str(e)) from None
        pol.derp_map_wire = dm
    return pol


def _acl(doc: hujson.Document, pol: Policy, p: hujson.Path, raw: Any) -> ACL:
    a = _obj(doc, p, raw, "acl", _ACL_KEYS)
    if a.get("action") != "accept":
        raise doc.error((*p, "action") if "action" in a else p,
                        f"acl: action must be \"accept\", got {a.get('action')!r}")
    for k in ("src", "dst"):
        if k not in a:
            raise doc.error(p, f"acl: missing {k!r}")
    src = _strs(doc, (*p, "src"), a["src"], "src")
    for j, s in enumerate(src):
        _check_selector(doc, pol, (*p, "src", j), s)
    dst = []
    for j, d in enumerate(_strs(doc, (*p, "dst"), a["dst"], "dst")):
        dst.append(_dst(doc, pol, (*p, "dst", j), d))
    protos: tuple[int, ...] = ()
    if "proto" in a:
        protos = (_proto(doc, (*p, "proto"), a["proto"]),)
        if not {6, 17, 132} & set(protos) and any(r != ((0, 65535),) for _, r in dst):
            raise doc.error((*p, "proto"), "acl: ports can only be given for tcp, udp or sctp; "
                                           "use \"*\" as the port")
    line, col = doc.where(p)
    return ACL(tuple(src), tuple(dst), protos, line, col)


def _proto(doc: hujson.Document, p: hujson.Path, v: Any) -> int:
    if isinstance(v, str) and v.lower() in _PROTOS:
        return _PROTOS[v.lower()]
    if isinstance(v, str) and v.isdecimal() and v.isascii():
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 256:
        return v
    raise doc.error(p, f"proto: unknown protocol {v!r} (use a name like tcp or a number 1-255)")


def _check_selector(doc: hujson.Document, pol: Policy, p: hujson.Path, s: str) -> None:
    if s == "*" or s in _AUTOGROUPS or s in pol.hosts:
        return
    if s.startswith("tag:"):
        if s not in pol.tag_owners:
            raise doc.error(p, f"{s!r} is not declared in tagOwners")
    elif s.startswith("group:"):
        if s not in pol.groups:
            raise doc.error(p, f"{s!r} is not declared in groups")
    elif s.startswith("autogroup:"):
        raise doc.error(p, f"unsupported {s!r} (supported: {', '.join(_AUTOGROUPS)})")
    elif any(c in s for c in " ,:/") and _net(s) is None:
        raise doc.error(p, f"bad selector {s!r}: not an IP, CIDR, tag, group or name")
    elif "@" not in s and _net(s) is None and not _NODE_NAME.fullmatch(s):
        hosts = difflib.get_close_matches(s, list(pol.hosts), n=1)
        hint = f"; did you mean {hosts[0]!r}?" if hosts else ""
        raise doc.error(p, f"host {s!r} is not declared in hosts (and is no node name or "
                           f"user){hint}")
    elif "@" not in s and _net(s) is None:
        hosts = difflib.get_close_matches(s, list(pol.hosts), n=1, cutoff=0.75)
        if hosts:  # a node name, but more likely a host alias mistyped
            line, col = doc.where(p)
            pol.warnings.append(f"{line}:{col}: {s!r} is not declared in hosts (did you mean "
                                f"{hosts[0]!r}?); it matches only a node named {s!r}")


def _dst(doc: hujson.Document, pol: Policy, p: hujson.Path,
         d: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    if d.startswith("["):
        sel, sep, ports = d[1:].partition("]:")
    else:
        sel, sep, ports = d.rpartition(":")
    if not sep or not sel:
        raise doc.error(p, f"dst {d!r}: expected <selector>:<ports>, e.g. \"{d}:*\"")
    _check_selector(doc, pol, p, sel)
    return sel, _ports(doc, p, ports)


def _ports(doc: hujson.Document, p: hujson.Path, s: str) -> tuple[tuple[int, int], ...]:
    if s == "*":
        return ((0, 65535),)
    out = []
    for part in s.split(","):
        lo_s, dash, hi_s = part.partition("-")
        try:
            lo = _port(lo_s)
            hi = _port(hi_s) if dash else lo
        except ValueError:
            raise doc.error(p, f"bad port {part!r}: expected *, N, N-M or a comma list") from None
        if lo > hi:
            raise doc.error(p, f"bad port range {part!r}: first is above last")
        out.append((lo, hi))
    return tuple(out)


def _port(s: str) -> int:
    if not (s.isdecimal() and s.isascii()) or int(s) > 65535:
        raise ValueError(s)
    return int(s)


# --- compilation -----------------------------------------------------------------------------

class _Compiler:
    def __init__(self, pol: Policy, nodes: list[PolicyNode]) -> None:
        self.pol = pol
        self.nodes = nodes
        self._cache: dict[str, frozenset[int] | Net | None] = {}

    def _resolve(self, sel: str) -> frozenset[int] | Net | None:
        """Selector → node ids, or a network (IP/CIDR/host), or None for ``*``."""
        if sel in self._cache:
            return self._cache[sel]
        r: frozenset[int] | Net | None
        if sel == "*":
            r = None
        elif sel in self.pol.hosts:
            r = self.pol.hosts[sel]
        elif sel.startswith("tag:"):
            r = frozenset(n.id for n in self.nodes if sel in n.tags)
        elif sel == "autogroup:tagged":
            r = frozenset(n.id for n in self.nodes if n.tags)
        elif sel == "autogroup:member":
            r = frozenset(n.id for n in self.nodes if not n.tags)
        elif sel.startswith("group:"):
            users = set(self.pol.groups.get(sel, ()))
            r = frozenset(n.id for n in self.nodes if not n.tags and n.user in users)
        else:
            net = _net(sel)
            r = net if net is not None else frozenset(
                n.id for n in self.nodes
                if (n.user == sel and not n.tags) or sel in (n.name, n.hostname))
        self._cache[sel] = r
        return r

    def _addrs(self, ids: frozenset[int]) -> list[str]:
        return [a for n in self.nodes if n.id in ids for a in n.addresses]

    def filter_for(self, node: PolicyNode) -> list[dict[str, Any]]:
        own = [ipaddress.ip_address(a) for a in node.addresses]
        rules: list[dict[str, Any]] = []
        for acl in self.pol.acls:
            dports: list[dict[str, Any]] = []
            for sel, ranges in acl.dst:
                r = self._resolve(sel)
                if r is None:
                    ips = ["*"]
                elif isinstance(r, frozenset):
                    ips = list(node.addresses) if node.id in r else []
                else:
                    ips = [_net_str(r)] if any(a in r for a in own) else []
                for ip in ips:
                    for lo, hi in ranges:
                        dports.append({"IP": ip, "Ports": {"First": lo, "Last": hi}})
            if not dports:
                continue
            srcs: list[str] = []
            for sel in acl.src:
                r = self._resolve(sel)
                if r is None:
                    srcs.append("*")
                elif isinstance(r, frozenset):
                    srcs.extend(self._addrs(r))
                else:
                    srcs.append(_net_str(r))
            srcs = list(dict.fromkeys(srcs))
            if not srcs:
                continue
            rule: dict[str, Any] = {"SrcIPs": srcs, "DstPorts": dports}
            if acl.protos:
                rule["IPProto"] = list(acl.protos)
            rules.append(rule)
        return rules

    def capmap_for(self, node: PolicyNode) -> dict[str, list[Any]]:
        caps: dict[str, list[Any]] = {}
        for targets, attrs in self.pol.node_attrs:
            for t in targets:
                r = self._resolve(t)
                hit = r is None or (node.id in r if isinstance(r, frozenset)
                                    else any(ipaddress.ip_address(a) in r
                                             for a in node.addresses))
                if hit:
                    for a in attrs:
                        caps.setdefault(a, [])
                    break
        return caps


def _net_str(n: Net) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
