"""The fast-start guard in front of aiohttp: which request heads count as a DERP upgrade."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.feature("derper")


@pytest.mark.parametrize(("head", "want"), [
    (b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n", True),
    (b"GET /derp?x=1 HTTP/1.1\r\nupgrade:  derp \r\n\r\n", True),
    (b"GET /derp HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", False),
    (b"GET /derp/probe HTTP/1.1\r\nUpgrade: DERP\r\n\r\n", False),
    (b"POST /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\n\r\n", False),
    (b"\xff\x00garbage\r\n\r\n", False),
])
def test_is_derp_upgrade(head: bytes, want: bool) -> None:
    from nodeagent_derper.server_sniff import _is_derp_upgrade

    assert _is_derp_upgrade(head) is want


class _Inner:
    def __init__(self) -> None:
        self.data = b""

    def connection_made(self, t: object) -> None:
        pass

    def data_received(self, d: bytes) -> None:
        self.data += d


class _Srv:
    def __init__(self) -> None:
        self.held: dict[object, object] = {}


def test_sniff_holds_bytes_after_derp_head_and_passes_others() -> None:
    from nodeagent_derper.server_sniff import SniffProtocol

    srv, inner = _Srv(), _Inner()
    p = SniffProtocol(srv, inner)  # type: ignore[arg-type]
    p.connection_made("transport")  # type: ignore[arg-type]
    head = b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n"
    p.data_received(head[:10])
    p.data_received(head[10:] + b"\x02\x00")
    p.data_received(b"\x00\x00")
    assert inner.data == head and srv.held["transport"] is p
    assert p.take() == b"\x02\x00\x00\x00"
    srv2, inner2 = _Srv(), _Inner()
    q = SniffProtocol(srv2, inner2)  # type: ignore[arg-type]
    q.connection_made("t")  # type: ignore[arg-type]
    q.data_received(b"GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
    q.data_received(b"more")
    assert inner2.data == b"GET / HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\nmore" and not srv2.held
