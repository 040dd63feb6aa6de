"""Persistent state of the coordination server: nodes, pre-auth keys, addresses, settings.

Owns the ``Store`` protocol (the one seam a server database would replace) and its embedded
SQLite implementation, plus tailnet address allocation. Addresses belong to a *machine key*: a
machine that logs in again, or is deleted and re-registered, gets the same IPv4 and IPv6 address
back. IPv6 addresses embed the IPv4 address in the last 32 bits of ``fd7a:115c:a1e0::/48`` so the
two stay in step. Node keys of nodes an admin deleted are kept as *revoked* (persistently), so a
replayed or stale registration cannot bring such a node back. The store is synchronous and local;
calls are short and made from the event loop thread.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
ULA = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
# Never handed out: the quad-100 service address and ChromeOS's VM range, as Tailscale does.
_RESERVED = (ipaddress.IPv4Network("100.100.100.0/24"), ipaddress.IPv4Network("100.115.92.0/23"))


class StoreError(Exception):
    """The store cannot do what was asked (e.g. the address space is exhausted)."""


@dataclass
class NodeRecord:
    id: int
    machine_key: str  # 64 hex
    node_key: str  # 64 hex
    name: str  # unique DNS label
    hostname: str
    user: str
    ipv4: str
    ipv6: str
    disco_key: str = ""
    tags: list[str] = field(default_factory=list)
    created: float = 0.0
    key_expiry: float = 0.0  # 0 = never
    last_seen: float = 0.0
    endpoints: list[str] = field(default_factory=list)
    home_derp: int = 0
    ephemeral: bool = False
    os: str = ""

    def expired(self, now: float | None = None) -> bool:
        return bool(self.key_expiry) and self.key_expiry <= (time.time() if now is None else now)


@dataclass
class AuthKeyRecord:
    id: int
    key_hash: str
    prefix: str  # first characters of the secret, to tell keys apart in listings
    user: str
    reusable: bool = False
    ephemeral: bool = False
    tags: list[str] = field(default_factory=list)
    created: float = 0.0
    expires: float = 0.0  # 0 = never
    used: int = 0
    revoked: bool = False


class Store(Protocol):
    def get_setting(self, name: str) -> str | None: ...
    def set_setting(self, name: str, value: str) -> None: ...
    def list_nodes(self) -> list[NodeRecord]: ...
    def get_node(self, node_id: int) -> NodeRecord | None: ...
    def node_by_machine(self, machine_key: str) -> NodeRecord | None: ...
    def node_by_node_key(self, node_key: str) -> NodeRecord | None: ...
    def add_node(self, rec: NodeRecord) -> NodeRecord: ...
    def update_node(self, rec: NodeRecord) -> None: ...
    def delete_node(self, node_id: int) -> None: ...
    def addresses_for(self, machine_key: str) -> tuple[str, str]: ...
    def revoke_node_key(self, node_key: str, when: float) -> None: ...
    def node_key_revoked(self, node_key: str) -> bool: ...
    def add_authkey(self, rec: AuthKeyRecord) -> AuthKeyRecord: ...
    def authkey_by_hash(self, key_hash: str) -> AuthKeyRecord | None: ...
    def update_authkey(self, rec: AuthKeyRecord) -> None: ...
    def list_authkeys(self) -> list[AuthKeyRecord]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS addresses (
  machine_key TEXT PRIMARY KEY, ipv4 TEXT NOT NULL UNIQUE, ipv6 TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS nodes (
  id INTEGER PRIMARY KEY AUTOINCREMENT, machine_key TEXT NOT NULL UNIQUE,
  node_key TEXT NOT NULL UNIQUE, name TEXT NOT NULL UNIQUE, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS authkeys (
  id INTEGER PRIMARY KEY AUTOINCREMENT, key_hash TEXT NOT NULL UNIQUE, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS revoked_node_keys (node_key TEXT PRIMARY KEY, revoked REAL NOT NULL);
"""

_NODE_COLS = ("id", "machine_key", "node_key", "name")


