"""TLS for the derper: certificate files in ``--certdir``, hot reload, and the server context.

Owns ``CertStore``: the certificate and key named ``<hostname>.crt`` / ``<hostname>.key`` in the
cert dir (written by the operator in manual mode, by ``AcmeManager`` in letsencrypt mode). The
listening ``SSLContext`` carries no certificate itself; its SNI callback hands each handshake the
context built from the current files, re-reading them when their stat signature changes (checked
at most once a second), so a renewed or replaced certificate is served without a restart. ALPN
offers only ``http/1.1``: DERP needs an HTTP/1.1 connection to upgrade.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("derper.certs")

_RECHECK_SECONDS = 1.0


class CertError(Exception):
    """Certificate files missing or unusable; the message is one line for the operator."""


def cert_paths(certdir: str, hostname: str) -> tuple[str, str]:
    safe = hostname.replace("/", "_")
    return os.path.join(certdir, safe + ".crt"), os.path.join(certdir, safe + ".key")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _sig(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def cert_not_after(cert_pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def _leaf_context(crt: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(crt, key)
    return ctx


class CertStore:
    """The current certificate for ``hostname`` from ``certdir``, reloaded when it changes.

    ``on_load(not_after_unix)`` is called after each successful (re)load.
    """

    def __init__(self, certdir: str, hostname: str, *,
                 on_load: Callable[[float], None] | None = None,
                 require_sni_match: bool = True) -> None:
        self.certdir = certdir
        self.hostname = hostname
        self.crt_path, self.key_path = cert_paths(certdir, hostname)
        self._on_load = on_load
        self._require_sni = require_sni_match and not is_ip(hostname)
        self._ctx: ssl.SSLContext | None = None
        self._sig: tuple | None = None
        self._checked = 0.0
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._ctx is not None

    def load(self) -> None:
        """Load the files now; ``CertError`` with a one-line reason when they are unusable."""
        for p in (self.crt_path, self.key_path):
            if not os.path.exists(p):
                raise CertError(f"certificate file {p} does not exist")
        try:
            sig = (_sig(self.crt_path), _sig(self.key_path))
            ctx = _leaf_context(self.crt_path, self.key_path)
            with open(self.crt_path, "rb") as f:
                not_after = cert_not_after(f.read())
        except (OSError, ssl.SSLError, ValueError) as e:
            msg = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
            raise CertError(f"cannot load {self.crt_path} / {self.key_path}: {msg}") from None
        self._ctx, self._sig = ctx, sig
        self.loads += 1
        if self._on_load is not None:
            self._on_load(not_after.timestamp())
        log.info("loaded certificate for %s (expires %s)", self.hostname, not_after.isoformat())

    def maybe_reload(self) -> None:
        """Reload when the files' stat signature changed; keep the old context on failure."""
        now = time.monotonic()
        if self._ctx is not None and now - self._checked < _RECHECK_SECONDS:
            return
        self._checked = now
        try:
            sig = (_sig(self.crt_path), _sig(self.key_path))
        except OSError:
            return
        if sig == self._sig:
            return
        try:
            self.load()
        except CertError as e:
            if self._ctx is not None:
                log.warning("keeping the previous certificate: %s", e)
            self._sig = sig  # do not retry a broken pair every second; wait for a new change

    def _sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
             _base: ssl.SSLContext) -> int | None:
        if self._require_sni and server_name is not None and \
                server_name.lower().rstrip(".") != self.hostname.lower():
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        self.maybe_reload()
        if self._ctx is None:
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        sslobj.context = self._ctx
        return None

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: no certificate of its own, the SNI callback supplies it."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._sni
        return ctx


def write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_ec_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ensure_self_signed_for_ip(certdir: str, ip: str) -> str | None:
    """For an IP ``--hostname`` in manual mode without files: create a self-signed certificate
    and return the ``sha256-raw:<hex>`` CertName a DERP map entry pins; None if files exist."""
    crt, key = cert_paths(certdir, ip)
    if os.path.exists(crt) and os.path.exists(key):
        return None
    os.makedirs(certdir, mode=0o700, exist_ok=True)
    key_pem = new_ec_key_pem()
    priv = serialization.load_pem_private_key(key_pem, password=None)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(priv.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(priv, hashes.SHA256()))  # type: ignore[arg-type]
    write_private(key, key_pem)
    write_private(crt, cert.public_bytes(serialization.Encoding.PEM))
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()
