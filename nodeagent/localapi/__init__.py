"""The LocalAPI: Tailscale-compatible HTTP over a Unix socket (/localapi/v0/...)."""
