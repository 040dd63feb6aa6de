"""The ``derper`` command (also ``nodeagent derper``): flags with Tailscale's names, the private
key config file, the mesh key, and running ``Derper`` until SIGTERM/SIGINT (SIGHUP reloads the
certificate files and ``--rate-config``).

Flags are accepted Go-style as well (``-hostname x``, ``-stun=false``); booleans take
``--flag``, ``--flag=true`` or ``--flag=false``. Every operator error — a bad flag, a missing
certificate, an unreadable key file — is one line ``derper: <what>`` and exit status 2 (usage)
or 1 (runtime); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
from typing import NoReturn

from nacl.public import PrivateKey

from nodeagent_derper.acme_manager import LETSENCRYPT_DIRECTORY
from nodeagent_derper.app import (
    DEFAULT_MAX_PENDING_PER_IP,
    DEFAULT_TCP_KEEPALIVE,
    DEFAULT_TCP_USER_TIMEOUT,
    DEV_ADDR,
    Derper,
    DerperOptions,
    StartupError,
    default_certdir,
    split_hostport,
)
from nodeagent_derper.mesh import peer_url
from nodeagent_derper.server import DEFAULT_WRITE_TIMEOUT
from nodeagent_derper.stun_ratelimit import DEFAULT_BURST, DEFAULT_GLOBAL_RATE, DEFAULT_RATE
from nodeagent_derper.verify import check_url

PROG = "derper"
DEFAULT_CONFIG = "/var/lib/derper/derper.key"
PRIVKEY_PREFIX = "privkey:"


class UsageError(Exception):
    """Bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_bool(v: str) -> bool:
    low = v.lower()
    if low in ("1", "t", "true", "yes", "on"):
        return True
    if low in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {v!r}")


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                   "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(v: str) -> float:
    """Seconds from a Go duration (``2s``, ``1m30s``, ``500ms``, ``0``) or a plain number of
    seconds."""
    text = v.strip()
    try:
        secs = float(text)
    except ValueError:
        pos, secs = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            secs += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text) or not text:
            raise argparse.ArgumentTypeError(f"invalid duration {v!r} (e.g. 2s, 500ms)") from None
    if not secs >= 0 or secs == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {v!r}: must be ≥ 0 and finite")
    return secs


