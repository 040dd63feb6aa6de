"""WireGuard over UDP: the asyncio adapter around the sans-IO WireGuard core.

One non-blocking UDP socket per node (IPv6 dual-stack when the host has IPv6, so IPv4 peers
appear as v4-mapped addresses; IPv4-only otherwise). Reads are drained in batches from the event
loop's reader callback and the decrypted packets of one batch go to the engine together; sends
go straight to the socket (a full socket buffer drops and counts, as UDP would). Where the kernel
offers them, UDP GSO and GRO (``udpbatch``) cut the syscalls per datagram. A timer drives the
protocol's timers (handshake retries, keepalives, rekeys, expiry).

A peer's endpoint is the first of its configured ones that ``tailcfg.check_endpoint`` accepts
(and the socket's family can reach); the others are ignored with one log line per
``configure``. With a path router attached (:meth:`WireGuardTransport.set_router`, magicsock),
peers the router wants (those with a disco key) get a ``magicsock.endpoint.PeerRef`` as their
WireGuard endpoint and no roaming: the router decides per packet between a direct UDP address
and DERP. Datagrams that are not WireGuard (disco, STUN) go to the router, and packets the
router received over DERP come back through :meth:`WireGuardTransport.receive_external`.

Sending never raises: a destination the socket refuses outright drops the
datagrams to it (counted as ``bad_destination``, logged once per destination) and the rest of
the batch still goes out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from nodeagent.engine.core import PeerConfig, PeerState
from nodeagent.engine.udpbatch import (
    GRO_CMSG_SPACE,
    BadDestination,
    UdpOffload,
    gro_segment_size,
    gso_groups,
)
from nodeagent.engine.wireguard import PeerSpec, WGConfig, WireGuardCore
from nodeagent.engine.wireguard import messages as msg
from nodeagent.keys import NODE_PREFIX, parse_public
from nodeagent.magicsock.endpoint import DerpAddr, PeerRef
from nodeagent.tailcfg import check_endpoint

log = logging.getLogger("nodeagent.wireguard")

READ_BATCH = 128
TICK_INTERVAL = 0.25
RECV_SIZE = 65535
SOCKET_BUFFER = 4 << 20
MAX_BAD_DESTINATIONS_LOGGED = 64  # distinct bad destinations logged (each once) per transport
HANDSHAKE_TYPES = {msg.MSG_INITIATION: "initiation", msg.MSG_RESPONSE: "response",
                   msg.MSG_COOKIE_REPLY: "cookie_reply"}

Deliver = Callable[[str, list[bytes]], None]  # (peer key text, plaintext packets)


class PathRouter(Protocol):
    """Chooses paths for the peers it wants (magicsock's adapter implements this)."""

    def wants(self, peer: PeerConfig) -> bool: ...
    def configure(self, peers: list[PeerConfig]) -> None: ...
    def send_wg(self, node_key: bytes, segs: list[bytes]) -> None: ...
    def send_derp(self, dst: DerpAddr, segs: list[bytes]) -> None: ...
    def on_udp_other(self, data: bytes, src: tuple[str, int]) -> None: ...
    def peer_path(self, node_key: bytes) -> tuple[bool, str]: ...  # (has a path, CurAddr)


class WireGuardTransport:
    def __init__(self, private_key: bytes, *, port: int = 41641, bind: str = "",
                 config: WGConfig | None = None, udp_offload: bool | None = None) -> None:
        self.core = WireGuardCore(private_key, config=config or WGConfig())
        self.requested_port = port
        self.bind = bind
        self.sock: socket.socket | None = None
        self._udp_offload = udp_offload  # None: the NODEAGENT_UDP_OFFLOAD environment decides
        self.offload: UdpOffload | None = None
        self._v6 = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._deliver: Deliver | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._keys: dict[str, bytes] = {}  # "nodekey:hex" → raw public key
        self._names: dict[bytes, str] = {}
        self.counters = {"rx_datagrams": 0, "tx_datagrams": 0, "send_errors": 0,
                         "no_endpoint": 0, "bad_destination": 0}
        self._bad_logged: set[str] = set()
        self.router: PathRouter | None = None
        self._routed: set[bytes] = set()  # raw keys of peers whose paths the router chooses

    def set_router(self, router: PathRouter | None) -> None:
        """Attach the path chooser before the first ``configure``."""
        self.router = router

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self.loop = loop
        self._deliver = deliver
        self.sock = self._open_socket()
        self.offload = UdpOffload(self.sock, enabled=self._udp_offload)
        loop.add_reader(self.sock.fileno(), self._readable)
        self._timer = loop.call_later(TICK_INTERVAL, self._tick)

    def _open_socket(self) -> socket.socket:
        try:
            if self.bind and ":" not in self.bind:
                raise OSError("an IPv4 bind address takes an IPv4 socket")
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._v6 = True
            bind = self.bind or "::"
        except OSError:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._v6 = False
            bind = self.bind or "0.0.0.0"
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            s.bind((bind, self.requested_port))
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"WireGuard UDP port {self.requested_port}: {e.strerror}"
                          ) from None
        s.setblocking(False)
        return s

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1] if self.sock is not None else 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    # --- configuration ---------------------------------------------------------------------
    def configure(self, peers: list[PeerConfig]) -> None:
        specs = []
        keys: dict[str, bytes] = {}
        bad: list[str] = []
        router = self.router
        routed: set[bytes] = set()
        for p in peers:
            try:
                raw = parse_public(p.key, NODE_PREFIX)
            except ValueError as e:
                log.error("peer %s: %s", p.name or p.key, e)
                continue
            keys[p.key] = raw
            if router is not None and router.wants(p):
                routed.add(raw)
                specs.append(PeerSpec(raw, endpoint=PeerRef(raw), roaming=False))
                continue
            specs.append(PeerSpec(raw, endpoint=self._endpoint(p.endpoints, bad)))
        if router is not None:
            router.configure([p for p in peers if p.key in keys])
        self._routed = routed
        if bad:
            log.warning("ignored %d invalid peer endpoint(s), first: %s", len(bad), bad[0])
        self._keys = keys
        self._names = {v: k for k, v in keys.items()}
        self.core.set_peers(specs)

    def _endpoint(self, endpoints: list[str], bad: list[str]) -> tuple[str, int] | None:
        """The first usable endpoint as a socket address; the reasons for skipped invalid ones
        go to ``bad``."""
        for ep in endpoints:
            try:
                host, port = check_endpoint(ep)
            except ValueError as e:
                bad.append(str(e))
                continue
            if ":" in host and not self._v6:  # IPv6 from an IPv4-only socket
                continue
            return self._sockaddr(host, port)
        return None

    def _sockaddr(self, host: str, port: int) -> tuple[str, int]:
        if self._v6 and ":" not in host:
            return (f"::ffff:{host}", port)
        return (host, port)

    # --- data path -------------------------------------------------------------------------
    def send(self, peer_key: str, pkts: list[bytes]) -> None:
        raw = self._keys.get(peer_key)
        if raw is None:
            return
        self._sendto(self.core.encrypt(raw, pkts))

    def _sendto(self, out: list[tuple[Any, bytes]]) -> None:
        sock, offload = self.sock, self.offload
        if sock is None or offload is None:
            return
        counters = self.counters
        router = self.router
        sent = 0
        for ep, segs in gso_groups(out):
            if ep is None:
                counters["no_endpoint"] += len(segs)
                continue
            if router is not None:
                if type(ep) is PeerRef:
                    router.send_wg(ep.key, segs)
                    continue
                if type(ep) is DerpAddr:
                    router.send_derp(ep, segs)
                    continue
            failed, loud = offload.send(sock, ep, segs)
            sent += len(segs) - failed
            if failed:
                if isinstance(loud, BadDestination):
                    counters["bad_destination"] += failed
                    self._log_bad_destination(loud)
                    continue
                counters["send_errors"] += failed
                if loud is not None:
                    log.warning("UDP send to %s: %s", ep, loud)
        counters["tx_datagrams"] += sent

    def send_udp(self, host: str, port: int, segs: list[bytes]) -> None:
        """Send datagrams to a real UDP address (the router's direct path, disco, STUN)."""
        self._sendto([(self._sockaddr(host, port), s) for s in segs])

    def receive_external(self, data: bytes, src: Any) -> None:
        """A WireGuard datagram that arrived another way (DERP): same path as UDP."""
        self.receive_external_batch([(data, src)])

    def receive_external_batch(self, items: list[tuple[bytes, Any]]) -> None:
        """WireGuard datagrams that arrived another way, decrypted and delivered together."""
        to_send: list[tuple[Any, bytes]] = []
        plain: list[tuple[bytes, bytes]] = []
        by_peer: dict[bytes, list[bytes]] = {}
        core = self.core
        for data, src in items:
            core.receive_buffer(data, 0, src, to_send, plain, by_peer)
        if to_send:
            self._sendto(to_send)
        if plain or by_peer:
            self._deliver_plain(plain, by_peer)

    def _log_bad_destination(self, e: BadDestination) -> None:
        text = str(e)
        if text in self._bad_logged or len(self._bad_logged) >= MAX_BAD_DESTINATIONS_LOGGED:
            return
        self._bad_logged.add(text)
        log.warning("UDP send dropped: %s", text)

    def _readable(self) -> None:
        sock, offload = self.sock, self.offload
        if sock is None or offload is None:
            return
        gro = offload.gro
        to_send: list[tuple[Any, bytes]] = []
        plain: list[tuple[bytes, bytes]] = []
        by_peer: dict[bytes, list[bytes]] = {}
        core = self.core
        receive_buffer = core.receive_buffer
        n = gro_buffers = 0
        router = self.router
        for _ in range(READ_BATCH):
            try:
                if gro:
                    data, anc, _flags, src = sock.recvmsg(RECV_SIZE, GRO_CMSG_SPACE)
                    seg = gro_segment_size(anc) if anc else 0
                    if not 0 < seg < len(data):
                        seg = 0
                    else:
                        gro_buffers += 1  # one buffer holding a run of datagrams from one source
                else:
                    data, src = sock.recvfrom(RECV_SIZE)
                    seg = 0
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # ICMP errors surface here on Linux; nothing to do with them
            ep = src[:2]
            # WireGuard messages start with a type 1-4 and three zero bytes; anything else
            # (disco, STUN) belongs to the path router.
            n += receive_buffer(data, seg, ep, to_send, plain, by_peer,
                                None if router is None else partial(_to_router, router, ep))
        self.counters["rx_datagrams"] += n
        offload.counters["gro_buffers"] += gro_buffers
        if to_send:
            self._sendto(to_send)
        if plain or by_peer:
            self._deliver_plain(plain, by_peer)

    def _deliver_plain(self, plain: list[tuple[bytes, bytes]],
                       by_peer: dict[bytes, list[bytes]] | None = None) -> None:
        """Hand decrypted packets to the data path, one call per peer. ``by_peer`` (from the
        compiled run) is extended with ``plain`` (from ``receive_into``) in place."""
        deliver = self._deliver
        if deliver is None:
            return
        if by_peer is None:
            by_peer = {}
        for key, pkt in plain:
            lst = by_peer.get(key)
            if lst is None:
                by_peer[key] = [pkt]
            else:
                lst.append(pkt)
        for key, pkts in by_peer.items():
            name = self._names.get(key)
            if name is not None:
                deliver(name, pkts)

    def _tick(self) -> None:
        self._timer = None
        try:
            self._sendto(self.core.tick())
        finally:
            if self.loop is not None and self.sock is not None:
                self._timer = self.loop.call_later(TICK_INTERVAL, self._tick)

    # --- introspection ---------------------------------------------------------------------
    def peer_state(self, peer_key: str) -> PeerState:
        raw = self._keys.get(peer_key)
        if raw is None:
            return PeerState()
        try:
            st = self.core.peer_stats(raw)
        except KeyError:
            return PeerState()
        last_hs = float(st.get("last_handshake") or 0.0)
        ep = st.get("endpoint")
        fresh = bool(last_hs) and time.time() - last_hs < 180
        if raw in self._routed and self.router is not None:
            has_path, cur = self.router.peer_path(raw)
            return PeerState(
                configured=True, reachable=fresh or has_path, last_handshake=last_hs,
                last_rx=float(st.get("last_rx") or last_hs),
                rx_bytes=int(st.get("rx_bytes") or 0), tx_bytes=int(st.get("tx_bytes") or 0),
                cur_addr=cur)
        return PeerState(
            configured=True,
            # A peer counts as reachable with a recent handshake, or while we still have an
            # endpoint to try (the 5 s pending-open timer is shorter than a handshake retry).
            reachable=fresh or ep is not None,
            last_handshake=last_hs,
            last_rx=float(st.get("last_rx") or last_hs),
            rx_bytes=int(st.get("rx_bytes") or 0),
            tx_bytes=int(st.get("tx_bytes") or 0),
            cur_addr=_render(ep),
        )

    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        s: list[tuple[str, str, dict[str, str], float]] = [
            ("nodeagent_wireguard_rx_datagrams_total", "UDP datagrams received", {},
             self.counters["rx_datagrams"]),
            ("nodeagent_wireguard_tx_datagrams_total", "UDP datagrams sent", {},
             self.counters["tx_datagrams"]),
            ("nodeagent_wireguard_send_errors_total", "UDP sends that failed", {},
             self.counters["send_errors"]),
            ("nodeagent_wireguard_bad_destination_total",
             "UDP datagrams dropped because their destination address was unusable", {},
             self.counters["bad_destination"]),
        ]
        s += [("nodeagent_wireguard_handshake_messages_sent_total",
               "WireGuard handshake messages sent, by type", {"type": name},
               self.core.handshakes_sent[t]) for t, name in HANDSHAKE_TYPES.items()]
        off = self.offload
        if off is not None:
            s += [
                ("nodeagent_wireguard_udp_gso_sends_total",
                 "sendmsg calls that carried several datagrams (UDP GSO)", {},
                 off.counters["gso_sends"]),
                ("nodeagent_wireguard_udp_gso_fallbacks_total",
                 "UDP GSO sends the kernel refused, resent one datagram at a time", {},
                 off.counters["gso_fallbacks"]),
                ("nodeagent_wireguard_udp_gro_buffers_total",
                 "received buffers that held several datagrams (UDP GRO)", {},
                 off.counters["gro_buffers"]),
                ("nodeagent_wireguard_udp_offload", "UDP offloads in use (1) or not (0)",
                 {"kind": "gso"}, float(off.gso)),
                ("nodeagent_wireguard_udp_offload", "UDP offloads in use (1) or not (0)",
                 {"kind": "gro"}, float(off.gro)),
            ]
        for reason, n in sorted(self.core.drops.items()):
            s.append(("nodeagent_wireguard_dropped_total",
                      "WireGuard messages dropped, by reason", {"reason": reason}, n))
        return s


def _to_router(router: PathRouter, ep: tuple[str, int], data: bytes) -> None:
    router.on_udp_other(data, _unmap(ep))


def _unmap(addr: tuple[str, int]) -> tuple[str, int]:
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:], addr[1]
    return addr[0], addr[1]


def _render(ep: Any) -> str:
    if not ep:
        return ""
    host, port = ep[0], ep[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
