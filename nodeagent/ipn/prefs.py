"""User preferences (Tailscale's ipn.Prefs names) and the masked-prefs PATCH of the LocalAPI.

A PATCH body carries each field to change together with ``<Field>Set: true``; fields without
their ``...Set`` are ignored. Values are type-checked so a bad request is refused with one line
naming the field instead of corrupting persisted prefs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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


class PrefsError(ValueError):
    """A masked-prefs body that cannot be applied; the message names the field."""


def _check(name: str, value: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if t == "bool":
        if not isinstance(value, bool):
            raise PrefsError(f"{name}: want true or false, got {value!r}")
    elif t == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise PrefsError(f"{name}: want an integer, got {value!r}")
    elif t == "str":
        if not isinstance(value, str):
            raise PrefsError(f"{name}: want a string, got {value!r}")
    elif t.startswith("list"):
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise PrefsError(f"{name}: want a list of strings, got {value!r}")
    return value


def apply_masked(prefs: Prefs, body: Any, *, strict: bool = True) -> list[str]:
    """Apply a masked-prefs body to ``prefs`` in place; return the names of changed fields.

    Validates every ``...Set`` field before changing anything, so a bad body changes nothing.
    """
    if not isinstance(body, dict):
        raise PrefsError("body: want a JSON object of masked prefs")
    updates: dict[str, Any] = {}
    for key, val in body.items():
        if not key.endswith("Set") or key[:-3] not in _FIELDS:
            continue
        if not isinstance(val, bool):
            raise PrefsError(f"{key}: want true or false, got {val!r}")
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
    changed = []
    for name, v in updates.items():
        if getattr(prefs, name) != v:
            setattr(prefs, name, v)
            changed.append(name)
    return changed
