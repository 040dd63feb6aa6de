"""Prometheus metrics of the derper process outside the DERP relay itself.

Owns the STUN, listener, bootstrap-DNS and process/uptime metrics. They live in the same
``CollectorRegistry`` the ``DerpServer`` registers its relay metrics in, so ``/debug/varz``
renders one exposition. Label children are bound once here: the STUN path increments a
pre-resolved child per datagram instead of looking labels up.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from nodeagent.stun.codec import ACCEPTED_KINDS, DROP_REASONS

# rate_limited: an accepted binding request not answered because of the reply rate limits.
STUN_DISPOSITIONS = ("success", *DROP_REASONS, "rate_limited", "read_error", "write_error")


class DerperMetrics:
    """Metrics of one derper process, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, version: str = "") -> None:
        self.registry = registry
        self.start_time = time.time()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        info = Info("derper_build", "derper version", registry=registry)
        info.info({"version": version or "unknown"})
        Gauge("derper_uptime_seconds", "seconds since the derper started",
              registry=registry).set_function(lambda: time.time() - self.start_time)
        Gauge("derper_process_start_unix_time", "when the derper started (unix seconds)",
              registry=registry).set(self.start_time)

        stun = Counter("stun_requests", "STUN datagrams received, by disposition",
                       ["disposition"], registry=registry)
        self.stun = {d: stun.labels(disposition=d) for d in STUN_DISPOSITIONS}
        fam = Counter("stun_addrfamily", "STUN binding requests answered, by address family",
                      ["family"], registry=registry)
        self.stun_family = {f: fam.labels(family=f) for f in ("ipv4", "ipv6")}
        kinds = Counter("stun_binding_requests_by_client",
                        "STUN binding requests answered, by client kind "
                        "(tailnode = Tailscale's SOFTWARE attribute)",
                        ["kind"], registry=registry)
        self.stun_kind = {k: kinds.labels(kind=k) for k in ACCEPTED_KINDS}

        self.accepted = Counter("tls_listener_accepted_connections",
                                "connections accepted on the main listener", registry=registry)
        self.rejected = Counter("tls_listener_rejected_connections",
                                "connections closed at once by the accept rate limit",
                                registry=registry)
        self.rejected_pending = Counter(
            "derper_rejected_unauthenticated_connections",
            "connections closed at once: their source IP already had --max-pending-per-ip "
            "connections that had not logged in", registry=registry)
        self.accept_errors = Counter("derper_accept_errors",
                                     "failed accept() calls on the listeners (e.g. out of file "
                                     "descriptors)", registry=registry)
        self.bootstrap_dns_requests = Counter("bootstrap_dns_requests",
                                              "requests to /bootstrap-dns", registry=registry)
        self.acme_renewals = Counter("derper_acme_certificates_obtained",
                                     "certificates obtained from the ACME CA",
                                     registry=registry)
        self.acme_failures = Counter("derper_acme_failures",
                                     "failed ACME certificate orders", registry=registry)
        self.cert_reloads = Counter("derper_cert_reloads",
                                    "TLS certificate (re)loads from --certdir", registry=registry)
        self.cert_expiry = Gauge("derper_cert_not_after_unix_time",
                                 "expiry of the served TLS certificate (unix seconds)",
                                 registry=registry)
