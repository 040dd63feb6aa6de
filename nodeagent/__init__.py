"""nodeagent: a hackable node agent for WireGuard mesh networks.

The core distribution owns the agent (LocalBackend, LocalAPI, data plane, control client); features
such as connreject and derper are separate distributions that plug in through ``nodeagent.ipnext``.
"""

from nodeagent.version import CAPABILITY_VERSION, __version__

__all__ = ["CAPABILITY_VERSION", "__version__"]
