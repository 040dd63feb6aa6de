"""Why the tailnet policy allows or denies one flow: the control server's explanation.

Owns the policy-level answer to "may SRC reach DST on PORT/PROTO?" and its wording: the verdict,
every ACL entry that matched the source, the destination or the port (with its line in the policy
text), the nearest miss, how groups, tags, hosts and autogroups were expanded, and the smallest
ACL entry that would allow the flow. Pure logic, no I/O: the server hands in its ``Policy`` and
nodes. The verdict follows the compiled packet filter rule for rule (``Policy.compile`` plus
``nodeagent.filter``); ``tests/property/test_explain_props.py`` holds the two together.

SRC and DST are a node (name, hostname, ``n<ID>`` or one of its addresses), another IP, or a tag.
A tag carried by exactly one node means that node; otherwise it means "a node with only that tag"
(judged by the tag alone). The flow's address family is the one of an IP given, else IPv4.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

from nodeagent.control.policy import ACL, Policy, PolicyNode, _net

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

PORT_PROTOS = frozenset((6, 17, 132))  # as nodeagent.filter.rules: ports count only for these
ICMP_PROTOS = frozenset((1, 58))  # matched by address alone
DEFAULT_PROTOS = (6, 17, 1, 58)  # an entry without "proto"
PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp", 2: "igmp",
               47: "gre", 50: "esp", 51: "ah"}
_BY_NAME = {"icmpv6": 58, **{v: k for k, v in PROTO_NAMES.items()}}


class ExplainError(ValueError):
    """SRC, DST, port or protocol cannot be understood; the message is one line."""


@dataclass(frozen=True)
class Endpoint:
    """One side of the flow as the policy sees it."""

    label: str  # how sentences name it
    node: PolicyNode | None
    tags: tuple[str, ...] = ()
    ip: Addr | None = None  # the flow's address on this side; None for a node-less tag
    is_node: bool = True  # False for a bare IP that no node owns

    @property
    def short(self) -> str:
        return self.node.name if self.node is not None else self.label


@dataclass
class EntryCheck:
    """How one ACL entry relates to the flow."""

    index: int
    acl: ACL
    src_hits: list[tuple[str, str]] = field(default_factory=list)  # (selector, how)
    dst_hits: list[tuple[str, str]] = field(default_factory=list)  # (dst as written, how)
    proto_ok: bool = False
    port_hit: bool = False  # some destination of the entry admits the port and protocol
    dst_port_hit: bool = False  # ... and that destination covers the flow's destination
    allows: bool = False

    @property
    def relevant(self) -> bool:
        return bool(self.src_hits or self.dst_hits or (self.proto_ok and self.port_hit))

    @property
    def score(self) -> tuple[int, int, int]:
        facets = bool(self.src_hits) + bool(self.dst_hits) + (self.proto_ok and self.port_hit)
        return facets, bool(self.src_hits and self.dst_hits), -self.index


@dataclass
class Explanation:
    allowed: bool
    src: Endpoint
    dst: Endpoint
    port: int
    proto: int
    file: str
    checks: list[EntryCheck]
    summary: str
    nearest: EntryCheck | None = None
    nearest_text: str = ""
    expansions: list[str] = field(default_factory=list)
    suggestion: str | None = None

    @property
    def sentence(self) -> str:
        """One or two short sentences: the verdict and, when denied, the nearest miss."""
        if self.allowed or not self.nearest_text:
            return self.summary
        return f"{self.summary} Nearest: {self.nearest_text}"

    def to_json(self) -> dict[str, Any]:
        def entry(c: EntryCheck) -> dict[str, Any]:
            return {"Index": c.index, "File": self.file, "Line": c.acl.line,
                    "Column": c.acl.column, "Entry": entry_text(c.acl),
                    "Src": [how for _, how in c.src_hits], "Dst": [how for _, how in c.dst_hits],
                    "ProtoMatched": c.proto_ok, "PortMatched": c.port_hit, "Allows": c.allows}

        return {
            "Allowed": self.allowed, "Src": self.src.label, "Dst": self.dst.label,
            "Port": self.port, "Proto": self.proto, "ProtoName": proto_name(self.proto),
            "Summary": self.summary, "Sentence": self.sentence,
            "Matches": [entry(c) for c in self.checks if c.relevant],
            "NearestMiss": ({**entry(self.nearest), "Text": self.nearest_text}
                            if self.nearest is not None else None),
            "Expansions": list(self.expansions), "Suggestion": self.suggestion,
        }

    def text(self) -> str:
        """The explanation for a person, several short lines."""
        out = [self.summary]
        for c in self.checks:
            if not c.relevant:
                continue
            facets = [f for f, on in (("source", c.src_hits), ("destination", c.dst_hits),
                                      ("port", c.proto_ok and c.port_hit)) if on]
            verdict = "allows the flow" if c.allows else "matches " + ", ".join(facets)
            out.append(f"  acls[{c.index}] at {self.file}:{c.acl.line}: {entry_text(c.acl)} "
                       f"— {verdict}")
        if self.nearest_text:
            out.append(f"Nearest miss: {self.nearest_text}")
        for e in self.expansions:
            out.append(f"  {e}")
        if self.suggestion:
            out.append("To allow it, add to \"acls\":")
            out.append(f"  {self.suggestion}")
        return "\n".join(out)


# --- parsing the question --------------------------------------------------------------------

def parse_proto(s: str | int) -> int:
    """``tcp``, ``udp``, ``icmp``... or an IANA number → number; :class:`ExplainError` if bad."""
    if isinstance(s, int) and not isinstance(s, bool):
        n = s
    elif isinstance(s, str) and s.lower() in _BY_NAME:
        return _BY_NAME[s.lower()]
    elif isinstance(s, str) and s.isdecimal() and s.isascii() and len(s) <= 3:
        n = int(s)
    else:
        raise ExplainError(f"unknown protocol {s!r} (use tcp, udp, icmp, sctp or 1-255)")
    if not 0 < n < 256:
        raise ExplainError(f"protocol {n} is outside 1-255")
    return n


def parse_target(s: str) -> tuple[str, int, int]:
    """``DST:PORT[/proto]`` → (DST, port, proto); the protocol defaults to tcp and an ICMP
    destination may leave out the port (``beta/icmp``)."""
    rest, slash, p = s.rpartition("/")
    if not slash:
        rest, p = s, "tcp"
    proto = parse_proto(p)
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            host, sep, port = rest[1:].rstrip("]"), "", ""
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or (":" in host and _ip(rest) is not None):
            host, port = rest, ""
    if not host:
        raise ExplainError(f"{s!r}: expected DST:PORT[/proto], e.g. beta:22/tcp")
    if not port:
        if proto in PORT_PROTOS:
            raise ExplainError(f"{s!r}: {proto_name(proto)} needs a port, e.g. {host}:22")
        return host, 0, proto
    if not (port.isdecimal() and port.isascii()) or int(port) > 65535:
        raise ExplainError(f"{s!r}: bad port {port!r} (0-65535)")
    return host, int(port), proto


def proto_name(proto: int) -> str:
    return PROTO_NAMES.get(proto, str(proto))


def _ip(s: str) -> Addr | None:
    try:
        return ipaddress.ip_address(s.strip("[]"))
    except ValueError:
        return None


def _pick_ip(node: PolicyNode, version: int) -> Addr | None:
    for a in node.addresses:
        ip = ipaddress.ip_address(a)
        if ip.version == version:
            return ip
    return None


def resolve(s: str, nodes: list[PolicyNode], version: int = 4) -> Endpoint:
    """A node name, hostname, ``n<ID>``, IP or tag → :class:`Endpoint`."""
    ip = _ip(s)
    if ip is not None:
        for n in nodes:
            if any(ipaddress.ip_address(a) == ip for a in n.addresses):
                return Endpoint(f"{n.name} ({ip})", n, n.tags, ip)
        return Endpoint(str(ip), None, (), ip, is_node=False)
    if s.startswith("tag:"):
        carriers = [n for n in nodes if s in n.tags]
        if len(carriers) == 1:
            n = carriers[0]
            ip = _pick_ip(n, version)
            return Endpoint(f"{n.name} ({s})", n, n.tags, ip)
        return Endpoint(f"a node tagged {s}", None, (s,), None)
    hits = [n for n in nodes if s == n.name]
    if not hits:
        hits = [n for n in nodes if s in (f"n{n.id}", str(n.id))]
    if not hits:
        hits = [n for n in nodes if n.hostname == s]
    if not hits:
        raise ExplainError(f"no node, IP or tag {s!r} in this tailnet")
    if len(hits) > 1:
        raise ExplainError(f"{s!r} names several nodes ({', '.join(n.name for n in hits)}); "
                           "use an IP")
    n = hits[0]
    return Endpoint(n.name, n, n.tags, _pick_ip(n, version))


# --- matching (mirrors policy._Compiler + filter.match) ----------------------------------------

def _in(ip: Addr | None, net: Net) -> bool:
    return ip is not None and ip.version == net.version and ip in net


def match_selector(pol: Policy, sel: str, ep: Endpoint) -> str | None:
    """How ``sel`` covers ``ep``'s address in the compiled filter, or None if it does not."""
    n = ep.node
    who = ep.short
    if sel == "*":
        return "* matches every address"
    if sel in pol.hosts:
        net = pol.hosts[sel]
        return f"hosts {sel!r} is {net}, which holds {ep.ip}" if _in(ep.ip, net) else None
    if not ep.is_node:
        net = _net(sel)
        return f"{sel} holds {ep.ip}" if net is not None and _in(ep.ip, net) else None
    if sel.startswith("tag:"):
        return f"{who} carries {sel}" if sel in ep.tags else None
    if sel == "autogroup:tagged":
        return f"autogroup:tagged is every tagged node; {who} carries {ep.tags[0]}" \
            if ep.tags else None
    if sel == "autogroup:member":
        return f"autogroup:member is every untagged node; {who} is untagged" \
            if not ep.tags and n is not None else None
    if sel.startswith("group:"):
        users = pol.groups.get(sel, [])
        if n is not None and not ep.tags and n.user in users:
            return f"{sel} is {', '.join(users)}; {who} belongs to {n.user}"
        return None
    net = _net(sel)
    if net is not None:
        return f"{sel} holds {ep.ip}" if _in(ep.ip, net) else None
    if n is None:
        return None
    if n.user == sel and not ep.tags:
        return f"{who} belongs to {sel}"
    if sel == n.name:
        return f"{sel} is the node's name"
    if sel == n.hostname:
        return f"{sel} is {who}'s hostname"
    return None


