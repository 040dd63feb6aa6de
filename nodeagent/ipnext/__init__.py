"""The extension framework: hookspecs, the per-backend extension host, feature discovery.

A feature is a distribution that declares an entry point in the group ``nodeagent.features``
naming a :class:`Feature`. Each LocalBackend builds its own ``pluggy.PluginManager`` and asks every
feature's factory for a fresh extension object, so two backends in one process share no state.
"""

from nodeagent.ipnext.feature import ENTRY_POINT_GROUP, Feature, InstalledFeature, discover
from nodeagent.ipnext.hookspecs import BackendSpec, CLISpec, hookimpl, hookspec
from nodeagent.ipnext.host import ExtensionHost
from nodeagent.ipnext.known import KNOWN_FEATURES, KnownFeature, not_installed_message

__all__ = [
    "ENTRY_POINT_GROUP",
    "KNOWN_FEATURES",
    "BackendSpec",
    "CLISpec",
    "ExtensionHost",
    "Feature",
    "InstalledFeature",
    "KnownFeature",
    "discover",
    "hookimpl",
    "hookspec",
    "not_installed_message",
]
