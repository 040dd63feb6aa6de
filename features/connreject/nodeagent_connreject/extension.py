"""The connreject extension: one instance per LocalBackend.

It registers itself and nothing more yet; the aggregator, its data-plane callbacks and its
endpoints arrive with the connreject issue.
"""

from __future__ import annotations

from typing import Any

from nodeagent.ipnext import hookimpl


class ConnRejectExtension:
    def __init__(self) -> None:
        self.backend: Any = None

    @hookimpl
    def nodeagent_extension_init(self, backend: Any) -> None:
        self.backend = backend

    @hookimpl
    def nodeagent_extension_shutdown(self, backend: Any) -> None:
        self.backend = None
