"""Where derpprobe's DERP map comes from: ``https://`` / ``http://`` URLs, ``file:///path``, or
``local`` (the map of the nodeagent agent on this machine, over its LocalAPI ``derpmap``).

Owns :func:`load_derp_map` and :func:`parse_derp_map`; every failure is a :class:`MapError`
whose message is one line naming the source and what is wrong with it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

from nodeagent.errors import UserError
from nodeagent.localapi.client import LocalAPIClient, LocalAPIError
from nodeagent.tailcfg import DERPMap, WireError, derpmap_from_wire

__all__ = ["LOCAL", "MAX_MAP_BYTES", "MapError", "check_source", "load_derp_map",
           "parse_derp_map"]

LOCAL = "local"
MAX_MAP_BYTES = 8 << 20  # a DERP map of every region in the world is ~50 KB
USER_AGENT = "nodeagent-derpprobe"


class MapError(UserError):
    """The DERP map could not be had or is not usable (one line)."""


def check_source(source: str) -> str:
    """The source if its form is one derpprobe reads, else MapError (a usage problem)."""
    if source == LOCAL:
        return source
    u = urllib.parse.urlsplit(source)
    if u.scheme in ("http", "https") and u.hostname:
        return source
    if u.scheme == "file" and u.path:
        return source
    raise MapError(f"--derp-map {source!r}: want https://..., http://..., file:///path or "
                   f"{LOCAL}")


def parse_derp_map(data: bytes, where: str) -> DERPMap:
    """A DERPMap from JSON bytes; MapError for anything that is not one with a region."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MapError(f"{where}: not JSON") from None
    except RecursionError:
        raise MapError(f"{where}: JSON nested too deeply") from None
    if obj is None:
        raise MapError(f"{where}: no DERP map (null)")
    try:
        dm = derpmap_from_wire(obj)
    except WireError as e:
        raise MapError(f"{where}: not a DERP map: {e}") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise MapError(f"{where}: not a DERP map: {e}") from None
    if not dm.Regions:
        raise MapError(f"{where}: the DERP map has no regions")
    for rid, region in dm.Regions.items():
        for node in region.Nodes:
            if not node.HostName:
                raise MapError(f"{where}: region {rid} has a node without HostName")
    return dm


def load_derp_map(source: str, *, socket_path: str, timeout: float = 10.0) -> DERPMap:
    """Fetch and parse the map named by ``source`` (see the module docstring). Blocking."""
    check_source(source)
    if source == LOCAL:
        return parse_derp_map(_fetch_local(socket_path, timeout),
                              f"the agent's DERP map ({socket_path})")
    u = urllib.parse.urlsplit(source)
    if u.scheme == "file":
        path = urllib.parse.unquote(u.path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MAP_BYTES + 1)
        except OSError as e:
            raise MapError(f"cannot read DERP map {path}: {e.strerror or e}") from None
        if len(data) > MAX_MAP_BYTES:
            raise MapError(f"DERP map {path}: larger than {MAX_MAP_BYTES} bytes")
        return parse_derp_map(data, f"DERP map {path}")
    return parse_derp_map(_fetch_url(source, timeout), f"DERP map {source}")


def _fetch_url(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data: bytes = resp.read(MAX_MAP_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise MapError(f"DERP map {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise MapError(f"cannot fetch DERP map {url}: {_reason(e.reason)}") from None
    except TimeoutError:
        raise MapError(f"cannot fetch DERP map {url}: timed out after {timeout:g}s") from None
    except (OSError, ValueError) as e:
        raise MapError(f"cannot fetch DERP map {url}: {_reason(e)}") from None
    if len(data) > MAX_MAP_BYTES:
        raise MapError(f"DERP map {url}: larger than {MAX_MAP_BYTES} bytes")
    return data


def _fetch_local(socket_path: str, timeout: float) -> bytes:
    api = LocalAPIClient(socket_path, timeout=timeout)
    try:
        status, body, _ = api.request("GET", "derpmap")
        if status != 200:
            api.json("GET", "derpmap")  # raises with the agent's own message
            raise MapError(f"the agent at {socket_path} answered {status} for its DERP map")
    except LocalAPIError as e:
        raise MapError(f"cannot get the local agent's DERP map: {e}") from None
    if body.strip() == b"null":
        raise MapError(f"the agent at {socket_path} has no DERP map yet (no netmap)")
    return body


def _reason(r: object) -> str:
    if isinstance(r, OSError) and r.strerror:
        return r.strerror
    text = " ".join(str(r).split())
    return text or type(r).__name__
