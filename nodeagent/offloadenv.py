"""Environment switches for the kernel offloads the data plane uses.

``NODEAGENT_UDP_OFFLOAD`` (UDP GSO/GRO on the WireGuard socket) and ``NODEAGENT_TUN_OFFLOAD``
(IFF_VNET_HDR: joined TCP writes into the TUN device) are on unless set to 0/false/no/off, for
comparing with and without and for kernels or setups where an offload misbehaves.
``NODEAGENT_TUN_TSO`` (the kernel hands TSO segments to us to cut up) defaults to on when the
compiled accelerator (``nodeagent.accel``) cuts them and off on the pure-Python path, where
cutting and checksumming costs more than it saves (see benchmarks/engine_throughput.py).
"""

from __future__ import annotations

import os

UDP_OFFLOAD_ENV = "NODEAGENT_UDP_OFFLOAD"
TUN_OFFLOAD_ENV = "NODEAGENT_TUN_OFFLOAD"
TUN_TSO_ENV = "NODEAGENT_TUN_TSO"


def offload_enabled(var: str, default: bool = True) -> bool:
    value = os.environ.get(var, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return default
