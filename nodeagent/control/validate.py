"""Syntax and size bounds of everything a node tells the coordination server about itself.

``proto.check_message`` checks that a client message's fields have the right types; the
functions here check their values before the server stores them or sends them to peers: the
hostname is a DNS label of at most :data:`MAX_HOSTNAME` bytes (or empty: "unchanged" in a map
request, "pick a name" at registration), endpoints pass ``tailcfg.check_endpoint`` and are at most
``tailcfg.MAX_ENDPOINTS``, the OS name and auth key are short printable ASCII, keys have their
lengths, the home DERP region is a small non-negative number, and a c2n response has an HTTP
status and a bounded set of header lines. A failure raises :class:`FieldError` (a
``ProtoError``) whose one-line message names the message type and the field; the server answers
it as HTTP 400 on ``/machine/register`` and as a fatal ``error`` message on the map stream.

:func:`hostname_label` is the node's side: it turns a machine's hostname (an FQDN, "My Laptop")
into a label this module accepts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from nodeagent.control.proto import ProtoError
from nodeagent.tailcfg import MAX_ENDPOINTS, check_endpoint

MAX_HOSTNAME = 63  # bytes: one DNS label
MAX_OS = 32
MAX_AUTHKEY = 256
MAX_REQID = 64
KEY_LEN = 32  # node and disco public keys
MAX_DERP_REGION = (1 << 31) - 1
MAX_C2N_HEADERS = 64
MAX_C2N_HEADER_NAME = 256
MAX_C2N_HEADER_VALUE = 8192

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_NOT_LDH = re.compile(r"[^A-Za-z0-9-]+", re.ASCII)
_PRINTABLE = re.compile(r"[\x20-\x7e]*", re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)  # an HTTP header name
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\U0010ffff]*")  # no CR, LF or other controls


class FieldError(ProtoError):
    """A node-supplied field whose value is refused; the message names the field."""

    def __init__(self, msg_type: str, field: str, problem: str) -> None:
        super().__init__(f"invalid {field} in {msg_type} message: {problem}")
        self.field = field


def _shown(v: str, limit: int = 40) -> str:
    return repr(v if len(v) <= limit else v[:limit] + "…")


def check_hostname(v: str) -> str | None:
    """None when ``v`` is a DNS label (or empty), else the problem."""
    if not v:
        return None
    n = len(v.encode("utf-8", "surrogatepass"))
    if n > MAX_HOSTNAME:
        return f"{n} bytes, over the {MAX_HOSTNAME}-byte limit of a DNS label"
    if not _LABEL.fullmatch(v):
        return (f"{_shown(v)} is not a DNS label (letters, digits and inner dashes, "
                "no dots)")
    return None


def check_endpoints(v: list[str]) -> str | None:
    """None when every endpoint is a usable ``ip:port`` and there are not too many."""
    if len(v) > MAX_ENDPOINTS:
        return f"{len(v)} endpoints, over the limit of {MAX_ENDPOINTS}"
    for i, ep in enumerate(v):
        try:
            check_endpoint(ep)
        except ValueError as e:
            return f"[{i}]: {e}"
    return None


def _check_printable(v: str, limit: int) -> str | None:
    if len(v) > limit:
        return f"{len(v)} characters, over the limit of {limit}"
    if not _PRINTABLE.fullmatch(v):
        return "not printable ASCII"
    return None


def _check_key(v: bytes | None) -> str | None:
    if v and len(v) != KEY_LEN:
        return f"{len(v)} bytes, not {KEY_LEN}"
    return None


def _check_derp(v: int | None) -> str | None:
    if v is not None and not 0 <= v <= MAX_DERP_REGION:
        return f"region {v} is outside 0-{MAX_DERP_REGION}"
    return None


def _check_reqid(v: bytes) -> str | None:
    if not 1 <= len(v) <= MAX_REQID:
        return f"{len(v)} bytes, not 1-{MAX_REQID}"
    return None


def _check_headers(v: dict[Any, Any]) -> str | None:
    if len(v) > MAX_C2N_HEADERS:
        return f"{len(v)} headers, over the limit of {MAX_C2N_HEADERS}"
    for k, val in v.items():
        if not isinstance(k, str) or not isinstance(val, str):
            return "header names and values must be text"
        if len(k) > MAX_C2N_HEADER_NAME or not _TOKEN.fullmatch(k):
            return f"header name {_shown(k)} is not an HTTP token of at most " \
                   f"{MAX_C2N_HEADER_NAME} characters"
        if len(val) > MAX_C2N_HEADER_VALUE or not _HEADER_VALUE.fullmatch(val):
            return f"header {k}: value is over {MAX_C2N_HEADER_VALUE} characters or has " \
                   "control characters"
    return None


def _check_status(v: int) -> str | None:
    return None if 100 <= v <= 599 else f"{v} is not an HTTP status"


# Per message type: (field, check) for the node-supplied fields; a check gets the field's value
# (already of the type ``proto.check_message`` demands; None when an optional field is absent).
_Check = Callable[[Any], str | None]
_CHECKS: dict[str, tuple[tuple[str, _Check], ...]] = {
    "register": (("Hostname", check_hostname),
                 ("OS", lambda v: _check_printable(v, MAX_OS)),
                 ("AuthKey", lambda v: _check_printable(v, MAX_AUTHKEY)),
                 ("DiscoKey", _check_key),
                 ("ReqID", _check_reqid)),
    "map": (("Hostname", check_hostname),
            ("OS", lambda v: _check_printable(v, MAX_OS)),
            ("Endpoints", check_endpoints),
            ("HomeDERP", _check_derp),
            ("DiscoKey", _check_key)),
    "update": (("Endpoints", lambda v: None if v is None else check_endpoints(v)),
               ("HomeDERP", _check_derp)),
    "c2n-response": (("Status", _check_status),
                     ("Headers", _check_headers)),
}


def check_node_fields(m: dict[str, Any]) -> dict[str, Any]:
    """Check the values of a client message that passed ``proto.check_message``; returns it, or
    raises :class:`FieldError` naming the first bad field. Types without node data pass."""
    t = m["Type"]
    for name, check in _CHECKS.get(t, ()):
        problem = check(m.get(name))
        if problem is not None:
            raise FieldError(t, name, problem)
    return m


def hostname_label(hostname: str) -> str:
    """A machine's hostname → the DNS label a node reports: the first dot-separated part, runs
    of other characters turned into one dash, at most :data:`MAX_HOSTNAME` characters, case kept.
    May be empty (the server then picks a name)."""
    label = _NOT_LDH.sub("-", hostname.split(".", 1)[0]).strip("-")
    return label[:MAX_HOSTNAME].strip("-")
