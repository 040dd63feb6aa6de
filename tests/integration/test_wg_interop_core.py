"""Interop of the sans-IO WireGuard core with wireguard-go, the reference userspace implementation.

Topology (both namespaces unique to the test, removed afterwards):

    ns "ours": UDP socket 100.64.x.1:port + WireGuardCore (tunnel address 100.96.0.1)
        │ veth 100.64.x.0/30
    ns "theirs": wireguard-go interface, tunnel address 100.96.0.2/24, the kernel answers pings

Our side speaks IP through the core by hand: it builds ICMP echo requests (and replies to the
echo requests the kernel in the other namespace sends), so the test proves handshakes initiated
from each side, decryption both ways, a rekey, and replay rejection against the real protocol.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from nodeagent.engine.wireguard import PeerSpec, WGConfig, WireGuardCore, generate_private_key
from nodeagent.engine.wireguard import public_key as wg_public_key
from nodeagent.packet import PROTO_ICMP, build_icmp_echo, icmp_echo_id, icmp_echo_seq, parse
from nodeagent.packet import payload as packet_payload
from nodeagent.packet.parsed import ICMP4_ECHO_REPLY, ICMP4_ECHO_REQUEST
from tests.netns import (
    create_netns,
    in_netns,
    netns_available,
    popen_in_netns,
    remove_netns,
    run_in_netns,
    veth_pair,
)
from tests.wgnet import wireguard_go_binaries

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _missing() -> str | None:
    for tool in ("wireguard-go", "wg", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages wireguard-go, wireguard-tools)"
    reason = netns_available()
    if reason:
        return reason
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (wireguard-go needs TUN)"
    return None


_skip = _missing()
if _skip:
    pytestmark.append(pytest.mark.skip(reason=_skip))

OUR_TUN = "100.96.0.1"
THEIR_TUN = "100.96.0.2"
WG_PORT = 51820


def _ip4(s: str) -> int:
    return int.from_bytes(socket.inet_aton(s), "big")


@dataclass
class Rig:
    core: WireGuardCore
    sock: socket.socket
    their_pub: bytes
    their_ep: tuple[str, int]
    ns_theirs: str
    iface: str
    got: list[bytes]  # decrypted packets
    raw_in: list[bytes]  # every datagram received (for replay tests)

    def send(self, items: list[tuple[Any, bytes | bytearray]]) -> None:
        for ep, data in items:
            self.sock.sendto(data, ep)

    def pump(self, until: Callable[[], bool], timeout: float = 10.0,
             on_packet: Callable[[bytes], None] | None = None) -> bool:
        """Receive, feed the core, send what it says, run its timers; stop when ``until()``."""
        deadline = time.monotonic() + timeout
        next_tick = 0.0
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return False
            if now >= next_tick:
                self.send(self.core.tick())
                next_tick = now + 0.1
            self.sock.settimeout(min(0.1, max(0.001, deadline - now)))
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.raw_in.append(data)
            res = self.core.receive(data, src)
            self.send(res.to_send)
            for _key, pkt in res.plaintexts:
                self.got.append(pkt)
                if on_packet is not None:
                    on_packet(pkt)
        return True

    def wg_show(self, what: str) -> str:
        r = run_in_netns(self.ns_theirs, ["wg", "show", self.iface, what])
        return r.stdout


def _echo_request(seq: int, data: bytes = b"nodeagent-wg-interop") -> bytes:
    return build_icmp_echo(4, _ip4(OUR_TUN), _ip4(THEIR_TUN), 0x4E41, seq, data)


def _is_reply(pkt: bytes, seq: int) -> bool:
    p = parse(pkt)
    return (p.proto == PROTO_ICMP and p.icmp_type == ICMP4_ECHO_REPLY
            and icmp_echo_id(pkt, p) == 0x4E41 and icmp_echo_seq(pkt, p) == seq
            and bytes(packet_payload(pkt, p)) == b"nodeagent-wg-interop")


def _answer_pings(rig: Rig) -> Callable[[bytes], None]:
    """Reply to echo requests from the other side, as our host's stack would."""
    def on_packet(pkt: bytes) -> None:
        p = parse(pkt)
        if p.proto == PROTO_ICMP and p.icmp_type == ICMP4_ECHO_REQUEST and p.dst_ip == _ip4(
                OUR_TUN):
            reply = build_icmp_echo(4, p.dst_ip, p.src_ip, icmp_echo_id(pkt, p),
                                    icmp_echo_seq(pkt, p), packet_payload(pkt, p), reply=True)
            rig.send(rig.core.encrypt(rig.their_pub, [reply]))
    return on_packet


WG_BINARIES = wireguard_go_binaries()  # upstream (../shared/tools) and Debian's, where present


