"""Let's Encrypt certmode against Debian's ``pebble`` ACME test server, with a real HTTP-01.

Everything runs inside one fresh network namespace so the derper can own ports 443 and 80
(Tailscale's rule: TLS only on 443 or in manual mode): ``pebble-challtestsrv`` is the DNS
answering 127.0.0.1 for ``derp.test``, pebble's VA fetches the token from the derper's
``--http-port 80``, and then curl (hostname-verified) and two DERP clients use the issued
certificate over TLS. Pebble issues certificates valid for ``CERT_LIFETIME`` seconds (its
config's ``certificateValidityPeriod``, pebble ≥ 2.3), so the derper renews while the test runs:
a new TLS connection then gets a new serial while the two DERP clients keep relaying.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nacl.public import PrivateKey

from tests.netns import call_in_netns, make_netns, popen_in_netns, run_in_netns, skip_unless_netns

pytestmark = pytest.mark.feature("derper")

ENV = {**os.environ, "NO_PROXY": "*"}  # the installed nodeagent_derper, never a checkout path
CERT_LIFETIME = 24  # seconds: renewed when a third is left, i.e. about 16 s after issuance


def _pebble_listener_cert(tmp: Path) -> Path:
    """A throwaway CA and a certificate for pebble's own HTTPS on 127.0.0.1 (Debian's pebble
    ships no test certificates)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble listener test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                False)
            .sign(ca_key, hashes.SHA256()))
    (tmp / "pebble.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp / "pebble.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ca_path = tmp / "listener-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_path


def _wait(pred, what: str, timeout: float, procs: list[subprocess.Popen]) -> None:  # type: ignore[no-untyped-def,type-arg]
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() is not None:
                err = p.stderr.read() if p.stderr else ""
                raise AssertionError(f"{p.args[3:5]} exited while waiting for {what}: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling with a deadline


def test_letsencrypt_mode_with_pebble(tmp_path: Path) -> None:
    for tool in ("pebble", "pebble-challtestsrv", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package "
                        f"{'curl' if tool == 'curl' else 'pebble'})")
    skip_unless_netns()
    listener_ca = _pebble_listener_cert(tmp_path)
    cfg = tmp_path / "pebble.json"
    cfg.write_text(json.dumps({"pebble": {
        "listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
        "certificate": str(tmp_path / "pebble.crt"), "privateKey": str(tmp_path / "pebble.key"),
        "httpPort": 80, "tlsPort": 5001, "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
        "certificateValidityPeriod": CERT_LIFETIME}}))
    certdir = tmp_path / "certs"
    procs: list[subprocess.Popen[str]] = []
    with make_netns("acme") as ns:
        try:
            procs.append(popen_in_netns(ns, [
                "pebble-challtestsrv", "-dns01", "127.0.0.1:8053", "-http01", "",
                "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055",
                "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            procs.append(popen_in_netns(ns, [
                "pebble", "-config", str(cfg), "-dnsserver", "127.0.0.1:8053"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env={**ENV, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}))
            derper = popen_in_netns(ns, [
                sys.executable, "-m", "nodeagent_derper.cli", "-a", ":443",
                "--hostname", "derp.test", "--certmode", "letsencrypt",
                "--certdir", str(certdir), "--http-port", "80",
                "--acme-directory", "https://127.0.0.1:14000/dir",
                "--acme-email", "ops@derp.test", "--stun=false",
                "-c", str(tmp_path / "derper.key")],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                env={**ENV, "REQUESTS_CA_BUNDLE": str(listener_ca)})
            procs.append(derper)
            crt = certdir / "derp.test.crt"
            _wait(crt.exists, "the ACME certificate", 90, procs)
            assert (certdir / "acme_account.key").exists()
            assert oct((certdir / "derp.test.key").stat().st_mode & 0o777) == "0o600"

            root = run_in_netns(ns, ["curl", "-sf", "--cacert", str(listener_ca),
                                     "https://127.0.0.1:15000/roots/0"], timeout=20)
            assert root.returncode == 0, root.stderr
            root_pem = tmp_path / "pebble-root.pem"
            root_pem.write_text(root.stdout)

            # Hostname-verified HTTPS with the issued certificate (served once it is on disk).
            def fetch() -> subprocess.CompletedProcess[str]:
                return run_in_netns(ns, [
                    "curl", "-s", "-D", "-", "-o", "/dev/null", "--cacert", str(root_pem),
                    "--resolve", "derp.test:443:127.0.0.1", "-H",
                    "X-Tailscale-Challenge: acme-ok", "https://derp.test/generate_204"],
                    timeout=20)
            _wait(lambda: fetch().returncode == 0, "HTTPS with the new certificate", 20, procs)
            out = fetch().stdout
            assert out.startswith("HTTP/1.1 204"), out
            assert "x-tailscale-response: response acme-ok" in out.lower()

            # Plain port 80 now redirects to HTTPS.
            r = run_in_netns(ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} "
                                  "%{redirect_url}", "-H", "Host: derp.test",
                                  "http://127.0.0.1/derp"], timeout=20)
            assert r.stdout == "302 https://derp.test/derp", r.stdout

            # DERP over TLS with the ACME certificate (chain verified against pebble's root).
            async def derp_exchange() -> None:
                import ssl

                from nodeagent.derp.client import DerpClient, ReceivedPacket

                ctx = ssl.create_default_context(cafile=str(root_pem))
                ctx.check_hostname = False  # dialled by IP; curl above checked the name
                a = await DerpClient.connect("https://127.0.0.1/derp",
                                             bytes(PrivateKey.generate()), ssl=ctx)
                b = await DerpClient.connect("https://127.0.0.1/derp",
                                             bytes(PrivateKey.generate()), ssl=ctx)
                async def relay(data: bytes) -> None:
                    await a.send(b.public_key, data)
                    while True:
                        ev = await asyncio.wait_for(b.recv(), 5)
                        if isinstance(ev, ReceivedPacket):
                            break
                    assert ev.data == data and ev.src == a.public_key

                def serial() -> int:  # of the certificate a new TLS connection gets
                    with socket.create_connection(("127.0.0.1", 443), timeout=5) as raw, \
                            ctx.wrap_socket(raw) as tls:  # chain verified against the root
                        der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    return int(x509.load_der_x509_certificate(der).serial_number)

                try:
                    await relay(b"via acme tls")
                    # Renewal before expiry, swapped in without a restart: a new connection
                    # sees a new serial, the connections made before keep working.
                    first = await asyncio.to_thread(serial)
                    deadline = time.monotonic() + CERT_LIFETIME + 20
                    while (now := await asyncio.to_thread(serial)) == first:
                        assert time.monotonic() < deadline, "the certificate was not renewed"
                        await asyncio.sleep(0.2)
                    assert now != first
                    await relay(b"after renewal")
                finally:
                    await a.close()
                    await b.close()

            call_in_netns(ns, lambda: asyncio.run(derp_exchange()), timeout=CERT_LIFETIME + 40)
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        assert derper.returncode == 0, derper.stderr.read() if derper.stderr else ""


def test_renewal_schedule() -> None:
    from nodeagent_derper.acme_manager import renewal_due

    t0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    day = datetime.timedelta(days=1)
    assert renewal_due(t0 + 90 * day, t0) == t0 + 60 * day  # at most 30 days ahead
    assert renewal_due(t0 + 6 * day, t0) == t0 + 4 * day  # short-lived: a third of the life
