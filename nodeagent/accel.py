"""Which data-path loops run compiled: the optional C accelerator ``nodeagent._accel`` or none.

``ACCEL`` is the accelerator module when it was built (``setup.py``: an optional extension, so an
install without a compiler or OpenSSL headers still works) and ``NODEAGENT_NO_ACCEL`` is not
``1``; otherwise ``None`` and every caller runs its pure-Python path. The choice is made once, at
import: the hot paths load one module attribute, never the environment.
"""

from __future__ import annotations

import os
from types import ModuleType

NO_ACCEL_ENV = "NODEAGENT_NO_ACCEL"


def _load() -> ModuleType | None:
    if os.environ.get(NO_ACCEL_ENV, "") == "1":
        return None
    try:
        from nodeagent import _accel  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _accel


ACCEL: ModuleType | None = _load()


def describe() -> str:
    """One line for logs and metrics: which path is in use and why."""
    if ACCEL is not None:
        return "compiled (nodeagent._accel)"
    if os.environ.get(NO_ACCEL_ENV, "") == "1":
        return f"pure Python ({NO_ACCEL_ENV}=1)"
    return "pure Python (nodeagent._accel not built)"