@pytest.fixture(params=sorted(WG_BINARIES) or ["debian"])
def rig_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Rig]]:
    """Rigs against each wireguard-go binary present (modern upstream and Debian's)."""
    binary = WG_BINARIES.get(request.param, "wireguard-go")
    made: list[tuple[str, ...]] = []
    socks: list[socket.socket] = []
    procs: list[subprocess.Popen[Any]] = []
    uapi: list[str] = []
    tmp = tempfile.TemporaryDirectory(prefix="wgi")

    def make(config: WGConfig | None = None, keepalive: int = 0) -> Rig:
        ns_ours = create_netns("wgo")
        made.append((ns_ours,))
        ns_theirs = create_netns("wgt")
        made.append((ns_theirs,))
        octet = secrets.randbelow(250) + 1
        our_addr, their_addr = f"100.64.{octet}.1", f"100.64.{octet}.2"
        veth_pair(ns_ours, ns_theirs, f"{our_addr}/30", f"{their_addr}/30")
        iface = "wgi" + secrets.token_hex(4)  # UAPI socket paths are global: name must be unique
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
        proc = popen_in_netns(ns_theirs, [binary, iface], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        sock_path = f"/var/run/wireguard/{iface}.sock"
        uapi.append(sock_path)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock_path):
            assert proc.poll() is None, "wireguard-go exited at start"
            assert time.monotonic() < deadline, "wireguard-go did not create its UAPI socket"
            time.sleep(0.02)  # polling for a file another process creates; no event exists

        with in_netns(ns_ours):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        socks.append(sock)
        sock.bind((our_addr, 0))
        our_port = sock.getsockname()[1]

        our_priv = generate_private_key()
        their_priv = generate_private_key()
        their_pub = wg_public_key(their_priv)
        keyfile = os.path.join(tmp.name, f"{iface}.key")
        with open(keyfile, "w") as f:
            f.write(_b64(their_priv))
        os.chmod(keyfile, 0o600)
        cmd = ["wg", "set", iface, "listen-port", str(WG_PORT), "private-key", keyfile,
               "peer", _b64(wg_public_key(our_priv)), "allowed-ips", f"{OUR_TUN}/32",
               "endpoint", f"{our_addr}:{our_port}"]
        if keepalive:
            cmd += ["persistent-keepalive", str(keepalive)]
        for argv in (cmd, ["ip", "addr", "add", f"{THEIR_TUN}/24", "dev", iface],
                     ["ip", "link", "set", iface, "up"]):
            r = run_in_netns(ns_theirs, argv)
            assert r.returncode == 0, f"{argv}: {r.stderr}"

        core = WireGuardCore(our_priv, config=config)
        core.set_peers([PeerSpec(their_pub, endpoint=(their_addr, WG_PORT))])
        return Rig(core, sock, their_pub, (their_addr, WG_PORT), ns_theirs, iface, [], [])

    try:
        yield make
    finally:
        for s in socks:
            s.close()
        for p in procs:  # a clean exit lets wireguard-go remove its UAPI socket
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        for (name,) in reversed(made):
            remove_netns(name)
        for path in uapi:
            if os.path.exists(path):
                os.unlink(path)
        tmp.cleanup()


def _b64(key: bytes) -> str:
    import base64
    return base64.b64encode(key).decode()


def test_we_initiate_and_ping_their_kernel(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.send(rig.core.encrypt(rig.their_pub, [_echo_request(1)]))
    assert rig.pump(lambda: any(_is_reply(p, 1) for p in rig.got)), (
        f"no echo reply; drops={rig.core.drops} wg={rig.wg_show('latest-handshakes')}")
    # a second ping over the established session, and wireguard-go saw the handshake
    rig.send(rig.core.encrypt(rig.their_pub, [_echo_request(2)]))
    assert rig.pump(lambda: any(_is_reply(p, 2) for p in rig.got))
    assert rig.core.counters["handshakes"] == 1
    assert rig.core.handshakes_sent[1:3] == [1, 0], rig.core.handshakes_sent  # we initiated
    stats = rig.core.peer_stats(rig.their_pub)
    assert stats["has_session"] and stats["rx_bytes"] > 0 and stats["tx_bytes"] > 0
    handshake_time = int(rig.wg_show("latest-handshakes").split()[1])
    assert handshake_time > 0


def test_they_initiate_and_we_answer_their_ping(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    ping = popen_in_netns(rig.ns_theirs, ["ping", "-c", "3", "-i", "0.2", "-W", "5", OUR_TUN],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ok = rig.pump(lambda: ping.poll() is not None, timeout=30,
                  on_packet=_answer_pings(rig))
    out = ping.communicate(timeout=5)[0] if ok else ""
    assert ok and ping.returncode == 0, f"ping failed: {out!r} drops={rig.core.drops}"
    assert "3 received" in out
    assert rig.core.counters["handshakes"] == 1
    # wireguard-go initiated: we answered with a response and never sent an initiation.
    assert rig.core.handshakes_sent[1:3] == [0, 1], rig.core.handshakes_sent
    requests = [p for p in rig.got if parse(p).icmp_type == ICMP4_ECHO_REQUEST]
    assert len(requests) >= 3


def test_replayed_data_from_wireguard_go_is_dropped(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.send(rig.core.encrypt(rig.their_pub, [_echo_request(7)]))
    assert rig.pump(lambda: any(_is_reply(p, 7) for p in rig.got))
    data = [d for d in rig.raw_in if d[0] == 4 and len(d) > 32]
    assert data, "no transport data from wireguard-go"
    before = rig.core.drops["replay"]
    res = rig.core.receive(data[-1], rig.their_ep)
    assert res.plaintexts == [] and rig.core.drops["replay"] == before + 1


def test_rekey_with_short_timers_keeps_traffic_flowing(rig_factory: Callable[..., Rig]) -> None:
    # rekey after 2 s; wireguard-go accepts a new initiation once its own rate limit allows
    cfg = WGConfig(rekey_after_time=2.0, rekey_timeout=1.0, keepalive_timeout=1.0)
    rig = rig_factory(config=cfg)
    seq = 0
    deadline = time.monotonic() + 30
    while rig.core.counters["handshakes"] < 3 and time.monotonic() < deadline:
        seq += 1
        rig.send(rig.core.encrypt(rig.their_pub, [_echo_request(seq)]))
        assert rig.pump(lambda s=seq: any(_is_reply(p, s) for p in rig.got), timeout=5), (
            f"echo {seq} lost; drops={rig.core.drops}")
        rig.pump(lambda: False, timeout=0.3)
    assert rig.core.counters["handshakes"] >= 3, "no rekey happened"
    assert rig.core.drops["decrypt_failed"] == 0 and rig.core.drops["handshake_failed"] == 0
