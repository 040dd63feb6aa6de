"""The derper mesh's sans-IO parts: the remote-route table (which client keys live on which mesh
peer), ``--mesh-with`` entries (URLs, skipping oneself) and the flag's usage errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.feature("derper")

K1, K2, K3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def table():  # type: ignore[no-untyped-def]
    from nodeagent_derper.mesh import RouteTable

    return RouteTable()


def test_present_gone_and_peer_down() -> None:
    t = table()
    t.present("B", K1)
    t.present("B", K2)
    t.present("C", K3)
    assert t.lookup(K1) == "B" and t.lookup(K3) == "C" and len(t) == 3
    t.gone("C", K1)  # C never claimed K1: nothing changes
    assert t.lookup(K1) == "B"
    t.gone("B", K1)
    assert t.lookup(K1) is None and K1 not in t.best
    assert t.peer_down("B") == 1  # K2
    assert t.lookup(K2) is None and t.lookup(K3) == "C"
    assert t.count("B") == 0 and t.count("C") == 1
    assert t.peer_down("B") == 0


@pytest.mark.parametrize("present_first", [True, False])
def test_client_moving_between_peers_in_either_order(present_first: bool) -> None:
    """A client moves from node B to node A; the sender's node sees PeerPresent from A and
    PeerGone from B in either order and must end up routing to A."""
    t = table()
    t.present("B", K1)
    if present_first:
        t.present("A", K1)
        assert t.lookup(K1) == "A"
        t.gone("B", K1)
    else:
        t.gone("B", K1)
        assert t.lookup(K1) is None
        t.present("A", K1)
    assert t.lookup(K1) == "A" and t.claims(K1) == ["A"]


def test_key_on_two_peers_survives_one_leaving() -> None:
    t = table()
    t.present("B", K1)
    t.present("A", K1)  # newest claim wins
    assert t.lookup(K1) == "A"
    t.gone("A", K1)
    assert t.lookup(K1) == "B"  # still connected on B
    t.present("A", K1)
    t.peer_down("A")  # the connection to A broke: only A's claims go
    assert t.lookup(K1) == "B"
    t.present("B", K1)  # a repeated claim is not duplicated
    assert t.claims(K1) == ["B"]


ops = st.lists(st.tuples(st.sampled_from(["present", "gone", "down"]),
                         st.sampled_from(["A", "B", "C"]),
                         st.sampled_from([K1, K2, K3])), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_table_matches_a_simple_model(seq: list[tuple[str, str, bytes]]) -> None:
    """Against a model (per key, its claimants in claim order): ``best`` is always the latest
    live claim, and nothing is left behind once every claim is gone."""
    t = table()
    model: dict[bytes, list[str]] = {}
    for op, peer, key in seq:
        if op == "present":
            t.present(peer, key)
            lst = model.setdefault(key, [])
            if peer in lst:
                lst.remove(peer)
            lst.append(peer)
        elif op == "gone":
            t.gone(peer, key)
            if peer in model.get(key, []):
                model[key].remove(peer)
        else:
            t.peer_down(peer)
            for lst in model.values():
                if peer in lst:
                    lst.remove(peer)
        model = {k: v for k, v in model.items() if v}
        assert t.best == {k: v[-1] for k, v in model.items()}
        for p in ("A", "B", "C"):
            assert t.count(p) == sum(1 for v in model.values() if p in v)


def test_peer_urls_and_self_detection() -> None:
    from nodeagent_derper.mesh import is_self, peer_url

    assert peer_url("derp1.example.com") == "https://derp1.example.com/derp"
    assert peer_url("derp1.example.com:8443") == "https://derp1.example.com:8443/derp"
    assert peer_url("https://127.0.0.1:8443/derp") == "https://127.0.0.1:8443/derp"
    assert peer_url("http://127.0.0.1:3340") == "http://127.0.0.1:3340/derp"
    for bad in ("ftp://x/derp", "https:///derp", "host:99999"):
        with pytest.raises(ValueError):
            peer_url(bad)
    from nodeagent_derper.mesh import parse_entry

    assert parse_entry("derp1.example.com/10.0.0.1") == ("https://derp1.example.com/derp",
                                                         "10.0.0.1")
    assert parse_entry("127.0.0.1:8443") == ("https://127.0.0.1:8443/derp", None)
    for bad in ("a/b/c", "a/"):
        with pytest.raises(ValueError):
            parse_entry(bad)
    assert is_self("derp1.example.com/10.0.0.1", "derp1.example.com", "", 443)
    assert is_self("derp1.example.com", "derp1.example.com", "", 443)
    assert is_self("DERP1.example.com.", "derp1.example.com", "", 443)
    assert not is_self("derp2.example.com", "derp1.example.com", "", 443)
    assert is_self("https://127.0.0.1:8443/derp", "x", "127.0.0.1", 8443)
    assert is_self("https://127.0.0.1:8443/derp", "x", "", 8443)  # wildcard listener
    assert not is_self("https://127.0.0.1:8444/derp", "x", "127.0.0.1", 8443)
    assert not is_self("https://10.0.0.2:8443/derp", "x", "10.0.0.1", 8443)


def _opts(argv: list[str]):  # type: ignore[no-untyped-def]
    from nodeagent_derper.cli import build_parser, go_style, options_from_args

    p = build_parser()
    return options_from_args(p.parse_args(go_style(argv, p)))


def test_mesh_with_flag(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from nodeagent_derper.cli import UsageError

    monkeypatch.delenv("TAILSCALE_DERPER_MESH_KEY", raising=False)
    with pytest.raises(UsageError, match="--mesh-with needs the mesh key"):
        _opts(["--dev", "--mesh-with", "a.example.com"])
    psk = tmp_path / "psk"
    psk.write_text("ab" * 32 + "\n")
    o = _opts(["--dev", "-mesh-with", "a.example.com, https://127.0.0.1:1/derp,",
               "-mesh-psk-file", str(psk)])
    assert o.mesh_with == ["a.example.com", "https://127.0.0.1:1/derp"]
    assert o.mesh_key == "ab" * 32
    monkeypatch.setenv("TAILSCALE_DERPER_MESH_KEY", "cd" * 32)
    o = _opts(["--dev", "--mesh-with=b.example.com"])
    assert o.mesh_key == "cd" * 32 and o.mesh_with == ["b.example.com"]
    with pytest.raises(UsageError, match="mesh-with entry"):
        _opts(["--dev", "--mesh-with", "ftp://x/derp"])
