"""nodeagent feature derper: a DERP relay server wire-compatible with Tailscale's, and stunc.

Registered through the ``nodeagent.features`` entry point; it adds ``nodeagent derper`` to the
CLI. The relay runs as its own process (``derper``), not inside the agent.
"""

from nodeagent.ipnext import Feature
from nodeagent_derper import cli_plugin

DESCRIPTION = "DERP relay server (STUN, TLS with Let's Encrypt, /debug/ metrics) and stunc"

FEATURE = Feature(name="derper", description=DESCRIPTION, extension=None, cli=cli_plugin)
