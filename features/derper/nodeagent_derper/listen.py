"""The derper's TCP sockets: where to listen (``[host]:port`` as the flags give it), the
listening sockets for a host (dual-stack for the wildcard), and the tuning of each accepted
connection (``--tcp-keepalive-time``, ``--tcp-user-timeout``).
"""

from __future__ import annotations

import contextlib
import socket

# Tailscale's --tcp-keepalive-time / --tcp-user-timeout defaults. As Tailscale's derper (Go's
# keep-alive settings), probes then go every 15 s and 9 unanswered ones end the connection.
DEFAULT_TCP_KEEPALIVE = 600.0
DEFAULT_TCP_USER_TIMEOUT = 15.0
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 9


def split_hostport(addr: str) -> tuple[str, int]:
    """``":443"``, ``"host:80"``, ``"[::1]:3340"`` → (host, port); ValueError if unusable."""
    host, sep, port_s = addr.rpartition(":")
    if not sep:
        raise ValueError(f"listen address {addr!r}: want [host]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"listen address {addr!r}: put IPv6 addresses in brackets")
    if port_s == "https":
        port_s = "443"
    elif port_s == "http":
        port_s = "80"
    if not port_s.isdigit() or int(port_s) > 65535:
        raise ValueError(f"listen address {addr!r}: bad port {port_s!r}")
    return host, int(port_s)


def tune_accepted(conn: socket.socket, keepalive: float, user_timeout: float) -> None:
    """``--tcp-keepalive-time`` and ``--tcp-user-timeout`` on an accepted socket (0 = leave
    keep-alive off / the kernel's user timeout)."""
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not Linux
        if keepalive > 0:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(keepalive)))
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if user_timeout > 0:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            max(1, round(user_timeout * 1000)))


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets for ``host`` ("" = every address, dual-stack when possible);
    OSError naming every address that failed when none could be bound."""
    if host == "localhost":
        targets = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    elif host in ("", "*"):
        targets = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        targets = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    out: list[socket.socket] = []
    errors: list[str] = []
    for fam, h in targets:
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                # The wildcard is dual-stack; a named IPv6 address only serves itself.
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if h == "::" else 1)
            s.bind((h, port))
            s.listen(1024)
            s.setblocking(False)
        except OSError as e:
            s.close()
            errors.append(f"{h}:{port}: {e.strerror}")
            continue
        out.append(s)
        if port == 0:
            port = s.getsockname()[1]
        if h == "::":
            break  # dual-stack socket covers IPv4 too
    if not out:
        raise OSError(f"cannot listen on TCP {'; '.join(errors)}")
    return out
