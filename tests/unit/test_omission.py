"""Proof that an absent feature leaves nothing behind (the ts_omit_connreject counterpart)."""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib import metadata

import pytest

from nodeagent.ipnext.feature import discover
from nodeagent.ipnext.known import KNOWN_FEATURES
from tests.conftest import EXPECT_FEATURES_ENV, expected_features, feature_installed


def installed_paths_mentioning(word: str) -> list[str]:
    """Every installed file of every distribution, plus every sys.path entry, naming ``word``."""
    hits = []
    for dist in metadata.distributions():
        for f in dist.files or []:
            if word in str(f):
                hits.append(f"{dist.metadata['Name']}: {f}")
    for entry in sys.path:
        if os.path.isdir(entry):
            hits.extend(os.path.join(entry, n) for n in os.listdir(entry) if word in n)
    return hits


def test_installed_features_are_the_ones_this_environment_expects() -> None:
    expected = expected_features()
    if expected is None:
        pytest.skip(f"{EXPECT_FEATURES_ENV} is not set (tox sets it per environment)")
    assert expected <= set(KNOWN_FEATURES), f"{EXPECT_FEATURES_ENV}: unknown feature names"
    assert {inst.feature.name for inst in discover()} == expected  # a broken one is left out
    assert {name for name in KNOWN_FEATURES if feature_installed(name)} == expected


@pytest.mark.parametrize("name", ["connreject", "derper"])
def test_absent_feature_has_no_module_or_files(name: str) -> None:
    if feature_installed(name):
        pytest.skip(f"feature {name} is installed here")
    assert importlib.util.find_spec(f"nodeagent_{name}") is None
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution(f"nodeagent-{name}")
    assert installed_paths_mentioning(f"nodeagent_{name}") == []
    core_files = [str(f) for f in metadata.distribution("nodeagent").files or []]
    assert not [f for f in core_files if name in f.replace("known.py", "")]


def test_core_never_imports_a_feature() -> None:
    root = os.path.dirname(importlib.util.find_spec("nodeagent").origin)  # type: ignore[arg-type]
    offenders = []
    for dirpath, _dirs, files in os.walk(root):
        for fn in files:
            if fn.endswith(".py"):
                text = open(os.path.join(dirpath, fn), encoding="utf-8").read()
                if "import nodeagent_" in text or "from nodeagent_" in text:
                    offenders.append(fn)
    assert offenders == []
