"""The SQLite store: persistence across reopen and stable address allocation."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest

from nodeagent.control.store import (
    AuthKeyRecord,
    NodeRecord,
    SQLiteStore,
    StoreError,
    ipv6_for,
    next_free_ipv4,
)


def _node(store: SQLiteStore, mkey: str, nkey: str, name: str) -> NodeRecord:
    v4, v6 = store.addresses_for(mkey)
    return store.add_node(NodeRecord(id=0, machine_key=mkey, node_key=nkey, name=name,
                                     hostname=name, user="u", ipv4=v4, ipv6=v6,
                                     tags=["tag:x"], endpoints=["1.2.3.4:5"]))


def test_nodes_keys_addresses_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    s = SQLiteStore(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    a = _node(s, "aa" * 32, "11" * 32, "a")
    b = _node(s, "bb" * 32, "22" * 32, "b")
    k = s.add_authkey(AuthKeyRecord(id=0, key_hash="h", prefix="nakey-", user="u",
                                    reusable=True, tags=["tag:x"]))
    s.set_setting("server_key", "00" * 32)
    s.close()
    s = SQLiteStore(path)
    assert [n.name for n in s.list_nodes()] == ["a", "b"]
    got = s.node_by_machine("bb" * 32)
    assert got == b
    assert s.node_by_node_key("11" * 32) == a
    assert s.authkey_by_hash("h") == k
    assert s.get_setting("server_key") == "00" * 32
    assert (a.ipv4, b.ipv4) == ("100.64.0.1", "100.64.0.2")


def test_addresses_stable_per_machine_even_after_delete(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "c.db")
    a = _node(s, "aa" * 32, "11" * 32, "a")
    _node(s, "bb" * 32, "22" * 32, "b")
    s.delete_node(a.id)
    assert s.get_node(a.id) is None
    c = _node(s, "cc" * 32, "33" * 32, "c")
    assert c.ipv4 == "100.64.0.3"  # a's address stays reserved for a's machine
    a2 = _node(s, "aa" * 32, "44" * 32, "a2")
    assert (a2.ipv4, a2.ipv6) == (a.ipv4, a.ipv6)


def test_update_node(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "c.db")
    a = _node(s, "aa" * 32, "11" * 32, "a")
    a.node_key, a.endpoints, a.last_seen = "55" * 32, ["9.9.9.9:1"], 12.5
    s.update_node(a)
    assert s.node_by_node_key("55" * 32) == a
    assert s.node_by_node_key("11" * 32) is None


def test_allocation_skips_reserved_and_used() -> None:
    assert next_free_ipv4(set()) == "100.64.0.1"
    assert next_free_ipv4({"100.64.0.1", "100.64.0.2"}) == "100.64.0.3"
    used = {f"100.64.0.{i}" for i in range(1, 256)}
    assert next_free_ipv4(used) == "100.64.1.1"  # .0 of each /24 is skipped
    assert ipv6_for("100.64.0.1") == "fd7a:115c:a1e0::6440:1"


def test_allocation_skips_quad100() -> None:
    pool = ipaddress.IPv4Network("100.100.100.0/22")
    assert next_free_ipv4(set(), pool) == "100.100.101.1"


def test_exhaustion_is_an_error() -> None:
    pool = ipaddress.IPv4Network("100.64.0.0/29")
    used = {f"100.64.0.{i}" for i in range(1, 7)}
    assert next_free_ipv4(used - {"100.64.0.6"}, pool) == "100.64.0.6"
    with pytest.raises(StoreError, match="exhausted"):
        next_free_ipv4(used, pool)
