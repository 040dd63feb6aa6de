"""Let's Encrypt (any ACME CA) certificates for ``--certmode letsencrypt``, via ``acme``/``josepy``.

Owns the ACME account key (``acme_account.key`` in ``--certdir``), ordering a certificate for the
hostname with the HTTP-01 challenge (the tokens are served by the ``--http-port`` listener from
``challenges``), writing ``<hostname>.crt``/``.key`` where ``CertStore`` picks them up, and the
renewal loop: renew when a third of the lifetime is left (at most 30 days ahead), re-checked at
least every 12 h, failed orders retried with a doubling back-off (30 s to 1 h). The ``acme``
library is synchronous (requests), so each order runs in a worker thread. The CA's TLS
certificate is verified against the system store, or ``REQUESTS_CA_BUNDLE``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable

import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodeagent_derper.certs import cert_paths, new_ec_key_pem, write_private

log = logging.getLogger("derper.acme")

LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
ACCOUNT_KEY_FILE = "acme_account.key"
ORDER_TIMEOUT = datetime.timedelta(seconds=120)
_MAX_RENEW_AHEAD = datetime.timedelta(days=30)
_MAX_CHECK_INTERVAL = 12 * 3600.0
_FIRST_RETRY = 30.0
_MAX_RETRY = 3600.0
_MIN_GAP = 5.0  # never order twice within this many seconds, however short-lived the cert


class AcmeError(Exception):
    """An ACME order failed; the message says at which step."""


def renewal_due(not_after: datetime.datetime, not_before: datetime.datetime) -> datetime.datetime:
    """When to renew: a third of the lifetime before expiry, at most 30 days before."""
    ahead = min(_MAX_RENEW_AHEAD, (not_after - not_before) / 3)
    return not_after - ahead


class AcmeManager:
    """Obtains and renews the certificate for ``hostname`` from the CA at ``directory_url``."""

    def __init__(self, hostname: str, certdir: str, *, directory_url: str = LETSENCRYPT_DIRECTORY,
                 email: str = "", on_obtained: Callable[[], None] | None = None,
                 on_failed: Callable[[], None] | None = None) -> None:
        self.hostname = hostname
        self.certdir = certdir
        self.directory_url = directory_url
        self.email = email
        self.challenges: dict[str, str] = {}  # token -> key authorization (HTTP-01)
        self._on_obtained = on_obtained
        self._on_failed = on_failed
        self.crt_path, self.key_path = cert_paths(certdir, hostname)
        self.ready = asyncio.Event()

    # --- synchronous ACME work (worker thread) ---

    def _account_key(self) -> jose.JWKEC:
        path = os.path.join(self.certdir, ACCOUNT_KEY_FILE)
        if not os.path.exists(path):
            write_private(path, new_ec_key_pem())
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        return jose.JWKEC(key=key)

    def obtain(self) -> None:
        """Run one complete order (account, HTTP-01, finalize) and store the result."""
        os.makedirs(self.certdir, mode=0o700, exist_ok=True)
        step = "account key"
        try:
            net = client.ClientNetwork(self._account_key(), alg=jose.ES256,
                                       user_agent="nodeagent-derper")
            step = f"directory {self.directory_url}"
            directory = client.ClientV2.get_directory(self.directory_url, net)
            acme = client.ClientV2(directory, net)
            step = "account registration"
            reg = messages.NewRegistration.from_data(
                email=self.email or None, terms_of_service_agreed=True)
            try:
                acme.new_account(reg)
            except errors.ConflictError as e:  # the key already has an account: use it
                net.account = messages.RegistrationResource(uri=e.location,
                                                            body=messages.Registration())
            step = "order"
            key_pem = new_ec_key_pem()
            order = acme.new_order(crypto_util.make_csr(key_pem, [self.hostname]))
            step = "HTTP-01 challenge"
            tokens = []
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                chall = next((c for c in authz.body.challenges
                              if isinstance(c.chall, challenges.HTTP01)), None)
                if chall is None:
                    raise AcmeError(f"the CA offers no HTTP-01 challenge for "
                                    f"{authz.body.identifier.value}")
                response, validation = chall.response_and_validation(net.key)
                token = chall.chall.encode("token")
                self.challenges[token] = validation
                tokens.append(token)
                acme.answer_challenge(chall, response)
            try:
                step = "validation/finalization"
                deadline = datetime.datetime.now() + ORDER_TIMEOUT
                order = acme.poll_and_finalize(order, deadline)
            finally:
                for t in tokens:
                    self.challenges.pop(t, None)
        except AcmeError:
            raise
        except (errors.Error, messages.Error, OSError, ValueError) as e:
            raise AcmeError(f"ACME {step} failed: {_one_line(e)}") from None
        except Exception as e:  # requests' exceptions and josepy's are not OSError subclasses
            raise AcmeError(f"ACME {step} failed: {type(e).__name__}: {_one_line(e)}") from None
        write_private(self.key_path, key_pem)
        write_private(self.crt_path, order.fullchain_pem.encode())
        log.info("obtained certificate for %s from %s", self.hostname, self.directory_url)

    # --- scheduling ---

    def next_renewal(self) -> datetime.datetime | None:
        """When the stored certificate needs renewing; None when there is none usable."""
        try:
            with open(self.crt_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError):
            return None
        if not os.path.exists(self.key_path):
            return None
        return renewal_due(cert.not_valid_after_utc, cert.not_valid_before_utc)

    async def run(self) -> None:
        """Forever: obtain when missing or due, then sleep until the next renewal time;
        failures retry with a doubling back-off."""
        retry = _FIRST_RETRY
        while True:
            now = datetime.datetime.now(datetime.UTC)
            due = self.next_renewal()
            if due is not None and due > now:
                self.ready.set()
                await asyncio.sleep(min(_MAX_CHECK_INTERVAL, (due - now).total_seconds()))
                continue
            try:
                await asyncio.to_thread(self.obtain)
            except AcmeError as e:
                log.error("%s; retrying in %.0fs", e, retry)
                if self._on_failed is not None:
                    self._on_failed()
                await asyncio.sleep(retry)
                retry = min(retry * 2, _MAX_RETRY)
                continue
            retry = _FIRST_RETRY
            if self._on_obtained is not None:
                self._on_obtained()  # swaps the new certificate into the listener
            self.ready.set()
            await asyncio.sleep(_MIN_GAP)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())[:300]
