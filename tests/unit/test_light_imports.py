"""The sans-IO codecs import without their asyncio clients (nor asyncio/aiohttp at all).

Each check runs in a fresh interpreter: this test process has long since imported asyncio.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("asyncio", "aiohttp", "nodeagent.derp.client", "nodeagent.stun.client")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.split()


@pytest.mark.parametrize("code", [
    "import nodeagent.derp.frames, nodeagent.stun.codec",
    "import nodeagent.derp.conn",
    "from nodeagent.derp import frames as F; from nodeagent.stun import codec as C",
    # the packages' lazy re-exports of codec names stay light too
    "from nodeagent.derp import FrameError, FrameReader, DerpError, ClientConnection",
    "from nodeagent.stun import StunError, build_binding_request, parse_binding_response",
])
def test_codecs_import_without_asyncio(code: str) -> None:
    assert _loaded_after(code) == []


def test_client_names_still_reachable_from_the_packages() -> None:
    code = ("from nodeagent.derp import DerpClient\n"
            "from nodeagent.stun import stun_query, StunTimeout, DEFAULT_PORT\n"
            "import nodeagent.derp.client as c, nodeagent.derp.conn as s\n"
            "assert c.DerpError is s.DerpError and c.ReceivedPacket is s.ReceivedPacket\n"
            "assert DEFAULT_PORT == 3478")
    assert set(_loaded_after(code)) >= {"asyncio", "nodeagent.derp.client",
                                        "nodeagent.stun.client"}
