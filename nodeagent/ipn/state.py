"""The persisted state file: machine key, node key, disco key, prefs and the control login.

Written atomically (temp file in the same directory, fsync, rename, fsync of the directory) with
mode 0600. A corrupt or unreadable file raises :class:`StateError` with one line naming the file:
the agent refuses to start rather than silently minting a new identity.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.keys import KeyPair

STATE_FILE_NAME = "nodeagent.state"
STATE_FORMAT = 1


class StateError(Exception):
    """The state file exists but cannot be used; the message is one line naming the file."""


@dataclass
class PersistedState:
    machine_key: KeyPair
    node_key: KeyPair
    disco_key: KeyPair
    prefs: dict[str, Any] = field(default_factory=dict)
    login: dict[str, Any] = field(default_factory=dict)  # control-issued identity (NodeID, ...)

    @classmethod
    def fresh(cls) -> PersistedState:
        return cls(KeyPair.generate(), KeyPair.generate(), KeyPair.generate())


def _key(raw: dict[str, Any], name: str, path: Path) -> KeyPair:
    v = raw.get(name)
    if not isinstance(v, str):
        raise StateError(f"state file {path}: missing or invalid {name!r}")
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise StateError(f"state file {path}: {name!r} is not hex") from None
    if len(b) != 32:
        raise StateError(f"state file {path}: {name!r} must be 32 bytes")
    return KeyPair(b)


class StateStore:
    """Loads and saves :class:`PersistedState` in ``state_dir/nodeagent.state``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE_NAME

    def load_or_create(self) -> PersistedState:
        if not self.path.exists():
            st = PersistedState.fresh()
            self.save(st)
            return st
        return self.load()

    def load(self) -> PersistedState:
        p = self.path
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StateError(f"state file {p}: not UTF-8 text (corrupt?)") from None
        except OSError as e:
            raise StateError(f"state file {p}: cannot read: {e.strerror or e}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise StateError(
                f"state file {p}: corrupt (invalid JSON at line {e.lineno} column {e.colno}); "
                "move it aside to start with a new identity"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise StateError(f"state file {p}: not a nodeagent state file of format {STATE_FORMAT}")
        prefs = raw.get("prefs", {})
        login = raw.get("login", {})
        if not isinstance(prefs, dict) or not isinstance(login, dict):
            raise StateError(f"state file {p}: 'prefs' and 'login' must be objects")
        return PersistedState(
            machine_key=_key(raw, "machine_key", p),
            node_key=_key(raw, "node_key", p),
            disco_key=_key(raw, "disco_key", p),
            prefs=prefs,
            login=login,
        )

    def save(self, st: PersistedState) -> None:
        data = {
            "format": STATE_FORMAT,
            "machine_key": st.machine_key.private.hex(),
            "node_key": st.node_key.private.hex(),
            "disco_key": st.disco_key.private.hex(),
            "prefs": st.prefs,
            "login": st.login,
        }
        blob = (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".nodeagent.state.", dir=self.dir)
        except OSError as e:
            raise StateError(f"state dir {self.dir}: cannot write: {e.strerror or e}") from None
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StateError(f"state file {self.path}: cannot write: {e.strerror or e}") from None
