"""Lazy package exports: a package ``__init__`` names its public symbols without importing the
submodules that hold them, so importing a sans-IO codec never pulls in its asyncio client.

Use in a package ``__init__``::

    __getattr__, __dir__ = lazy_exports(__name__, {"Name": "submodule", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``names`` maps each exported name to the
    submodule (relative to ``package``) that defines it; a name is imported on first use and
    then cached in the package's namespace."""
    lazy = dict(names)

    def getattr_(name: str) -> Any:
        sub = lazy.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *lazy})

    return getattr_, dir_
