"""User preferences (Tailscale's ipn.Prefs names) and the masked-prefs PATCH of the LocalAPI.

A PATCH body carries each field to change together with ``<Field>Set: true``; fields without
their ``...Set`` are ignored (as Tailscale ignores them: its CLI sends the whole Prefs object).
Values are type-checked (and ``Hostname`` must be a DNS label) so a bad request is refused with
one line naming the field instead of corrupting persisted prefs. Fields in ``protected``
(``OperatorUser`` for a caller that is only the operator) may not change:
:class:`PrefsPermissionError`.

Tailscale has prefs nodeagent does not implement (``RunWebClient``, ``AutoUpdate``, ...,
:data:`TAILSCALE_ONLY`): they are rendered with the value that means "off", and a ``...Set``
for one of them is accepted only with that value; a ``...Set`` naming a pref neither has is
refused. :meth:`Prefs.to_json` renders Tailscale's field order and ``omitempty`` rules, with
``Config`` (Tailscale's persist) built by :func:`persist_json` — its private keys always zero.
"""

from __future__ import annotations

import copy
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
        """Tailscale's ipn.Prefs JSON (its field order; ``omitempty`` fields only when set),
        then nodeagent's additions, then ``Config`` (see :func:`persist_json`)."""
        mine = dataclasses.asdict(self)
        d: dict[str, Any] = {}
        for name in _TS_ORDER:
            if name in _OMITEMPTY and not mine.get(name, TAILSCALE_ONLY.get(name)):
                continue
            d[name] = mine[name] if name in mine else copy.deepcopy(TAILSCALE_ONLY[name])
        for name in _NODEAGENT_ONLY:
            d[name] = mine[name]
        d["Config"] = config  # persisted login, never private keys
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Prefs:
        p = cls()
        apply_masked(p, {**raw, **{f"{k}Set": True for k in raw if k in _FIELDS}}, strict=False)
        return p


_FIELDS: dict[str, Any] = {f.name: f for f in dataclasses.fields(Prefs)}
_NODEAGENT_ONLY = ("FastFailure", "ConnRejectMaxEntries")

# Tailscale prefs nodeagent does not implement, with the value it reports (the one meaning "off").
TAILSCALE_ONLY: dict[str, Any] = {
    "AutoExitNode": "",
    "InternalExitNodePrior": "",
    "RunWebClient": False,
    "NotepadURLs": False,
    "Egg": False,
    "AdvertiseServices": None,
    "Sync": None,
    "NoStatefulFiltering": None,
    "AutoUpdate": {"Check": False, "Apply": None},
    "AppConnector": {"Advertise": False},
    "PostureChecking": False,
    "NetfilterKind": "",
    "LinuxPacketMarks": None,
    "DriveShares": None,
    "RelayServerPort": None,
    "RelayServerStaticEndpoints": None,
    "AllowSingleHosts": True,  # legacy: Tailscale always writes true
}
# Values of Tailscale-only prefs that mean the same as the reported one (opt.Bool false/unset,
# empty lists): a ...Set with one of these is a no-op, not a request nodeagent cannot honour.
_EQUIVALENT: dict[str, tuple[Any, ...]] = {
    "AdvertiseServices": (None, []), "Sync": (None, True, "true", ""),
    "NoStatefulFiltering": (None, False, "false", ""), "DriveShares": (None, []),
    "RelayServerStaticEndpoints": (None, []),
}
# ipn.Prefs field order (v1.98), and the fields it omits when empty.
_TS_ORDER = (
    "ControlURL", "RouteAll", "ExitNodeID", "ExitNodeIP", "AutoExitNode",
    "InternalExitNodePrior", "ExitNodeAllowLANAccess", "CorpDNS", "RunSSH", "RunWebClient",
    "WantRunning", "LoggedOut", "ShieldsUp", "AdvertiseTags", "Hostname", "NotepadURLs",
    "ForceDaemon", "Egg", "AdvertiseRoutes", "AdvertiseServices", "Sync", "NoSNAT",
    "NoStatefulFiltering", "NetfilterMode", "OperatorUser", "ProfileName", "AutoUpdate",
    "AppConnector", "PostureChecking", "NetfilterKind", "LinuxPacketMarks", "DriveShares",
    "RelayServerPort", "RelayServerStaticEndpoints", "AllowSingleHosts",
)
_OMITEMPTY = frozenset({
    "AutoExitNode", "ForceDaemon", "Egg", "NoStatefulFiltering", "OperatorUser", "ProfileName",
    "LinuxPacketMarks", "RelayServerPort", "RelayServerStaticEndpoints",
})
# Zero keys as Tailscale renders them: its LocalAPI blanks the private keys, never omits them.
ZERO_NODE_PRIVATE = "privkey:" + "00" * 32
ZERO_NL_PRIVATE = "nlpriv:" + "00" * 64


