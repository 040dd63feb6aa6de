"""Shared pytest configuration: feature markers and small fixtures used across the suite.

``@pytest.mark.feature("connreject")`` skips a test when that feature is not installed (the
``core`` and ``omit-connreject`` tox envs); ``@pytest.mark.omitted("connreject")`` marks tests that
prove a feature's absence and skips them where it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from hypothesis import settings

# CI: fixed examples (a submission's result must not depend on the draw) and no per-example
# deadline (a loaded 2-core machine is slow, not wrong). Locally the search stays random, which is
# where new counterexamples get found.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# Hooks run strictly under test: an exception (a failed assertion) inside an extension's hook
# propagates to the test instead of disabling the extension quietly. Tests of the isolation
# itself build their backend with strict_hooks=False.
os.environ.setdefault("NODEAGENT_STRICT_HOOKS", "1")


def feature_installed(name: str) -> bool:
    return importlib.util.find_spec(f"nodeagent_{name}") is not None


# Which features this environment must have: tox sets it per env (comma separated; empty for
# none), so a feature that failed to install cannot turn its tests into silent skips, and a loop
# over the installed features cannot pass by running zero times where it should not.
EXPECT_FEATURES_ENV = "NODEAGENT_EXPECT_FEATURES"


def expected_features() -> set[str] | None:
    """The feature names ``NODEAGENT_EXPECT_FEATURES`` lists, or ``None`` when it is unset (a
    plain development run, where whatever is installed is fine)."""
    raw = os.environ.get(EXPECT_FEATURES_ENV)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for m in item.iter_markers(name="feature"):
        name = m.args[0]
        if not feature_installed(name):
            pytest.skip(f"feature {name} is not installed in this environment")
    for m in item.iter_markers(name="omitted"):
        name = m.args[0]
        if feature_installed(name):
            pytest.skip(f"feature {name} is installed; this test proves its absence")


@pytest_asyncio.fixture
async def agent() -> AsyncIterator[object]:
    """An in-process agent (no data plane) on a LocalAPI socket in a temp dir others can reach."""
    from nodeagent.agent import Agent, AgentOptions
    from tests.agentutil import public_tempdir

    d = public_tempdir()
    a = Agent(AgentOptions(socket=os.path.join(d, "run", "na.sock"),
                           state_dir=os.path.join(d, "state")))
    await a.start()
    try:
        yield a
    finally:
        await a.stop()
        shutil.rmtree(d, ignore_errors=True)

