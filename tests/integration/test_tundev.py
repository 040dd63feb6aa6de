"""The real TUN device inside a fresh network namespace: configuration, read path, write path
(the kernel verifies checksums of what we write), batching, errors, teardown; plus the
namespace toolkit itself. Addresses come from 100.64.0.0/10 and fd7a:115c:a1e0::/48 only, and
all traffic stays inside the test's namespaces."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio

from nodeagent.packet import (
    PROTO_UDP,
    Parsed,
    build_udp,
    ip_to_int,
    parse_into,
    payload,
)
from nodeagent.tundev import netconf
from nodeagent.tundev.device import READ_BATCH, TunDevice, TunError
from tests.netns import (
    NETNS_DIR,
    acall_in_netns,
    call_in_netns,
    current_netns_inode,
    in_netns,
    make_netns,
    netns_inode,
    popen_in_netns,
    run_in_netns,
    skip_unless_netns,
    veth_pair,
)

pytestmark = pytest.mark.integration

TUN_NAME = "natest0"
LOCAL = {4: "100.64.0.1", 6: "fd7a:115c:a1e0::1"}
PEER = {4: "100.64.0.2", 6: "fd7a:115c:a1e0::2"}
ADDRS = [f"{LOCAL[4]}/32", f"{LOCAL[6]}/128"]
ROUTES = ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
TIMEOUT = 5.0


@pytest.fixture
def ns() -> Iterator[str]:
    skip_unless_netns(tun=True)
    with make_netns("natun") as name:
        yield name


@pytest_asyncio.fixture
async def dev(ns: str) -> AsyncIterator[TunDevice]:
    d = TunDevice.create(TUN_NAME, mtu=1280, addresses=ADDRS, routes=ROUTES, netns=ns)
    try:
        yield d
    finally:
        d.close()


class Collector:
    """on_packets sink that lets a test wait for a packet matching a predicate."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.packets: list[bytes] = []
        self._event = asyncio.Event()

    def __call__(self, batch: list[bytes]) -> None:
        self.batches.append(batch)
        self.packets.extend(batch)
        self._event.set()

    async def wait_for(self, pred: Callable[[bytes], bool], count: int = 1) -> list[bytes]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            hits = [p for p in self.packets if pred(p)]
            if len(hits) >= count:
                return hits
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(hits)}/{count} matching packets within {TIMEOUT}s; "
                                     f"saw {len(self.packets)} packets in total")
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except TimeoutError:
                pass


