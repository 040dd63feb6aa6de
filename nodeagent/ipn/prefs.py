"""User preferences (Tailscale's ipn.Prefs names) and the masked-prefs PATCH of the LocalAPI.

A PATCH body carries each field to change together with ``<Field>Set: true``; fields without
their ``...Set`` are ignored. Values are type-checked (and ``Hostname`` must be a DNS label) so a
bad request is refused with one line naming the field instead of corrupting persisted prefs.
Fields in ``protected`` (``OperatorUser`` for a caller that is only the operator) may not change:
:class:`PrefsPermissionError`.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from nodeagent.errors import UserError


@dataclass
class Prefs:
    ControlURL: str = ""
    RouteAll: bool = False
    ExitNodeID: str = ""
    ExitNodeIP: str = ""
    ExitNodeAllowLANAccess: bool = False
    CorpDNS: bool = True
    RunSSH: bool = False
    WantRunning: bool = True
    LoggedOut: bool = False
    ShieldsUp: bool = False
    AdvertiseTags: list[str] = field(default_factory=list)
    Hostname: str = ""
    ForceDaemon: bool = False
    AdvertiseRoutes: list[str] = field(default_factory=list)
    NoSNAT: bool = False
    NetfilterMode: int = 0
    OperatorUser: str = ""
    ProfileName: str = ""
    # nodeagent additions (not in Tailscale):
    # write an ICMP unreachable / TCP RST into the TUN when a peer rejects a pending open, so the
    # local connect() fails at once instead of hanging.
    FastFailure: bool = True
    # per-direction LRU size of connection-rejection diagnostics; 0 = platform default.
    ConnRejectMaxEntries: int = 0

    def to_json(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["Config"] = config  # persisted login, never private keys
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Prefs:
        p = cls()
        apply_masked(p, {**raw, **{f"{k}Set": True for k in raw if k in _FIELDS}}, strict=False)
        return p


_FIELDS: dict[str, Any] = {f.name: f for f in dataclasses.fields(Prefs)}


class PrefsError(UserError, ValueError):
    """A masked-prefs body that cannot be applied; the message names the field."""


class PrefsPermissionError(PrefsError):
    """The body would change a field the caller may not change; the message names the field."""


HOSTNAME_MAX_BYTES = 63
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = 4
_REPR.maxlevel = 3


def short_repr(value: Any) -> str:
    """``repr`` cut to a few dozen characters and levels, for error lines about client input."""
    return _REPR.repr(value)


def check_hostname(name: str) -> str:
    """``name`` if it is empty (use the OS hostname) or one DNS label; PrefsError otherwise."""
    if not name:
        return name
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > HOSTNAME_MAX_BYTES:
        raise PrefsError(f"Hostname: {short_repr(name)} is {size} bytes; a DNS label is at most "
                         f"{HOSTNAME_MAX_BYTES}")
    if not _LABEL.fullmatch(name):
        raise PrefsError(f"Hostname: {short_repr(name)} is not a DNS label (ASCII letters, digits "
                         "and '-', not starting or ending with '-')")
    return name


def _check(name: str, value: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if t == "bool":
        if not isinstance(value, bool):
            raise PrefsError(f"{name}: want true or false, got {short_repr(value)}")
    elif t == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise PrefsError(f"{name}: want an integer, got {short_repr(value)}")
    elif t == "str":
        if not isinstance(value, str):
            raise PrefsError(f"{name}: want a string, got {short_repr(value)}")
    elif t.startswith("list"):
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise PrefsError(f"{name}: want a list of strings, got {short_repr(value)}")
    return value


def apply_masked(prefs: Prefs, body: Any, *, strict: bool = True,
                 protected: Collection[str] = ()) -> list[str]:
    """Apply a masked-prefs body to ``prefs`` in place; return the names of changed fields.

    Validates every ``...Set`` field before changing anything, so a bad body changes nothing.
    A change to a field named in ``protected`` raises :class:`PrefsPermissionError`.
    """
    if not isinstance(body, dict):
        raise PrefsError("body: want a JSON object of masked prefs")
    updates: dict[str, Any] = {}
    for key, val in body.items():
        if not key.endswith("Set") or key[:-3] not in _FIELDS:
            continue
        if not isinstance(val, bool):
            raise PrefsError(f"{key}: want true or false, got {short_repr(val)}")
        if not val:
            continue
        name = key[:-3]
        if name not in body:
            if strict:
                raise PrefsError(f"{key} is true but {name} is missing")
            continue
        updates[name] = _check(name, body[name], _FIELDS[name].type)
    if "ConnRejectMaxEntries" in updates and updates["ConnRejectMaxEntries"] < 0:
        raise PrefsError("ConnRejectMaxEntries: must be >= 0")
    if "Hostname" in updates:
        check_hostname(updates["Hostname"])
    changed = [name for name, v in updates.items() if getattr(prefs, name) != v]
    for name in changed:
        if name in protected:
            raise PrefsPermissionError(
                f"{name}: only root or the agent's own user may change it")
    for name in changed:
        setattr(prefs, name, updates[name])
    return changed
