"""The flags of ``nodeagent up``, their ``NODEAGENT_*`` environment defaults, and their checks.

Owns turning the command line plus the environment into :class:`~nodeagent.agent.AgentOptions`.
A flag wins over its variable; an empty variable counts as unset (so an ``EnvironmentFile`` may
list every variable with no value). Every bad value is one :class:`CLIError` line naming the flag
or the variable it came from. The socket's variable, ``NODEAGENT_SOCKET``, is read where every
command reads it (``nodeagent.localapi.server.default_socket_path``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from nodeagent.cli.registry import CLIError

if TYPE_CHECKING:
    from nodeagent.agent import AgentOptions

DEFAULT_PORT = 41641


@dataclass(frozen=True)
class EnvFlag:
    flag: str
    env: str
    help: str


# dest -> flag, its environment variable and help (the README's "Running as a service" table
# lists the same).
UP_FLAGS: dict[str, EnvFlag] = {
    "state_dir": EnvFlag("--state-dir", "NODEAGENT_STATE_DIR",
                         "where the node's identity and prefs live (default {state_dir})"),
    "hostname": EnvFlag("--hostname", "NODEAGENT_HOSTNAME", "this node's name in the tailnet"),
    "tun": EnvFlag("--tun", "NODEAGENT_TUN",
                   "TUN device to create and drive (e.g. nodeagent0); none: no data plane"),
    "port": EnvFlag("--port", "NODEAGENT_PORT",
                    f"WireGuard UDP port (default {DEFAULT_PORT}; 0 picks a free port)"),
    "netmap_file": EnvFlag("--netmap-file", "NODEAGENT_NETMAP_FILE",
                           "run from a static netmap (JSON, tailcfg shape) instead of control"),
    "login_server": EnvFlag("--login-server", "NODEAGENT_LOGIN_SERVER",
                            "coordination server URL, http:// or https:// "
                            "(nodeagent control serve)"),
    "auth_key": EnvFlag("--auth-key", "NODEAGENT_AUTH_KEY",
                        "pre-auth key for the first login; file:PATH reads it from a file"),
}
_METAVARS = {"tun": "NAME", "netmap_file": "FILE", "login_server": "URL", "auth_key": "KEY"}


def add_up_flags(p: argparse.ArgumentParser) -> None:
    from nodeagent.agent import DEFAULT_STATE_DIR

    for dest, f in UP_FLAGS.items():
        help = f.help.format(state_dir=DEFAULT_STATE_DIR) + f" [env {f.env}]"
        p.add_argument(f.flag, dest=dest, default=None, metavar=_METAVARS.get(dest),
                       type=int if dest == "port" else str, help=help)


def _value(args: argparse.Namespace, dest: str) -> tuple[str | None, str]:
    """The flag's value, else its variable's; and the name to blame for it."""
    f = UP_FLAGS[dest]
    v = getattr(args, dest, None)
    if v is not None:
        return str(v), f.flag
    env = os.environ.get(f.env, "").strip()
    return (env or None), f.env


def check_login_server(url: str, src: str) -> str:
    """``url`` if it is an http(s) URL with a host; else a one-line CLIError. Like Tailscale, no
    scheme is assumed for a bare ``host:port``."""
    hint = f" (did you mean http://{url}?)" if "://" not in url else ""
    try:
        u = urlsplit(url)
        _ = u.port  # raises ValueError for a bad port
    except ValueError as e:
        raise CLIError(f"{src} {url!r}: not a URL: {e}") from None
    if u.scheme not in ("http", "https"):
        raise CLIError(f"{src} {url!r}: want an http:// or https:// URL{hint}")
    if not u.hostname:
        raise CLIError(f"{src} {url!r}: the URL has no host")
    return url


def _auth_key(raw: str, src: str) -> str:
    """Tailscale's ``file:PATH`` form reads the key from a file (first line, trimmed)."""
    if not raw.startswith("file:"):
        return raw
    path = raw.removeprefix("file:")
    try:
        with open(path, encoding="utf-8") as fh:
            key = fh.read().strip()
    except OSError as e:
        raise CLIError(f"{src} file:{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"{src} file:{path}: not a text file") from None
    if not key:
        raise CLIError(f"{src} file:{path}: the file is empty")
    return key


def up_options(args: argparse.Namespace, socket: str) -> AgentOptions:
    """The checked :class:`~nodeagent.agent.AgentOptions` for ``nodeagent up``."""
    from nodeagent.agent import DEFAULT_STATE_DIR, AgentOptions

    state_dir, _ = _value(args, "state_dir")
    tun, _ = _value(args, "tun")
    netmap_file, nm_src = _value(args, "netmap_file")
    login_server, ls_src = _value(args, "login_server")
    auth_key, ak_src = _value(args, "auth_key")
    hostname, hn_src = _value(args, "hostname")
    port_raw, port_src = _value(args, "port")
    port = DEFAULT_PORT
    if port_raw is not None:
        try:
            port = int(port_raw)
        except ValueError:
            raise CLIError(f"{port_src}={port_raw!r}: not a port number (0..65535)") from None
        if not 0 <= port <= 65535:
            raise CLIError(f"{port_src} {port}: must be 0..65535")
    if login_server is not None:
        check_login_server(login_server, ls_src)
    if (netmap_file or login_server) and not tun:
        raise CLIError(f"{nm_src if netmap_file else ls_src} needs --tun NAME (the data plane)")
    if netmap_file and login_server:
        raise CLIError(f"{nm_src} and {ls_src} are alternatives; give one")
    if auth_key is not None:
        if login_server is None:
            raise CLIError(f"{ak_src} needs --login-server URL: a pre-auth key logs in to a "
                           "coordination server")
        auth_key = _auth_key(auth_key, ak_src)
    if hostname:
        from nodeagent.ipn.prefs import PrefsError, check_hostname

        try:
            check_hostname(hostname)
        except PrefsError as e:
            raise CLIError(f"{hn_src} {str(e).removeprefix('Hostname: ')}") from None
    return AgentOptions(socket=socket, state_dir=state_dir or DEFAULT_STATE_DIR,
                        hostname=hostname, tun=tun, port=port, netmap_file=netmap_file,
                        login_server=login_server, auth_key=auth_key)
