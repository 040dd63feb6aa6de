"""TLS for the derper: certificate files in ``--certdir``, hot reload, and the server context.

Owns ``CertStore``: the certificate and key named ``<hostname>.crt`` / ``<hostname>.key`` in the
cert dir (written by the operator in manual mode, by ``AcmeManager`` in letsencrypt mode). The
listening ``SSLContext`` carries no certificate itself; its SNI callback hands each handshake the
context built from the current files. The derper polls the files' stat signature every few
seconds and reloads on SIGHUP, so a renewed or replaced certificate serves new connections
without a restart (established ones keep theirs); a broken new pair is refused and the old one
stays. ALPN offers only ``http/1.1``: DERP needs an HTTP/1.1 connection to upgrade.
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

POLL_SECONDS = 2.0  # how often the derper stats the certificate files
_SETTLE_SECONDS = 1.0  # files younger than this that fail to load may be half-written


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
    """The current certificate for ``hostname`` from ``certdir``, swapped in when it changes.

    ``poll()`` (cheap: two ``stat`` calls) reloads when the files' signature changed;
    ``reload()`` reloads now (SIGHUP, a fresh ACME certificate). A new pair that does not load
    — unparseable, key not matching, already expired — is refused with one log line and the
    previous certificate keeps serving. ``on_load(not_after_unix)`` runs after each load.
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
        self._sig: tuple | None = None  # signature of the files last loaded or refused
        self._unsettled: tuple | None = None  # a failing signature seen once (maybe half-written)
        self.serial: int | None = None
        self.not_after: datetime.datetime | None = None
        self.loads = 0
        self.refusals = 0

    @property
    def loaded(self) -> bool:
        return self._ctx is not None

    def _signature(self) -> tuple:
        return (_sig(self.crt_path), _sig(self.key_path))

    def load(self, *, reject_expired: bool = False) -> None:
        """Load the files now; ``CertError`` with a one-line reason when they are unusable
        (also when already expired and ``reject_expired``). On error nothing changes."""
        for p in (self.crt_path, self.key_path):
            if not os.path.exists(p):
                raise CertError(f"certificate file {p} does not exist")
        where = f"{self.crt_path} / {self.key_path}"
        try:
            sig = self._signature()
            with open(self.crt_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            ctx = _leaf_context(self.crt_path, self.key_path)
        except ssl.SSLError as e:
            reason = e.reason or ""
            if reason == "KEY_VALUES_MISMATCH":
                reason = "the private key does not match the certificate"
            elif not reason or "PEM" in str(e):
                reason = "the private key (or the chain) is not valid PEM"
            raise CertError(f"cannot load {where}: {reason}") from None
        except ValueError as e:
            raise CertError(f"cannot load {where}: certificate is not valid PEM "
                            f"({' '.join(str(e).split())[:120]})") from None
        except OSError as e:
            raise CertError(f"cannot load {where}: {e.strerror or e}") from None
        not_after = cert.not_valid_after_utc
        expired = not_after <= datetime.datetime.now(datetime.UTC)
        if expired and reject_expired:
            raise CertError(f"certificate {self.crt_path} (serial {cert.serial_number:x}) "
                            f"expired at {not_after.isoformat()}")
        self._ctx, self._sig, self._unsettled = ctx, sig, None
        self.serial, self.not_after = cert.serial_number, not_after
        self.loads += 1
        if self._on_load is not None:
            self._on_load(not_after.timestamp())
        if expired:
            log.warning("certificate %s expired at %s; serving it anyway", self.crt_path,
                        not_after.isoformat())
        log.info("loaded certificate for %s (serial %x, expires %s)", self.hostname,
                 cert.serial_number, not_after.isoformat())

    def _refuse(self, sig: tuple | None, e: CertError) -> None:
        self._sig, self._unsettled = sig, None  # not again until the files change
        self.refusals += 1
        if self._ctx is not None:
            log.error("new certificate refused, still serving serial %x: %s", self.serial or 0, e)
        else:
            log.error("no usable certificate: %s", e)

    def poll(self) -> bool:
        """Reload when the files changed since the last load; True when a new one is in use.
        A failing pair written within the last second is retried at the next poll (the writer
        may be between the two files); otherwise it is refused until the files change again."""
        try:
            sig = self._signature()
        except OSError:
            return False  # a file is missing for now (being replaced); keep serving
        if sig == self._sig:
            return False
        try:
            self.load(reject_expired=True)
        except CertError as e:
            newest = max(sig[0][0], sig[1][0]) / 1e9
            if sig == self._unsettled or time.time() - newest > _SETTLE_SECONDS:
                self._refuse(sig, e)
            else:
                self._unsettled = sig
            return False
        return True

    def reload(self) -> bool:
        """Reload now (SIGHUP, a renewed certificate); True when the new pair is in use."""
        try:
            sig: tuple | None = self._signature()
        except OSError:
            sig = None
        try:
            self.load(reject_expired=True)
        except CertError as e:
            self._refuse(sig, e)
            return False
        return True

    def _sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
             _base: ssl.SSLContext) -> int | None:
        if self._require_sni and server_name is not None and \
                server_name.lower().rstrip(".") != self.hostname.lower():
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ctx = self._ctx
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        sslobj.context = ctx
        return None

    def server_context(self) -> ssl.SSLContext:
        """The listener's context: no certificate of its own, the SNI callback hands each
        handshake the current certificate's context (so a swap affects new connections only)."""
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
