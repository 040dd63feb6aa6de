"""The userspace engine: WireGuard (sans-IO core, UDP adapter), peer routing, pendopen tracking."""