async def poll(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def udp_to(version: int, port: int, body: bytes) -> Callable[[bytes], bool]:
    """Predicate: a UDP packet LOCAL → PEER:port carrying ``body``."""
    src, dst = ip_to_int(LOCAL[version])[1], ip_to_int(PEER[version])[1]
    p = Parsed()

    def pred(pkt: bytes) -> bool:
        return (parse_into(pkt, p) == version and p.proto == PROTO_UDP and p.src_ip == src
                and p.dst_ip == dst and p.dst_port == port and bytes(payload(pkt, p)) == body)

    return pred


def send_udp(version: int, port: int, bodies: list[bytes]) -> None:
    with socket.socket(FAMILY[version], socket.SOCK_DGRAM) as s:
        for b in bodies:
            s.sendto(b, (PEER[version], port))


def bound_udp(version: int) -> socket.socket:
    s = socket.socket(FAMILY[version], socket.SOCK_DGRAM)
    s.bind((LOCAL[version], 0))
    s.setblocking(False)
    return s


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_created_inside_namespace_configured(ns: str, dev: TunDevice) -> None:
    assert (dev.name, dev.mtu, dev.netns) == (TUN_NAME, 1280, ns) and dev.fd >= 0
    info = netconf.get_link(TUN_NAME, netns=ns)
    assert info is not None and info.up and info.mtu == 1280 and info.index == dev.ifindex
    assert set(ADDRS) <= set(info.addresses)
    assert set(ROUTES) <= set(netconf.link_routes(TUN_NAME, netns=ns))
    # Our own namespace never saw the final name, and we are still in our own namespace.
    assert netconf.get_link(TUN_NAME) is None
    assert current_netns_inode() != netns_inode(ns)
    # IPv6 address is usable at once (NODAD): not tentative.
    out = run_in_netns(ns, ["ip", "-6", "addr", "show", "dev", TUN_NAME], check=True).stdout
    assert LOCAL[6] in out and "nodad" in out and "tentative" not in out


@pytest.mark.asyncio
async def test_add_and_delete_routes(ns: str, dev: TunDevice) -> None:
    dev.add_routes(["100.100.0.0/16", "fd7a:115c:a1e0:ab12::/64"])
    dev.add_routes(["100.100.0.0/16"])  # replace: idempotent
    routes = netconf.link_routes(TUN_NAME, netns=ns)
    assert {"100.100.0.0/16", "fd7a:115c:a1e0:ab12::/64"} <= set(routes)
    dev.del_routes(["100.100.0.0/16"])
    assert "100.100.0.0/16" not in netconf.link_routes(TUN_NAME, netns=ns)
    with pytest.raises(TunError, match="not a route prefix"):
        dev.add_routes(["100.100.0.1/16"])


# --- read path: host → device ------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [4, 6])
async def test_read_path(ns: str, dev: TunDevice, version: int) -> None:
    col = Collector()
    dev.start(asyncio.get_running_loop(), col)
    body = b"hello over tun v%d" % version
    await acall_in_netns(ns, send_udp, version, 9999, [body])
    (pkt,) = await col.wait_for(udp_to(version, 9999, body))
    p = Parsed()
    assert parse_into(pkt, p) == version and p.length == len(pkt)


@pytest.mark.asyncio
async def test_read_batches_are_bounded(ns: str, dev: TunDevice) -> None:
    col = Collector()
    dev.start(asyncio.get_running_loop(), col)
    bodies = [b"n%03d" % i for i in range(100)]
    # Blocking the loop while the namespace thread sends queues all 100 in the kernel, so the
    # reader must drain them in more than one bounded batch.
    call_in_netns(ns, send_udp, 4, 9000, bodies)
    p = Parsed()

    def ours(pkt: bytes) -> bool:
        return parse_into(pkt, p) == 4 and p.proto == PROTO_UDP and p.dst_port == 9000

    got = await col.wait_for(ours, count=100)
    assert sorted(bytes(payload(x, p)) for x in got if parse_into(x, p)) == bodies
    assert max(len(b) for b in col.batches) == READ_BATCH


# --- write path: device → host -----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [4, 6])
async def test_write_path_kernel_checks_checksums(ns: str, dev: TunDevice, version: int) -> None:
    loop = asyncio.get_running_loop()
    sock = await acall_in_netns(ns, bound_udp, version)
    try:
        port = sock.getsockname()[1]
        src, dst = ip_to_int(PEER[version])[1], ip_to_int(LOCAL[version])[1]
        bad = bytearray(build_udp(version, src, dst, 40000, port, b"corrupted"))
        bad[-1] ^= 0xFF  # payload no longer matches the UDP checksum: the kernel must drop it
        good = [build_udp(version, src, dst, 40000 + i, port, b"good%d" % i) for i in range(3)]
        dev.write_many([bytes(bad), *good])
        assert dev.write_errors == 0
        for i in range(3):
            data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 2048), TIMEOUT)
            assert data == b"good%d" % i
            assert ip_to_int(addr[0]) == (version, src) and addr[1] == 40000 + i
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_write_garbage_is_counted_not_raised(dev: TunDevice) -> None:
    dev.write_many([b"\x00" * 20, b""])  # not IPv4/IPv6: the kernel refuses each write
    assert dev.write_errors == 2 and dev.last_write_errno != 0


# --- teardown and errors -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_close_removes_link(ns: str) -> None:
    d = TunDevice.create(TUN_NAME, addresses=ADDRS, routes=ROUTES, netns=ns)
    d.start(asyncio.get_running_loop(), lambda batch: None)
    assert netconf.get_link(TUN_NAME, netns=ns) is not None
    d.close()
    d.close()  # idempotent
    assert d.fd == -1 and d.closed
    await poll(lambda: netconf.get_link(TUN_NAME, netns=ns) is None, "link deleted on close")
    d.write_many([b"x"])
    assert d.write_errors == 1