def why_not(pol: Policy, sel: str, ep: Endpoint) -> str:
    """A short clause saying why ``sel`` does not cover ``ep``."""
    who = ep.short
    if sel in pol.hosts:
        return f"hosts {sel!r} is {pol.hosts[sel]}; {ep.ip or who} is outside it"
    if sel.startswith("group:"):
        users = ", ".join(pol.groups.get(sel, [])) or "nobody"
        if ep.tags:
            return f"{sel} is {users}; tagged nodes belong to no user"
        owner = ep.node.user if ep.node is not None else "no user"
        return f"{sel} is {users}; {who} belongs to {owner}"
    if sel == "autogroup:member":
        return f"autogroup:member is untagged nodes; {who} is tagged" if ep.tags else \
            f"autogroup:member is untagged nodes; {who} is not a node"
    if sel == "autogroup:tagged":
        return f"autogroup:tagged is tagged nodes; {who} has no tag"
    if sel.startswith("tag:"):
        have = ", ".join(ep.tags) or "no tag"
        return f"{who} does not carry {sel} (it has {have})"
    net = _net(sel)
    if net is not None:
        return f"{ep.ip or who} is outside {sel}"
    return f"{sel} is another node or user"


def _port_ok(proto: int, port: int, lo: int, hi: int) -> bool:
    if proto in PORT_PROTOS:
        return lo <= port <= hi
    if proto in ICMP_PROTOS:
        return True
    return (lo, hi) == (0, 65535)


