"""magicsock: which path a peer's WireGuard packets take — a direct UDP address found by disco
pings, or the peer's home DERP region — and the discovery that upgrades and keeps it.

``core`` and ``endpoint`` are sans-IO; ``conn`` is the asyncio adapter joining them to the
WireGuard UDP socket and the DERP connections. Importing this package loads neither.
"""