def parse_timeout_flag(v: str) -> float:
    """A Go duration for --tcp-keepalive-time / --tcp-user-timeout; 0 or negative (Tailscale's
    way to disable keep-alive) gives 0 = off."""
    text = v.strip()
    if text.startswith("-"):
        try:
            parse_duration(text[1:])  # still has to be a duration
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"invalid duration {v!r} (e.g. 10m, 15s)") from None
        return 0.0
    return parse_duration(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False,
                description="DERP relay server (Tailscale-compatible), with STUN, TLS "
                            "(manual or Let's Encrypt) and /debug/ metrics.")

    def flag(name: str, **kw: object) -> None:
        opts = ["-a"] if name == "a" else [f"--{name}"]
        p.add_argument(*opts, **kw)  # type: ignore[arg-type]

    def boolean(name: str, default: bool, help: str) -> None:
        p.add_argument(f"--{name}", nargs="?", const=True, default=default, type=parse_bool,
                       metavar="BOOL", help=help)

    flag("a", dest="addr", default=None, metavar="ADDR",
         help='listen address [host]:port (default ":443"; HTTPS when the port is 443 or '
              "--certmode manual)")
    flag("hostname", default="derp.tailscale.com", help="TLS host name")
    flag("certmode", default="letsencrypt", choices=("manual", "letsencrypt"),
         help="manual: <hostname>.crt/.key in --certdir; letsencrypt: ACME HTTP-01")
    flag("certdir", default=None, help=f"certificate directory (default {default_certdir()})")
    flag("http-port", type=int, default=80,
         help="plain HTTP port for ACME challenges and redirects in TLS mode; -1 disables")
    flag("stun-port", type=int, default=3478, help="UDP STUN port")
    boolean("stun", True, "run the STUN server (--stun=false disables)")
    boolean("stun-strict", False, "answer only Tailscale STUN requests (SOFTWARE tailnode + "
            "FINGERPRINT), as Tailscale's derper does")
    flag("stun-rate-limit", type=float, default=DEFAULT_RATE, metavar="PER_SEC",
         help="STUN replies per second to one source (IPv4 address or IPv6 /64), against "
              f"use as a reflector (default {DEFAULT_RATE:g}; 0 = no per-source limit)")
    flag("stun-rate-burst", type=int, default=DEFAULT_BURST, metavar="N",
         help=f"STUN replies in a row to one source (default {DEFAULT_BURST})")
    flag("stun-global-rate-limit", type=float, default=DEFAULT_GLOBAL_RATE, metavar="PER_SEC",
         help="STUN replies per second to all sources together; burst one second's worth, "
              f"at least --stun-rate-burst (default {DEFAULT_GLOBAL_RATE:g}; 0 = unlimited)")
    boolean("derp", True, "run the DERP relay (false: STUN and bootstrap-dns only)")
    boolean("dev", False, f"development mode: plain HTTP on {DEV_ADDR}, random key")
    flag("home", default="", help='/ page: "" default page, "blank", or a URL to redirect to')
    flag("bootstrap-dns-names", default="", help="comma-separated names for /bootstrap-dns")
    flag("acme-directory", default=LETSENCRYPT_DIRECTORY, help="ACME directory URL of the CA")
    flag("acme-email", default="", help="contact email of the ACME account")
    flag("accept-connection-limit", type=float, default=math.inf,
         help="accepted connections per second (default unlimited)")
    flag("accept-connection-burst", type=int, default=2**31 - 1,
         help="burst of the accept rate limit")
    flag("rate-config", default="", help='JSON file {"PerClientRateLimitBytesPerSec": N, '
         '"PerClientRateBurstBytes": N}: per-client receive rate limit (re-read on SIGHUP)')
    boolean("verify-clients", False, "admit only node keys the local nodeagent knows (its own "
            "and its netmap's peers), asked over its LocalAPI socket (--socket)")
    flag("socket", default="", metavar="PATH", help="the nodeagent LocalAPI socket for "
         "--verify-clients (default $NODEAGENT_SOCKET or /run/nodeagent/nodeagent.sock)")
    flag("verify-client-url", default="", metavar="URL", help="admission webhook: POST "
         '{"NodePublic", "Source"} per client, answer {"Allow": bool}')
    boolean("verify-client-url-fail-open", True, "admit clients when --verify-client-url "
            "cannot be reached (false: refuse them)")
    flag("tcp-write-timeout", type=parse_duration, default=DEFAULT_WRITE_TIMEOUT,
         metavar="DURATION", help="close a client whose writes make no progress for this long "
         "(default 2s; 0 disables)")
    flag("tcp-keepalive-time", type=parse_timeout_flag, default=DEFAULT_TCP_KEEPALIVE,
         metavar="DURATION", help="TCP keep-alive idle time on accepted connections, then "
         "probes every 15s, 9 unanswered end it (default 10m; 0 disables)")
    flag("tcp-user-timeout", type=parse_timeout_flag, default=DEFAULT_TCP_USER_TIMEOUT,
         metavar="DURATION", help="TCP_USER_TIMEOUT on accepted connections: how long sent "
         "data may stay unacknowledged (default 15s; 0 leaves the kernel's default)")
    flag("max-pending-per-ip", type=int, default=DEFAULT_MAX_PENDING_PER_IP, metavar="N",
         help="connections one source IP may hold open before logging in to DERP (HTTP "
         "requests, TLS and DERP handshakes); more are closed at once (default %(default)s; "
         "0 disables; not a Tailscale flag)")
    flag("mesh-psk-file", default="", help="file holding the mesh key (64 hex digits)")
    flag("mesh-with", default="", metavar="HOSTS",
         help="comma-separated derpers of this region to mesh with: host names (dialled as "
         "https://HOST/derp), host:port or http(s):// URLs; this derper's own entry is skipped. "
         "Needs the mesh key")
    p.add_argument("-c", "--config", default="", help="private key file (JSON, created 0600 "
                   f"if missing; default {DEFAULT_CONFIG} when root)")
    boolean("version", False, "print the version and exit")
    return p


