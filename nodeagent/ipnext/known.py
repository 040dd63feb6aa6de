"""Names of the optional features the core knows exist, so it can answer "not installed".

This is the only place the core mentions a feature, and only by name and install command. The
command fits how this nodeagent was installed (the features are on no package index): from a
source tree, pip installs the feature's directory; from a wheel file, the wheelhouse beside it;
otherwise the extra, from the wheelhouse built as the README says.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass(frozen=True)
class KnownFeature:
    name: str
    localapi: tuple[str, ...] = ()  # LocalAPI endpoint names under /localapi/v0/
    c2n: tuple[str, ...] = ()  # c2n paths
    cli: tuple[tuple[str, ...], ...] = ()  # CLI command paths

    @property
    def install(self) -> str:
        return install_command(self.name)


KNOWN_FEATURES: dict[str, KnownFeature] = {
    "connreject": KnownFeature(
        "connreject",
        localapi=("debug-rejects",),
        c2n=("/debug/rejects",),
        cli=(("debug", "rejects"), ("web",)),
    ),
    "derper": KnownFeature("derper", cli=(("derper",), ("derpprobe",))),
}


@lru_cache(maxsize=1)
def _origin() -> tuple[str, Path | None, bool]:
    """How the core was installed: ("tree", dir, editable), ("wheel", dir, False) or
    ("index", None, False): the tree this module runs from, else pip's ``direct_url.json``."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "features").is_dir():
        return "tree", root, True
    try:
        raw = metadata.distribution("nodeagent").read_text("direct_url.json")
        info = json.loads(raw) if raw else {}
    except (metadata.PackageNotFoundError, ValueError, OSError):
        info = {}
    url = urlparse(str(info.get("url", "")))
    path = Path(unquote(url.path)) if url.scheme == "file" else None
    if path is not None and isinstance(info.get("dir_info"), dict):
        return "tree", path, bool(info["dir_info"].get("editable"))
    if path is not None and path.suffix == ".whl":
        return "wheel", path.parent, False
    return "index", None, False


def install_command(*names: str) -> str:
    """One shell command that installs the named features into this nodeagent's environment."""
    kind, where, editable = _origin()
    if kind == "tree" and where is not None:
        dirs = [where / "features" / n for n in names]
        if all((d / "pyproject.toml").is_file() for d in dirs):
            flag = "-e " if editable else ""
            return "pip install " + " ".join(flag + shlex.quote(str(d)) for d in dirs)
    extra = shlex.quote(f"nodeagent[{','.join(names)}]")
    if kind == "wheel" and where is not None and all(
            any(where.glob(f"nodeagent_{n}-*.whl")) for n in names):
        return f"pip install --find-links {shlex.quote(str(where))} {extra}"
    return f"pip install --find-links DIR {extra} (DIR: the wheelhouse nodeagent came from)"


def not_installed_message(name: str) -> str:
    return f"feature {name} is not installed; install it with: {KNOWN_FEATURES[name].install}"


def feature_for_localapi(endpoint: str) -> KnownFeature | None:
    for f in KNOWN_FEATURES.values():
        if endpoint in f.localapi:
            return f
    return None


def feature_for_c2n(path: str) -> KnownFeature | None:
    for f in KNOWN_FEATURES.values():
        if path in f.c2n:
            return f
    return None