def ports_text(ranges: tuple[tuple[int, int], ...]) -> str:
    if ranges == ((0, 65535),):
        return "*"
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def dst_text(sel: str, ranges: tuple[tuple[int, int], ...]) -> str:
    net = _net(sel) if ":" in sel else None
    shown = f"[{sel}]" if net is not None and net.version == 6 else sel
    return f"{shown}:{ports_text(ranges)}"


def entry_text(acl: ACL) -> str:
    src = ", ".join(acl.src)
    dst = ", ".join(dst_text(s, r) for s, r in acl.dst)
    proto = "/" + "/".join(proto_name(p) for p in acl.protos) if acl.protos else ""
    return f"{src} → {dst}{proto}"


def check_entry(pol: Policy, index: int, acl: ACL, src: Endpoint, dst: Endpoint, port: int,
                proto: int) -> EntryCheck:
    c = EntryCheck(index, acl)
    c.proto_ok = proto in (acl.protos or DEFAULT_PROTOS)
    for sel in acl.src:
        how = match_selector(pol, sel, src)
        if how is not None:
            c.src_hits.append((sel, how))
    for sel, ranges in acl.dst:
        port_here = any(_port_ok(proto, port, lo, hi) for lo, hi in ranges)
        c.port_hit = c.port_hit or port_here
        how = match_selector(pol, sel, dst)
        if how is not None:
            c.dst_hits.append((dst_text(sel, ranges), how))
            c.dst_port_hit = c.dst_port_hit or port_here
    c.allows = c.proto_ok and bool(c.src_hits) and c.dst_port_hit
    return c