def go_style(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept Go's single-dash long flags (``-hostname``, ``-stun=false``, ``-a=:443``)."""
    longs = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    out: list[str] = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name = arg.split("=", 1)[0]
            if "-" + name in longs:
                arg = "-" + arg
            elif name == "-a" and arg.startswith("-a="):
                out += ["-a", arg[3:]]
                continue
        out.append(arg)
    return out


def load_or_create_key(path: str) -> bytes:
    """The node private key from JSON ``{"PrivateKey": "privkey:<hex>"}``; created 0600 with
    a new key when the file does not exist."""
    if not os.path.exists(path):
        key = bytes(PrivateKey.generate())
        d = os.path.dirname(path)
        try:
            if d:
                os.makedirs(d, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"PrivateKey": PRIVKEY_PREFIX + key.hex()}, f)
                f.write("\n")
        except OSError as e:
            raise StartupError(f"cannot create config {path}: {e.strerror}") from None
        return key
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as e:
        raise StartupError(f"cannot read config {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise StartupError(f"config {path}: not JSON") from None
    text = obj.get("PrivateKey") if isinstance(obj, dict) else None
    if not isinstance(text, str) or not text.startswith(PRIVKEY_PREFIX):
        raise StartupError(f'config {path}: want {{"PrivateKey": "privkey:<64 hex>"}}')
    try:
        key = bytes.fromhex(text[len(PRIVKEY_PREFIX):])
    except ValueError:
        key = b""
    if len(key) != 32:
        raise StartupError(f"config {path}: PrivateKey is not 64 hex digits")
    return key


def load_mesh_key(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise StartupError(f"cannot read mesh key {path}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    if len(text) != 64 or text.lower() != text or any(c not in "0123456789abcdef" for c in text):
        raise StartupError(f"mesh key {path}: want 64 lowercase hex digits")
    return text


def load_rate_config(path: str) -> tuple[int | None, int | None]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        rate = int(obj.get("PerClientRateLimitBytesPerSec", 0))
        burst = int(obj.get("PerClientRateBurstBytes", 0))
    except OSError as e:
        raise StartupError(f"cannot read rate config {path}: {e.strerror}") from None
    except (ValueError, TypeError, AttributeError):
        raise StartupError(f"rate config {path}: want JSON with integer "
                           "PerClientRateLimitBytesPerSec / PerClientRateBurstBytes") from None
    if rate < 0 or burst < 0:
        raise StartupError(f"rate config {path}: values must not be negative")
    return (rate or None), (burst or None)


def options_from_args(ns: argparse.Namespace) -> DerperOptions:
    """Validate the parsed flags and load the files they name."""
    if ns.verify_client_url:
        try:
            check_url(ns.verify_client_url)
        except ValueError as e:
            raise UsageError(str(e)) from None
    addr = ns.addr if ns.addr is not None else (DEV_ADDR if ns.dev else ":443")
    try:
        split_hostport(addr)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name, port in (("--stun-port", ns.stun_port), ("--http-port", ns.http_port)):
        if not -1 <= port <= 65535 or (name == "--stun-port" and port < 0):
            raise UsageError(f"{name} {port}: out of range")
    if not ns.accept_connection_limit > 0 or ns.accept_connection_burst < 1:
        raise UsageError("--accept-connection-limit must be > 0 and the burst ≥ 1")
    if ns.max_pending_per_ip < 0:
        raise UsageError(f"--max-pending-per-ip {ns.max_pending_per_ip}: must be ≥ 0")
    for name, v in (("--stun-rate-limit", ns.stun_rate_limit),
                    ("--stun-global-rate-limit", ns.stun_global_rate_limit)):
        if not 0 <= v < math.inf:
            raise UsageError(f"{name} {v:g}: must be ≥ 0 and finite (0 = unlimited)")
    if ns.stun_rate_burst < 1:
        raise UsageError(f"--stun-rate-burst {ns.stun_rate_burst}: must be ≥ 1")
    if ns.home and ns.home != "blank" and not ns.home.startswith(("http://", "https://")):
        raise UsageError('--home: want "", "blank", or an http(s):// URL')
    if ns.config:
        key = load_or_create_key(ns.config)
    elif ns.dev:
        key = bytes(PrivateKey.generate())
    elif os.geteuid() == 0:
        key = load_or_create_key(DEFAULT_CONFIG)
    else:
        raise UsageError("--config (-c) is required when not running as root")
    mesh = load_mesh_key(ns.mesh_psk_file) if ns.mesh_psk_file else None
    if mesh is None and ns.dev and os.environ.get("TAILSCALE_DERPER_MESH_KEY"):
        mesh = os.environ["TAILSCALE_DERPER_MESH_KEY"].strip().lower()
        if len(mesh) != 64 or any(c not in "0123456789abcdef" for c in mesh):
            raise UsageError("TAILSCALE_DERPER_MESH_KEY: want 64 hex digits")
    mesh_with = [e.strip() for e in ns.mesh_with.split(",") if e.strip()]
    if mesh_with and mesh is None:
        raise UsageError("--mesh-with needs the mesh key: --mesh-psk-file FILE "
                         "(or TAILSCALE_DERPER_MESH_KEY with --dev)")
    for entry in mesh_with:
        try:
            peer_url(entry)
        except ValueError as e:
            raise UsageError(str(e)) from None
    rate, burst = load_rate_config(ns.rate_config) if ns.rate_config else (None, None)
    return DerperOptions(
        verify_clients=ns.verify_clients, socket=ns.socket,
        verify_client_url=ns.verify_client_url,
        verify_client_url_fail_open=ns.verify_client_url_fail_open,
        private_key=key, addr=addr, hostname=ns.hostname, certmode=ns.certmode,
        certdir=ns.certdir or default_certdir(), http_port=ns.http_port, stun=ns.stun,
        stun_port=ns.stun_port, stun_strict=ns.stun_strict,
        stun_rate_limit=ns.stun_rate_limit, stun_rate_burst=ns.stun_rate_burst,
        stun_global_rate_limit=ns.stun_global_rate_limit, derp=ns.derp, dev=ns.dev,
        home=ns.home,
        bootstrap_dns_names=[n.strip() for n in ns.bootstrap_dns_names.split(",") if n.strip()],
        acme_directory=ns.acme_directory, acme_email=ns.acme_email,
        accept_connection_limit=ns.accept_connection_limit,
        accept_connection_burst=ns.accept_connection_burst, mesh_key=mesh, mesh_with=mesh_with,
        rate_limit_bytes_per_sec=rate, rate_limit_burst=burst, rate_config=ns.rate_config,
        tcp_keepalive=ns.tcp_keepalive_time, tcp_user_timeout=ns.tcp_user_timeout,
        write_timeout=ns.tcp_write_timeout, max_pending_per_ip=ns.max_pending_per_ip)


def reload_on_hup(derper: Derper, opts: DerperOptions) -> None:
    """SIGHUP: re-read the certificate files and ``--rate-config``; whatever is unusable keeps
    its previous value, with one log line."""
    log = logging.getLogger("derper")
    log.info("SIGHUP: reloading certificates%s", " and rate config" if opts.rate_config else "")
    derper.reload_certs()
    if not opts.rate_config:
        return
    try:
        rate, burst = load_rate_config(opts.rate_config)
    except StartupError as e:
        log.error("%s; keeping the previous rate limit", e)
        return
    derper.set_rate_limit(rate, burst)
    log.info("per-client rate limit now %s", f"{rate} bytes/s, burst {burst or 0} bytes"
             if rate else "off")


async def serve(opts: DerperOptions) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    derper = Derper(opts)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_on_hup, derper, opts)
    try:
        await derper.start()
        await stop.wait()
        logging.getLogger("derper").info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await derper.stop(graceful=True)


def _fail(msg: str, code: int) -> int:
    print(f"{PROG}: {msg}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``derper``; returns the exit status."""
    from nodeagent.logconfig import configure_logging

    configure_logging("DERPER_LOG")  # timestamps, or journald's <priority> under systemd
    parser = build_parser()
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--"]:
        args = args[1:]  # `nodeagent derper -- FLAGS` passes the separator through
    try:
        ns = parser.parse_args(go_style(args, parser))
        if ns.version:
            from nodeagent.version import __version__

            print(__version__)
            return 0
        opts = options_from_args(ns)
    except UsageError as e:
        return _fail(f"{e} (see `{PROG} --help`)", 2)
    except StartupError as e:
        return _fail(str(e), 1)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(serve(opts))
    except StartupError as e:
        return _fail(str(e), 1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
