"""Netlink configuration of network links with pyroute2: state, MTU, addresses, routes, netns.

Every operation takes an interface name and an optional named network namespace (a file under
``/run/netns``, as ``ip netns add`` makes). Failures raise :class:`NetconfError` with one line
naming the operation, the interface and the namespace.

Why a worker thread: pyroute2's synchronous ``IPRoute`` drives its own asyncio loop and refuses
to run inside a thread that already runs one (the agent's), and its ``netns=`` option forks a
helper process to open the netlink socket. Instead each batch of operations runs in a short-lived
thread that, when a namespace is named, first ``setns()``-es itself into it (network namespaces
are per thread) and then opens a plain ``IPRoute`` there. The calling thread never changes
namespace, and no process is forked.
"""

from __future__ import annotations

import errno as errno_mod
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.errors import UserError

NETNS_RUN_DIR = "/run/netns"
IFA_F_NODAD = 0x02  # linux/if_addr.h: skip duplicate address detection, usable at once

T = TypeVar("T")


class NetconfError(UserError):
    """A netlink configuration step failed; ``errno`` holds the kernel's error when known."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(slots=True)
class LinkInfo:
    """What the kernel says about one link (as seen from inside its namespace)."""

    index: int
    name: str
    mtu: int
    up: bool
    addresses: list[str] = field(default_factory=list)  # "addr/prefixlen"


# --- plumbing ----------------------------------------------------------------------------------


def netns_path(netns: str) -> str:
    """The bind-mount file of a named namespace; absolute paths are taken as given."""
    if "/" in netns:
        return netns
    if netns in ("", ".", ".."):
        raise NetconfError(f"invalid network namespace name {netns!r}")
    return os.path.join(NETNS_RUN_DIR, netns)


def open_netns(netns: str) -> int:
    """An O_RDONLY fd for a named namespace (for setns or IFLA_NET_NS_FD); caller closes it."""
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetconfError(f"network namespace {netns!r} does not exist ({path} missing)",
                           errno_mod.ENOENT) from None
    except OSError as e:
        raise NetconfError(f"cannot open network namespace {netns!r}: {e.strerror}",
                           e.errno) from None


def _where(ifname: str, netns: str | None) -> str:
    return f"{ifname!r} in netns {netns!r}" if netns else repr(ifname)


def _fail(op: str, ifname: str, netns: str | None, e: BaseException) -> NetconfError:
    if isinstance(e, NetconfError):
        return e
    code: int | None = None
    if isinstance(e, NetlinkError):
        code = e.code
        reason = os.strerror(code) if code else str(e)
    elif isinstance(e, OSError):
        code = e.errno
        reason = e.strerror or str(e)
    else:
        reason = str(e) or type(e).__name__
    return NetconfError(f"{op} {_where(ifname, netns)}: {reason}", code)


def call_in_netns(netns: str | None, fn: Callable[[], T], *,
                  timeout: float | None = None) -> T:
    """Run ``fn`` in a fresh thread living in ``netns`` (or the caller's namespace, which a new
    thread inherits); return its result or re-raise its exception. The calling thread's
    namespace is never touched, and the worker's dies with it. With ``timeout``, a call still
    running after that many seconds raises ``TimeoutError`` (the daemon thread is left to
    finish on its own)."""
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            if netns is not None:
                fd = open_netns(netns)
                try:
                    pr_netns.setns(fd, flags=0)
                finally:
                    os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=f"netconf-{netns or 'self'}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{fn!r} in netns {netns!r} still running after {timeout}s")
    if error:
        raise error[0]
    return result[0]


def _with_ipr(netns: str | None, op: str, ifname: str, fn: Callable[[IPRoute], T]) -> T:
    def body() -> T:
        with IPRoute() as ipr:
            return fn(ipr)

    try:
        return call_in_netns(netns, body)
    except Exception as e:
        raise _fail(op, ifname, netns, e) from e


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkError(errno_mod.ENODEV, "no such device")
    return int(found[0])


def _split_cidr(cidr: str) -> tuple[int, str, int]:
    """'100.64.0.1/32' → (AF_INET, '100.64.0.1', 32); a bare address gets a host prefix."""
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise NetconfError(f"not an IP address or prefix: {cidr!r}") from None
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    return family, str(iface.ip), iface.network.prefixlen


def _network(cidr: str) -> tuple[int, str]:
    """'100.64.0.0/10' → (AF_INET, '100.64.0.0/10'); host bits must be zero."""
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        raise NetconfError(f"not a route prefix: {cidr!r} ({e})") from None
    return (socket.AF_INET if net.version == 4 else socket.AF_INET6), str(net)


# --- steps on an open IPRoute (so one thread/namespace entry can do several) -------------------


def _do_addr_add(ipr: IPRoute, idx: int, cidr: str) -> None:
    family, addr, plen = _split_cidr(cidr)
    kw: dict[str, Any] = {"index": idx, "address": addr, "prefixlen": plen, "family": family}
    if family == socket.AF_INET6:
        # Without NODAD the address stays "tentative" for a second and bind() fails on it.
        kw["flags"] = IFA_F_NODAD
    ipr.addr("add", **kw)


def _do_route(ipr: IPRoute, cmd: str, idx: int, cidr: str, table: int | None,
              metric: int | None) -> None:
    family, dst = _network(cidr)
    kw: dict[str, Any] = {"dst": dst, "oif": idx, "family": family}
    if table is not None:
        kw["table"] = table
    if metric is not None:
        kw["priority"] = metric
    ipr.route(cmd, **kw)


# --- public operations -------------------------------------------------------------------------


def get_link(ifname: str, *, netns: str | None = None) -> LinkInfo | None:
    """The link's state and addresses, or ``None`` when no such link exists there."""

    def body(ipr: IPRoute) -> LinkInfo | None:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return None
        idx = int(found[0])
        msg = ipr.get_links(idx)[0]
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)]
        return LinkInfo(index=idx, name=msg.get_attr("IFLA_IFNAME"),
                        mtu=int(msg.get_attr("IFLA_MTU")), up=bool(msg["flags"] & 1),
                        addresses=addrs)

    return _with_ipr(netns, "reading link", ifname, body)


