"""Prometheus view of a :class:`DerpServer`'s counters, read only when scraped.

The relay keeps plain integers on its hot path; this collector turns them into metric families
named after Tailscale's ``derp_*`` expvars (counters get prometheus_client's ``_total`` suffix).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from nodeagent_derper.server import DerpServer


class DerpCollector:
    def __init__(self, srv: DerpServer) -> None:
        self._srv = srv

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._srv
        st = s.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"derp_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"derp_{name}", doc, value=value)

        yield gauge("current_connections", "current DERP connections",
                    st["current_connections"])
        yield gauge("current_home_connections", "connections that sent NotePreferred(true)",
                    st["current_home_connections"])
        yield gauge("clients", "distinct client keys connected", st["clients_total"])
        yield gauge("current_dup_client_keys", "keys with several connections",
                    st["current_dup_client_keys"])
        yield gauge("current_dup_client_conns", "connections of duplicated keys",
                    st["current_dup_client_conns"])
        yield gauge("watchers", "mesh watchers", st["watchers"])
        for name, doc in (
            ("accepts", "DERP connections accepted"),
            ("websocket_accepts", "DERP-over-WebSocket connections accepted"),
            ("total_dup_client_conns", "duplicate-key connections ever"),
            ("packets_received", "packets received from clients"),
            ("bytes_received", "packet bytes received from clients"),
            ("packets_sent", "packets sent to clients"),
            ("bytes_sent", "packet bytes sent to clients"),
            ("packets_forwarded_in", "packets received from mesh peers"),
            ("packets_forwarded_out", "packets forwarded to mesh peers"),
            ("got_ping", "Ping frames received"),
            ("sent_pong", "Pong frames sent"),
            ("peer_gone_disconnected_frames", "PeerGone(disconnected) frames sent"),
            ("peer_gone_not_here_frames", "PeerGone(not here) frames sent"),
            ("unknown_frames", "frames of unknown or unexpected type ignored"),
            ("home_moves_in", "connections becoming home after their first 5 s"),
            ("home_moves_out", "connections ceasing to be home after their first 5 s"),
            ("rate_limit_waits", "times a client's reading paused for its rate limit"),
            ("mesh_key_refusals", "logins refused for presenting a wrong mesh key"),
        ):
            yield counter(name, doc, st[name])
        kind = CounterMetricFamily("derp_packets_received_kind", "received packets by kind",
                                   labels=["kind"])
        kind.add_metric(["disco"], s.disco_received)
        kind.add_metric(["other"], s.packets_received - s.disco_received)
        yield kind
        pk = CounterMetricFamily("derp_packets_dropped", "packets dropped",
                                 labels=["reason", "kind"])
        by = CounterMetricFamily("derp_bytes_dropped", "packet bytes dropped",
                                 labels=["reason", "kind"])
        for (reason, k), (n, b) in s.drops.items():
            pk.add_metric([reason, k], n)
            by.add_metric([reason, k], b)
        yield pk
        yield by
        closed = CounterMetricFamily("derp_conns_closed", "connections closed by reason",
                                     labels=["reason"])
        for reason, n in sorted(s.closed_reasons.items()):
            closed.add_metric([reason], n)
        yield closed
        if s.rate:
            yield gauge("rate_limit_per_client_bytes_per_second", "per-client receive rate",
                        s.rate)
            yield gauge("rate_limit_per_client_burst_bytes", "per-client receive burst",
                        s.rate_burst)
