"""The Wrapper: sits between the TUN device and the engine and owns per-packet policy.

Outbound (host → peers): parse, drop TSMP from the host side, outbound filter (records flows so
replies pass), hand to the engine. Inbound (peers → host): parse, consume TSMP (rejects go to the
engine's handler, pings are answered), inbound filter; when the filter drops a new TCP connection
(IPv4 and IPv6) — or the first packet of a UDP flow, rate-limited — send the sender a TSMP reject
saying why (acl, or shields when shields-up caused it) and note an incoming observation.

The wrapper holds the packet filter in force. Filters are immutable: a policy push
(``set_filter``) or a shields-up change (``set_shields_up``, which installs the current filter's
shields twin) replaces the whole object with one attribute store, atomic under the GIL. Each batch
loads ``self.filter`` once, so it is judged by one filter from start to end; the flow table is
shared by successive filters, so replies to flows opened before a swap still pass after it.

The connection-rejection note site costs one attribute load and a ``None`` check when nothing is
installed: ``set_conn_reject_note(fn)`` is how a feature installs one. Counters are plain ints;
``metrics_samples()`` renders them for the LocalAPI.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from nodeagent.filter import ACCEPT, DROP_ACL, DROP_SHIELDS, Filter
from nodeagent.ipnext.api import NoteFn
from nodeagent.packet import (
    TSMP_REASON_ACL,
    TSMP_REASON_SHIELDS,
    TSMPReject,
    build_tsmp_pong_for,
    build_tsmp_reject,
    parse_into,
    parse_tsmp_reject,
)
from nodeagent.packet.parsed import (
    INVALID,
    PROTO_TCP,
    PROTO_TSMP,
    PROTO_UDP,
    TCP_ACK,
    TCP_SYN,
    UNKNOWN,
    Parsed,
)

PacketSink = Callable[[list[bytes]], None]

UDP_REJECT_INTERVAL = 1.0  # at most one TSMP reject per blocked UDP flow per second
UDP_REJECT_TABLE = 4096


class TunLike(Protocol):
    def start(self, loop: Any, on_packets: Callable[[list[bytes]], None]) -> None: ...
    def write_many(self, pkts: list[bytes]) -> None: ...
    def close(self) -> None: ...


class Wrapper:
    def __init__(self, tun: TunLike, filt: Filter, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.tun = tun
        self.filter = filt
        self.clock = clock
        self._note: NoteFn | None = None
        self._to_peers: PacketSink | None = None
        # Engine taps: pendopen sees accepted outbound packets and every inbound TCP packet.
        self.outbound_tap: Callable[[Parsed, bytes], None] | None = None
        self.inbound_tap: Callable[[Parsed], None] | None = None
        self.tsmp_reject_handler: Callable[[TSMPReject], None] | None = None
        self._p_out = Parsed()
        self._p_in = Parsed()
        self._udp_rejected: OrderedDict[tuple[int, int, int, int], float] = OrderedDict()
        self.counters: dict[str, int] = {
            "out_packets": 0, "in_packets": 0, "out_bytes": 0, "in_bytes": 0,
            "tsmp_rejects_sent": 0, "tsmp_rejects_received": 0, "tsmp_pings_answered": 0,
        }
        self.drops_out: dict[str, int] = {"invalid": 0, "tsmp_from_host": 0, "filter": 0,
                                          "no_engine": 0}
        self.drops_in: dict[str, int] = {"invalid": 0, "acl": 0, "shields": 0, "not_local": 0,
                                         "fragment": 0, "tsmp_other": 0, "filter": 0}

    # --- wiring ----------------------------------------------------------------------------
    def set_conn_reject_note(self, fn: NoteFn | None) -> None:
        self._note = fn

    def set_outbound_sink(self, sink: PacketSink | None) -> None:
        """Where packets from the host go once they pass the filter (the engine's router)."""
        self._to_peers = sink

    def set_filter(self, filt: Filter) -> None:
        """Install ``filt`` whole (one attribute store); the next batch is judged by it."""
        self.filter = filt

    def set_shields_up(self, on: bool) -> None:
        """Swap in the current filter with shields-up ``on``: the same rules, local addresses,
        flow table and counters, so only new inbound connections change fate (refused with a
        ``shields`` TSMP reject while up). Called on the loop thread, like ``set_filter``."""
        self.filter = self.filter.with_shields_up(on)

    def start(self, loop: Any) -> None:
        self.tun.start(loop, self.from_host)

    def close(self) -> None:
        self.tun.close()

    # --- host → peers ----------------------------------------------------------------------
    def from_host(self, pkts: list[bytes]) -> None:
        p = self._p_out
        filt = self.filter
        tap = self.outbound_tap
        out = []
        nbytes = 0
        for pkt in pkts:
            kind = parse_into(pkt, p)
            if kind == INVALID or kind == UNKNOWN:
                self.drops_out["invalid"] += 1
                continue
            if p.proto == PROTO_TSMP:
                # TSMP is between agents only; the host must never be able to forge it.
                self.drops_out["tsmp_from_host"] += 1
                continue
            if filt.check_out(p) != ACCEPT:
                self.drops_out["filter"] += 1
                continue
            if tap is not None:
                tap(p, pkt)
            out.append(pkt)
            nbytes += len(pkt)
        if out:
            self.counters["out_packets"] += len(out)
            self.counters["out_bytes"] += nbytes
            sink = self._to_peers
            if sink is None:
                self.drops_out["no_engine"] += len(out)
            else:
                sink(out)

    # --- peers → host ----------------------------------------------------------------------
    def from_peer(self, pkts: list[bytes]) -> None:
        """Decrypted packets from peers: TSMP handling, inbound filter, then the TUN."""
        p = self._p_in
        filt = self.filter
        tap = self.inbound_tap
        deliver = []
        nbytes = 0
        for pkt in pkts:
            kind = parse_into(pkt, p)
            if kind == INVALID or kind == UNKNOWN:
                self.drops_in["invalid"] += 1
                continue
            if p.proto == PROTO_TSMP:
                self._tsmp_in(pkt, p)
                continue
            verdict = filt.check_in(p)
            if verdict != ACCEPT:
                self._dropped_in(pkt, p, verdict)
                continue
            if tap is not None and p.proto == PROTO_TCP:
                tap(p)
            deliver.append(pkt)
            nbytes += len(pkt)
        if deliver:
            self.counters["in_packets"] += len(deliver)
            self.counters["in_bytes"] += nbytes
            self.tun.write_many(deliver)

    def write_to_host(self, pkts: list[bytes]) -> None:
        """Agent-made packets for the host (fast-failure RST / ICMP unreachable)."""
        self.tun.write_many(pkts)

    def _tsmp_in(self, pkt: bytes, p: Parsed) -> None:
        rej = parse_tsmp_reject(pkt, p)
        if rej is not None:
            self.counters["tsmp_rejects_received"] += 1
            h = self.tsmp_reject_handler
            if h is not None:
                h(rej)
            return
        pong = build_tsmp_pong_for(pkt, p)
        if pong is not None and self._to_peers is not None:
            self.counters["tsmp_pings_answered"] += 1
            self._to_peers([pong])
            return
        self.drops_in["tsmp_other"] += 1

    def _dropped_in(self, pkt: bytes, p: Parsed, verdict: int) -> None:
        if verdict == DROP_ACL:
            reason, code = "acl", TSMP_REASON_ACL
        elif verdict == DROP_SHIELDS:
            reason, code = "shields", TSMP_REASON_SHIELDS
        else:
            name = _DROP_NAMES.get(verdict, "filter")
            self.drops_in[name] = self.drops_in.get(name, 0) + 1
            return
        self.drops_in[reason] += 1
        if p.proto == PROTO_TCP:
            if (p.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN:
                return  # only a new connection gets told why
        elif p.proto == PROTO_UDP:
            if not self._udp_reject_due(p):
                return
        else:
            return
        sink = self._to_peers
        if sink is not None:
            self.counters["tsmp_rejects_sent"] += 1
            sink([build_tsmp_reject(p, code)])
        note = self._note
        if note is not None:
            note("incoming", p.proto, p.ip_version, p.src_ip, p.src_port, p.dst_ip, p.dst_port,
                 reason, "tsmp_sent", False)

    def _udp_reject_due(self, p: Parsed) -> bool:
        key = (p.src_ip, p.src_port, p.dst_ip, p.dst_port)
        now = self.clock()
        table = self._udp_rejected
        last = table.get(key)
        if last is not None and now - last < UDP_REJECT_INTERVAL:
            return False
        table[key] = now
        table.move_to_end(key)
        if len(table) > UDP_REJECT_TABLE:
            table.popitem(last=False)
        return True

    # --- introspection ---------------------------------------------------------------------
    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        s: list[tuple[str, str, dict[str, str], float]] = []
        for direction, drops in (("outbound", self.drops_out), ("inbound", self.drops_in)):
            for reason, n in drops.items():
                s.append(("nodeagent_tundev_dropped_packets_total",
                          "Packets dropped by the TUN wrapper, by direction and reason",
                          {"direction": direction, "reason": reason}, n))
        c = self.counters
        for direction in ("out", "in"):
            label = {"direction": "outbound" if direction == "out" else "inbound"}
            s.append(("nodeagent_tundev_packets_total", "Packets passed by the TUN wrapper",
                      label, c[f"{direction}_packets"]))
            s.append(("nodeagent_tundev_bytes_total", "Bytes passed by the TUN wrapper",
                      label, c[f"{direction}_bytes"]))
        for k in ("tsmp_rejects_sent", "tsmp_rejects_received", "tsmp_pings_answered"):
            s.append((f"nodeagent_{k}_total", f"TSMP: {k.replace('_', ' ')}", {}, c[k]))
        tun_samples: Any = getattr(self.tun, "metrics_samples", None)
        if tun_samples is not None:
            s.extend(tun_samples())
        return s


_DROP_NAMES: dict[int, str] = {}


def _init_drop_names() -> None:
    import nodeagent.filter as f

    for name in ("DROP_NOT_LOCAL", "DROP_INVALID", "DROP_FRAGMENT"):
        code = getattr(f, name, None)
        if code is not None:
            _DROP_NAMES[code] = name[len("DROP_"):].lower()


_init_drop_names()
