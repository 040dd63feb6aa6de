"""Version facts of the core: the package version and the control capability version."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("nodeagent")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

# 139: the client understands the `debug-conn-reject` node attribute and serves
# `GET /debug/rejects` over c2n (Tailscale's connreject branch numbering).
CAPABILITY_VERSION = 139