class SQLiteStore:
    """The embedded store: one SQLite file, created 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fresh = not self.path.exists()
        self.db = sqlite3.connect(self.path, isolation_level=None)
        if fresh:
            os.chmod(self.path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # settings
    def get_setting(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, name: str, value: str) -> None:
        self.db.execute("INSERT INTO settings(name, value) VALUES(?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value=excluded.value", (name, value))

    # nodes
    @staticmethod
    def _node(row: tuple[int, str, str, str, str]) -> NodeRecord:
        data = json.loads(row[4])
        return NodeRecord(id=row[0], machine_key=row[1], node_key=row[2], name=row[3], **data)

    @staticmethod
    def _node_data(rec: NodeRecord) -> str:
        d = {k: v for k, v in rec.__dict__.items() if k not in _NODE_COLS}
        return json.dumps(d)

    def _one(self, where: str, arg: object) -> NodeRecord | None:
        row = self.db.execute(f"SELECT id, machine_key, node_key, name, data FROM nodes "
                              f"WHERE {where}=?", (arg,)).fetchone()
        return None if row is None else self._node(row)

    def list_nodes(self) -> list[NodeRecord]:
        rows = self.db.execute("SELECT id, machine_key, node_key, name, data FROM nodes "
                               "ORDER BY id").fetchall()
        return [self._node(r) for r in rows]

    def get_node(self, node_id: int) -> NodeRecord | None:
        return self._one("id", node_id)

    def node_by_machine(self, machine_key: str) -> NodeRecord | None:
        return self._one("machine_key", machine_key)

    def node_by_node_key(self, node_key: str) -> NodeRecord | None:
        return self._one("node_key", node_key)

    def add_node(self, rec: NodeRecord) -> NodeRecord:
        cur = self.db.execute(
            "INSERT INTO nodes(machine_key, node_key, name, data) VALUES(?, ?, ?, ?)",
            (rec.machine_key, rec.node_key, rec.name, self._node_data(rec)))
        rec.id = int(cur.lastrowid or 0)
        return rec

    def update_node(self, rec: NodeRecord) -> None:
        self.db.execute("UPDATE nodes SET machine_key=?, node_key=?, name=?, data=? WHERE id=?",
                        (rec.machine_key, rec.node_key, rec.name, self._node_data(rec), rec.id))

    def delete_node(self, node_id: int) -> None:
        self.db.execute("DELETE FROM nodes WHERE id=?", (node_id,))

    # addresses
    def addresses_for(self, machine_key: str) -> tuple[str, str]:
        """The machine's addresses, allocating the lowest free pair on first use."""
        row = self.db.execute("SELECT ipv4, ipv6 FROM addresses WHERE machine_key=?",
                              (machine_key,)).fetchone()
        if row is not None:
            return row[0], row[1]
        used = {r[0] for r in self.db.execute("SELECT ipv4 FROM addresses")}
        v4 = next_free_ipv4(used)
        v6 = ipv6_for(v4)
        self.db.execute("INSERT INTO addresses(machine_key, ipv4, ipv6) VALUES(?, ?, ?)",
                        (machine_key, v4, v6))
        return v4, v6

    # revoked node keys
    def revoke_node_key(self, node_key: str, when: float) -> None:
        self.db.execute("INSERT OR IGNORE INTO revoked_node_keys(node_key, revoked) "
                        "VALUES(?, ?)", (node_key, when))

    def node_key_revoked(self, node_key: str) -> bool:
        return self.db.execute("SELECT 1 FROM revoked_node_keys WHERE node_key=?",
                               (node_key,)).fetchone() is not None

    # auth keys
    @staticmethod
    def _key(row: tuple[int, str, str]) -> AuthKeyRecord:
        return AuthKeyRecord(id=row[0], key_hash=row[1], **json.loads(row[2]))

    @staticmethod
    def _key_data(rec: AuthKeyRecord) -> str:
        return json.dumps({k: v for k, v in rec.__dict__.items() if k not in ("id", "key_hash")})

    def add_authkey(self, rec: AuthKeyRecord) -> AuthKeyRecord:
        cur = self.db.execute("INSERT INTO authkeys(key_hash, data) VALUES(?, ?)",
                              (rec.key_hash, self._key_data(rec)))
        rec.id = int(cur.lastrowid or 0)
        return rec

    def authkey_by_hash(self, key_hash: str) -> AuthKeyRecord | None:
        row = self.db.execute("SELECT id, key_hash, data FROM authkeys WHERE key_hash=?",
                              (key_hash,)).fetchone()
        return None if row is None else self._key(row)

    def update_authkey(self, rec: AuthKeyRecord) -> None:
        self.db.execute("UPDATE authkeys SET data=? WHERE id=?", (self._key_data(rec), rec.id))

    def list_authkeys(self) -> list[AuthKeyRecord]:
        rows = self.db.execute("SELECT id, key_hash, data FROM authkeys ORDER BY id").fetchall()
        return [self._key(r) for r in rows]


def next_free_ipv4(used: set[str], pool: ipaddress.IPv4Network = CGNAT) -> str:
    """The lowest address of ``pool`` (skipping each /24's .0 and reserved ranges) not in
    ``used``."""
    taken = {int(ipaddress.IPv4Address(u)) for u in used}
    skip = [(int(n.network_address), int(n.broadcast_address)) for n in _RESERVED]
    a, last = int(pool.network_address) + 1, int(pool.broadcast_address) - 1
    while a <= last:
        for lo, hi in skip:
            if lo <= a <= hi:
                a = hi + 1
                break
        else:
            if a & 0xFF and a not in taken:
                return str(ipaddress.IPv4Address(a))
            a += 1
    raise StoreError(f"the tailnet address space {pool} is exhausted")


def ipv6_for(ipv4: str) -> str:
    return str(ipaddress.IPv6Address(int(ULA.network_address)
                                     | int(ipaddress.IPv4Address(ipv4))))