# --- the explanation -------------------------------------------------------------------------

def explain(policy: Policy, nodes: list[PolicyNode], src: str, dst: str, port: int,
            proto: int, *, file: str = "policy") -> Explanation:
    """Explain the flow SRC → DST:PORT/PROTO under ``policy``; :class:`ExplainError` when SRC or
    DST cannot be found. ``file`` names the policy text in line references."""
    if not 0 <= port <= 65535:
        raise ExplainError(f"port {port} is outside 0-65535")
    proto = parse_proto(proto)
    version = 4
    for s in (src, dst):
        ip = _ip(s)
        if ip is not None:
            version = ip.version
    s_ep = resolve(src, nodes, version)
    d_ep = resolve(dst, nodes, version)
    if s_ep.ip is not None and d_ep.ip is not None and s_ep.ip.version != d_ep.ip.version:
        raise ExplainError(f"{src} and {dst} are of different address families")
    if (proto, version) in ((1, 6), (58, 4)):
        raise ExplainError(f"{proto_name(proto)} does not travel over IPv{version}")
    checks = [check_entry(policy, i, a, s_ep, d_ep, port, proto)
              for i, a in enumerate(policy.acls)]
    flow = _flow_text(s_ep, d_ep, port, proto)
    allowing = [c for c in checks if c.allows]
    ex = Explanation(bool(allowing), s_ep, d_ep, port, proto, file, checks, "")
    if allowing:
        c = allowing[0]
        ex.summary = f"Allowed: acls[{c.index}] at {file}:{c.acl.line} lets {flow}."
        ex.expansions = _expansions([c])
        return ex
    ex.summary = f"Denied: no ACL entry lets {flow}."
    misses = [c for c in checks if c.relevant]
    if misses:
        ex.nearest = max(misses, key=lambda c: c.score)
        ex.nearest_text = _nearest_text(policy, ex.nearest, s_ep, d_ep, port, proto, file)
    ex.expansions = _expansions([c for c in checks if c.relevant])
    ex.suggestion = suggest(policy, s_ep, d_ep, port, proto)
    return ex