@pytest.mark.asyncio
async def test_failed_setup_leaves_nothing(ns: str, dev: TunDevice) -> None:
    with pytest.raises(TunError, match=TUN_NAME) as ei:
        TunDevice.create(TUN_NAME, netns=ns)  # name taken inside the namespace
    assert "\n" not in str(ei.value)

    def tun_links() -> list[str]:
        out = run_in_netns(ns, ["ip", "-o", "link", "show"], check=True).stdout
        return [line.split(":")[1].strip() for line in out.splitlines() if "lo:" not in line]

    await poll(lambda: tun_links() == [TUN_NAME], "only the first TUN left")


def test_bad_input_errors_are_one_line() -> None:
    with pytest.raises(TunError, match="at most 15"):
        TunDevice.create("x" * 16)
    with pytest.raises(TunError, match="not a valid interface name"):
        TunDevice.create("a/b")
    with pytest.raises(TunError, match="MTU"):
        TunDevice.create("natest9", mtu=10)
    skip_unless_netns(tun=True)
    with pytest.raises(TunError, match="does not exist") as ei:
        TunDevice.create("natest9", netns="no-such-ns-natest")
    assert "no-such-ns-natest" in str(ei.value)
    with make_netns("natun") as name:
        with pytest.raises(TunError, match="MTU >= 1280"):
            TunDevice.create("natest9", mtu=1000, addresses=[f"{LOCAL[6]}/128"], netns=name)
        with pytest.raises(TunError, match="not an IP address"):
            TunDevice.create("natest9", addresses=["100.64.0.300/32"], netns=name)


# --- the namespace toolkit ---------------------------------------------------------------------


def test_make_netns_removed_even_on_failure() -> None:
    skip_unless_netns()
    seen = ""
    with pytest.raises(RuntimeError, match="boom"):
        with make_netns("natk") as name:
            seen = name
            assert os.path.exists(os.path.join(NETNS_DIR, name))
            raise RuntimeError("boom")
    assert seen.startswith(f"natk{os.getpid()}-")
    assert not os.path.exists(os.path.join(NETNS_DIR, seen))


def _send_from(fam: int, src: str, dst: str, port: int) -> None:
    with socket.socket(fam, socket.SOCK_DGRAM) as tx:
        tx.bind((src, 0))
        tx.sendto(b"across", (dst, port))


def test_veth_in_netns_and_processes() -> None:
    skip_unless_netns()
    home = current_netns_inode()
    with make_netns("natka") as a, make_netns("natkb") as b:
        veth_pair(a, b, ["100.64.1.1/24", "fd7a:115c:a1e0:1::1/64"],
                  ["100.64.1.2/24", "fd7a:115c:a1e0:1::2/64"])
        for fam, src, dst in ((socket.AF_INET, "100.64.1.1", "100.64.1.2"),
                              (socket.AF_INET6, "fd7a:115c:a1e0:1::1", "fd7a:115c:a1e0:1::2")):
            with in_netns(b):
                assert current_netns_inode() == netns_inode(b)
                rx = socket.socket(fam, socket.SOCK_DGRAM)
            assert current_netns_inode() == home
            try:
                rx.bind((dst, 0))  # the socket lives in b, so b's address binds
                rx.settimeout(TIMEOUT)
                call_in_netns(a, _send_from, fam, src, dst, rx.getsockname()[1])
                data, addr = rx.recvfrom(100)
                assert data == b"across" and addr[0] == src
            finally:
                rx.close()
        r = run_in_netns(a, ["ip", "-o", "addr", "show", "dev", "veth-a"])
        assert r.returncode == 0 and "100.64.1.1/24" in r.stdout
        proc = popen_in_netns(b, ["sleep", "60"], stdout=subprocess.DEVNULL)
    # Leaving make_netns killed what still ran inside.
    assert proc.wait(timeout=TIMEOUT) != 0
    assert not os.path.exists(os.path.join(NETNS_DIR, a))