def persist_json(login: dict[str, Any]) -> dict[str, Any] | None:
    """Tailscale's ``Config`` (types/persist.Persist) for the persisted login ``login``, or None
    before the first login: the user profile and stable node ID; private keys always zero."""
    if not login.get("NodeID") and not login.get("UserProfile"):
        return None
    up = login.get("UserProfile")
    if not isinstance(up, dict):  # a hand-edited state file: show no profile, do not fail
        up = {}
    profile: dict[str, Any] = {"ID": up.get("ID", 0), "LoginName": up.get("LoginName", ""),
                               "DisplayName": up.get("DisplayName", "")}
    if up.get("ProfilePicURL"):
        profile["ProfilePicURL"] = up["ProfilePicURL"]
    return {
        "PrivateNodeKey": ZERO_NODE_PRIVATE,
        "OldPrivateNodeKey": ZERO_NODE_PRIVATE,
        "UserProfile": profile,
        "NetworkLockKey": ZERO_NL_PRIVATE,
        "NodeID": login.get("NodeID", ""),
    }


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
        if not key.endswith("Set") or key in _FIELDS:
            continue
        name = key[:-3]
        if name not in _FIELDS:
            _check_tailscale_only(key, val, body)
            continue
        if not isinstance(val, bool):
            raise PrefsError(f"{key}: want true or false, got {short_repr(val)}")
        if not val:
            continue
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


def masked_from_full(body: Any) -> Any:
    """A full Prefs object (``start``'s ``UpdatePrefs``, ``check-prefs``) as a masked-prefs body
    that sets every pref nodeagent has and that the object names."""
    if not isinstance(body, dict):
        return body
    return {**{k: v for k, v in body.items() if not k.endswith("Set")},
            **{f"{k}Set": True for k in body if k in _FIELDS}}


def _same(name: str, value: Any, reported: Any) -> bool:
    return value == reported or value in _EQUIVALENT.get(name, ())


def _check_tailscale_only(key: str, val: Any, body: dict[str, Any]) -> None:
    """A ``...Set`` for a pref nodeagent does not have: refused unless it asks for the value
    nodeagent reports (a no-op), so a requested change never silently vanishes."""
    name = key[:-3]
    if name not in TAILSCALE_ONLY:
        raise PrefsError(f"{key}: unknown pref {name!r}")
    reported = TAILSCALE_ONLY[name]
    if name == "AutoUpdate":  # AutoUpdateSet is {"CheckSet": bool, "ApplySet": bool}
        if not isinstance(val, dict):
            raise PrefsError(f"{key}: want an object {{CheckSet, ApplySet}}, got {short_repr(val)}")
        au = body.get("AutoUpdate") or {}
        if not isinstance(au, dict):
            raise PrefsError(f"AutoUpdate: want an object {{Check, Apply}}, got {short_repr(au)}")
        for sub, field_name in (("CheckSet", "Check"), ("ApplySet", "Apply")):
            flag = val.get(sub, False)
            if not isinstance(flag, bool):
                raise PrefsError(f"{key}.{sub}: want true or false, got {short_repr(flag)}")
            v = au.get(field_name, reported[field_name])
            if flag and v != reported[field_name] and not (field_name == "Apply" and v in
                                                           (False, "false", "")):
                raise PrefsError(f"AutoUpdate.{field_name}: not supported by nodeagent "
                                 f"(only {reported[field_name]!r})")
        return
    if not isinstance(val, bool):
        raise PrefsError(f"{key}: want true or false, got {short_repr(val)}")
    if not val:
        return
    if name == "InternalExitNodePrior":
        raise PrefsError(f"{key}: InternalExitNodePrior is internal; clients may not set it")
    value = body.get(name, reported)
    if not _same(name, value, reported):
        raise PrefsError(f"{name}: not supported by nodeagent (only {short_repr(reported)}), "
                         f"got {short_repr(value)}")