def _flow_text(src: Endpoint, dst: Endpoint, port: int, proto: int) -> str:
    if proto in PORT_PROTOS:
        return f"{src.label} reach {dst.label} on {proto_name(proto)} port {port}"
    return f"{src.label} reach {dst.label} over {proto_name(proto)}"


def _expansions(checks: list[EntryCheck]) -> list[str]:
    out: list[str] = []
    for c in checks:
        for _, how in (*c.src_hits, *c.dst_hits):
            if how not in out and not how.startswith("* "):
                out.append(how)
    return out


def _nearest_text(pol: Policy, c: EntryCheck, src: Endpoint, dst: Endpoint, port: int,
                  proto: int, file: str) -> str:
    misses: list[str] = []
    if not c.src_hits:
        why = "; ".join(why_not(pol, s, src) for s in c.acl.src)
        misses.append(f"not from {src.short} ({why})")
    if not c.dst_hits:
        sels = list(dict.fromkeys(s for s, _ in c.acl.dst))
        why = "; ".join(why_not(pol, s, dst) for s in sels)
        misses.append(f"not to {dst.short} ({why})")
    if not c.proto_ok:
        misses.append(f"not {proto_name(proto)}")
    elif not c.dst_port_hit and (c.dst_hits or not c.port_hit):
        misses.append(f"not :{port}" if proto in PORT_PROTOS
                      else f"not {proto_name(proto)} (that needs port *)")
    return (f"acls[{c.index}] at {file}:{c.acl.line} allows {entry_text(c.acl)}, "
            f"{', '.join(misses)}.")


def _selector_for(ep: Endpoint) -> list[str]:
    """Selectors naming ``ep``, narrowest-readable first."""
    out: list[str] = []
    if ep.tags:
        out.append(ep.tags[0])
    if ep.node is not None:
        out.append(ep.node.name)
    if ep.ip is not None:
        out.append(str(ep.ip))
    return out


def suggest(pol: Policy, src: Endpoint, dst: Endpoint, port: int, proto: int) -> str | None:
    """The smallest ACL entry (HuJSON text) that allows the flow, checked against the policy's
    own rules; None if no selector names both ends (e.g. a node-less tag and no address)."""
    ports = ((port, port),) if proto in PORT_PROTOS else ((0, 65535),)
    protos = (proto,)
    for s in _selector_for(src):
        for d in _selector_for(dst):
            acl = ACL((s,), ((d, ports),), protos)
            if check_entry(pol, len(pol.acls), acl, src, dst, port, proto).allows:
                return json.dumps({"action": "accept", "src": [s],
                                   "dst": [dst_text(d, ports)], "proto": proto_name(proto)})
    return None


def answer_node_request(policy: Policy, nodes: list[PolicyNode], asking: int, src: str,
                        dst: str, port: int, proto: int, *, file: str = "policy") -> dict[str, Any]:
    """A node's question about a flow it took part in: its reply fields (``Result`` or
    ``Error``). Refused unless the asking node owns the flow's source or destination IP."""
    me = next((n for n in nodes if n.id == asking), None)
    mine = {ipaddress.ip_address(a) for a in me.addresses} if me is not None else set()
    s_ip, d_ip = _ip(src), _ip(dst)
    if s_ip is None or d_ip is None:
        return {"Error": "a node asks about a flow by its source and destination IPs"}
    if s_ip not in mine and d_ip not in mine:
        return {"Error": "a node may only ask about flows it is the source or destination of"}
    try:
        return {"Result": explain(policy, nodes, src, dst, port, proto, file=file).to_json()}
    except ExplainError as e:
        return {"Error": str(e)}
