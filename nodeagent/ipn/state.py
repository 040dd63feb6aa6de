"""The persisted state file: machine key, node key, disco key, prefs and the control login.

Written atomically (temp file ``.nodeagent.state.*`` in the same directory, fsync, rename, fsync
of the directory) with mode 0600. A corrupt or unreadable file, or one whose values have the wrong
types (prefs are checked as :class:`~nodeagent.ipn.prefs.Prefs` checks them), raises
:class:`StateError` with one line naming the file: the agent refuses to start rather than silently
minting a new identity. At start, temp files left by a write that never finished are removed, and
a state file that loads but is readable or writable by group or others is set back to 0600; each
is logged as one warning line. Extensions keep their own keys (``<feature>/<name>``) as separate
files under ``extensions/``, written the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.errors import UserError
from nodeagent.ipn.prefs import Prefs, PrefsError, check_hostname
from nodeagent.keys import KeyPair

STATE_FILE_NAME = "nodeagent.state"
TEMP_PREFIX = "." + STATE_FILE_NAME + "."
STATE_FORMAT = 1
EXTENSION_DIR = "extensions"  # extensions' own keys, one file each (Host.read_state/write_state)
EXTENSION_KEY = re.compile(r"[a-z0-9_-]{1,64}/[a-z0-9_-]{1,64}")

log = logging.getLogger("nodeagent.state")


class StateError(UserError):
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


def _some(names: list[str], limit: int = 5) -> str:
    """Up to ``limit`` names for a log line, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class StateStore:
    """Loads and saves :class:`PersistedState` in ``state_dir/nodeagent.state``."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE_NAME

    def load_or_create(self) -> PersistedState:
        """The state at start: stray temp files removed first, then the file loaded or made."""
        self.remove_stray_temp_files()
        if not self.path.exists():
            st = PersistedState.fresh()
            self.save(st)
            return st
        return self.load()

    def remove_stray_temp_files(self) -> list[str]:
        """Delete ``.nodeagent.state.*`` left by a crash mid-write; return the names removed.

        Only for use at start: a temp file of a write in progress would go too.
        """
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.startswith(TEMP_PREFIX))
        except OSError:
            return []  # no state dir yet, or unreadable: load/save report it
        removed: list[str] = []
        failed: list[str] = []
        for n in names:
            try:
                if not stat.S_ISREG(os.lstat(self.dir / n).st_mode):
                    continue  # not one of ours
                os.unlink(self.dir / n)
                removed.append(n)
            except FileNotFoundError:
                continue
            except OSError as e:
                failed.append(f"{n} ({e.strerror or e})")
        if removed:
            log.warning("state dir %s: removed %d temp file(s) left by an interrupted write: %s",
                        self.dir, len(removed), _some(removed))
        if failed:
            log.warning("state dir %s: cannot remove temp file(s) left by an interrupted write: %s",
                        self.dir, _some(failed))
        return removed

    def load(self) -> PersistedState:
        p = self.path
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block
        except OSError as e:
            raise StateError(f"state file {p}: cannot read: {e.strerror or e}") from None
        try:
            st = self._parse(fd)
            self._tighten_mode(fd)  # only once the file proved usable: a refusal stays one line
            return st
        finally:
            os.close(fd)

    def _tighten_mode(self, fd: int) -> None:
        """Set a state file open to group or others to 0600, with one warning line."""
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if not mode & 0o077:
            return
        try:
            os.fchmod(fd, 0o600)
        except OSError as e:
            log.warning("state file %s: has mode %04o (open to group or others) and cannot be "
                        "set to 0600: %s", self.path, mode, e.strerror or e)
            return
        log.warning("state file %s: had mode %04o (open to group or others); set to 0600",
                    self.path, mode)

    def _parse(self, fd: int) -> PersistedState:
        p = self.path
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateError(f"state file {p}: not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                text = f.read().decode("utf-8")
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
        except (ValueError, RecursionError):  # a huge number, or nesting deeper than Python's
            raise StateError(
                f"state file {p}: corrupt (a number too long or nesting too deep to read); "
                "move it aside to start with a new identity"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise StateError(f"state file {p}: not a nodeagent state file of format {STATE_FORMAT}")
        prefs = raw.get("prefs", {})
        login = raw.get("login", {})
        if not isinstance(prefs, dict) or not isinstance(login, dict):
            raise StateError(f"state file {p}: 'prefs' and 'login' must be objects")
        pins = login.get("server_keys", {})
        if not isinstance(pins, dict) or not all(isinstance(v, str) for v in pins.values()):
            raise StateError(f"state file {p}: 'login.server_keys' must be an object of strings")
        hostname = prefs.get("Hostname")
        if isinstance(hostname, str):
            try:
                check_hostname(hostname)
            except PrefsError as e:
                # Earlier versions stored any string here: keep the identity, drop the name.
                log.warning("state file %s: %s; using the OS hostname instead", p, e)
                prefs["Hostname"] = ""
        try:
            Prefs.from_dict(prefs)
        except PrefsError as e:
            raise StateError(f"state file {p}: corrupt prefs ({e}); fix the value or move the "
                             "file aside to start with a new identity") from None
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
        self._write_atomic(self.path, blob, "state file")

    def _write_atomic(self, path: Path, blob: bytes, what: str) -> None:
        """Write ``blob`` to ``path`` (mode 0600) so a crash leaves the old or the new bytes."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        except OSError as e:
            raise StateError(f"state dir {path.parent}: cannot write: {e.strerror or e}") from None
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StateError(f"{what} {path}: cannot write: {e.strerror or e}") from None

    # --- extensions' own keys ---------------------------------------------------------------

    def _extension_path(self, key: str) -> Path:
        if not EXTENSION_KEY.fullmatch(key):
            raise ValueError(f"state key {key!r}: want <feature>/<name> of lowercase letters, "
                             "digits, '-' and '_'")
        return self.dir / EXTENSION_DIR / key.replace("/", ".")

    def read_extension(self, key: str) -> bytes | None:
        """Bytes an extension stored under ``key``, or None; StateError if unreadable."""
        p = self._extension_path(key)
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"state file {p}: cannot read: {e.strerror or e}") from None

    def write_extension(self, key: str, data: bytes) -> None:
        self._write_atomic(self._extension_path(key), bytes(data), "state file")