def link_routes(ifname: str, *, netns: str | None = None) -> list[str]:
    """Destination prefixes of the main-table unicast routes whose output device is ``ifname``."""

    def body(ipr: IPRoute) -> list[str]:
        idx = _index(ipr, ifname)
        out = []
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=fam, oif=idx, table=254):
                if r["type"] != 1:  # RTN_UNICAST only; skip local/multicast entries
                    continue
                dst = r.get_attr("RTA_DST")
                default = "0.0.0.0" if fam == socket.AF_INET else "::"
                out.append(f"{dst or default}/{r['dst_len']}")
        return out

    return _with_ipr(netns, "listing routes of", ifname, body)


def add_address(ifname: str, cidr: str, *, netns: str | None = None) -> None:
    """Add ``addr/prefixlen`` (bare address = host prefix); IPv6 gets IFA_F_NODAD."""
    _split_cidr(cidr)  # reject bad input before touching the kernel
    _with_ipr(netns, f"adding address {cidr} to", ifname,
              lambda ipr: _do_addr_add(ipr, _index(ipr, ifname), cidr))


def del_address(ifname: str, cidr: str, *, netns: str | None = None) -> None:
    family, addr, plen = _split_cidr(cidr)
    _with_ipr(netns, f"deleting address {cidr} from", ifname,
              lambda ipr: ipr.addr("del", index=_index(ipr, ifname), address=addr,
                                   prefixlen=plen, family=family))


def add_route(ifname: str, cidr: str, *, netns: str | None = None, replace: bool = False,
              table: int | None = None, metric: int | None = None) -> None:
    """Route ``cidr`` out of ``ifname``. ``replace=True`` makes it idempotent (and takes over
    an existing route for the same prefix)."""
    _network(cidr)
    cmd = "replace" if replace else "add"
    _with_ipr(netns, f"adding route {cidr} via", ifname,
              lambda ipr: _do_route(ipr, cmd, _index(ipr, ifname), cidr, table, metric))


def del_route(ifname: str, cidr: str, *, netns: str | None = None,
              table: int | None = None) -> None:
    _network(cidr)
    _with_ipr(netns, f"deleting route {cidr} via", ifname,
              lambda ipr: _do_route(ipr, "del", _index(ipr, ifname), cidr, table, None))


def move_link_to_netns(ifname: str, target: str, *, netns: str | None = None) -> None:
    """Move a link from ``netns`` (default: ours) into the named namespace ``target``."""
    op = f"moving to netns {target!r}"

    def body(ipr: IPRoute) -> None:
        idx = _index(ipr, ifname)
        fd = open_netns(target)
        try:
            ipr.link("set", index=idx, net_ns_fd=fd)  # IFLA_NET_NS_FD
        finally:
            os.close(fd)

    _with_ipr(netns, op, ifname, body)


def configure_link(ifname: str, *, netns: str | None = None, rename_to: str | None = None,
                   mtu: int | None = None, addresses: Iterable[str] = (),
                   routes: Iterable[str] = (), up: bool = True) -> int:
    """Rename, set MTU, bring up, add addresses then routes — in one namespace entry, in the
    order the kernel needs (rename while down; routes after the link is up). Returns the
    link's index in its namespace."""
    addresses = list(addresses)
    routes = list(routes)
    for a in addresses:
        _split_cidr(a)
    for r in routes:
        _network(r)
    if mtu is not None and mtu < 1280 and any(":" in a for a in addresses):
        # The kernel silently disables IPv6 on a link below 1280 and then refuses the address.
        raise NetconfError(f"configuring {_where(ifname, netns)}: IPv6 addresses need MTU >= "
                           f"1280, got {mtu}", errno_mod.EINVAL)
    state = {"op": "looking up", "name": ifname}

    def body() -> int:
        with IPRoute() as ipr:
            idx = _index(ipr, ifname)
            if rename_to is not None and rename_to != ifname:
                state["op"] = f"renaming to {rename_to!r}"
                ipr.link("set", index=idx, ifname=rename_to)
                state["name"] = rename_to
            if mtu is not None:
                state["op"] = f"setting MTU {mtu} on"
                ipr.link("set", index=idx, mtu=mtu)
            if up:
                state["op"] = "bringing up"
                ipr.link("set", index=idx, state="up")
            for a in addresses:
                state["op"] = f"adding address {a} to"
                _do_addr_add(ipr, idx, a)
            for r in routes:
                state["op"] = f"adding route {r} via"
                _do_route(ipr, "add", idx, r, None, None)
            return idx

    try:
        return call_in_netns(netns, body)
    except Exception as e:
        raise _fail(state["op"], state["name"], netns, e) from e
