"""Reloading without a restart: manual certificates (file change and SIGHUP; broken pairs are
refused and the old certificate keeps serving) and ``--rate-config`` on SIGHUP, each checked
with real TLS/DERP connections to a real derper (a subprocess, or ``cli.serve`` in-process for
the SIGHUP-only certificate path)."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nacl.public import PrivateKey

from tests.derptls import free_port
from tests.procutil import stop

pytestmark = pytest.mark.feature("derper")

ENV = {**os.environ, "NO_PROXY": "*"}
HOST = "127.0.0.1"


def make_pair(certdir: Path, *, expired: bool = False) -> tuple[bytes, bytes, int]:
    """A self-signed certificate for 127.0.0.1: (cert PEM, key PEM, serial)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = ((now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
                  if expired else (now - datetime.timedelta(hours=1),
                                   now + datetime.timedelta(days=1)))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(start).not_valid_after(end)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


def install(certdir: Path, crt: bytes, key: bytes) -> None:
    """Replace the pair the way an operator's tooling does: write aside, rename over."""
    for name, data in ((f"{HOST}.key", key), (f"{HOST}.crt", crt)):
        tmp = certdir / (name + ".new")
        tmp.write_bytes(data)
        os.replace(tmp, certdir / name)


def served_serial(port: int) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 15.0,
             proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"derper exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling with a deadline


def insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class StderrLines:
    """Collects a subprocess's stderr lines in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._t.start()

    def _run(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def matching(self, needle: str) -> list[str]:
        return [ln for ln in list(self.lines) if needle in ln]


async def derp_client(port: int) -> Any:
    from nodeagent.derp.client import DerpClient

    return await DerpClient.connect(f"https://{HOST}:{port}/derp", bytes(PrivateKey.generate()),
                                    ssl=insecure_ctx())


async def recv_packets(client: Any, n: int, timeout: float) -> None:
    from nodeagent.derp.client import ReceivedPacket

    got = 0
    async with asyncio.timeout(timeout):
        while got < n:
            if isinstance(await client.recv(), ReceivedPacket):
                got += 1


def debug_vars(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"https://{HOST}:{port}/debug/vars", context=insecure_ctx(),
                                timeout=5) as r:
        return dict(json.load(r))


@pytest.fixture
def derper(tmp_path: Path) -> Any:
    """Our derper subprocess in manual cert mode with a --rate-config (unlimited at first)."""
    certdir = tmp_path / "certs"
    certdir.mkdir()
    crt, key, serial = make_pair(certdir)
    install(certdir, crt, key)
    rate_cfg = tmp_path / "rate.json"
    rate_cfg.write_text("{}")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nodeagent_derper.cli", "-a", f"{HOST}:{port}",
         "--hostname", HOST, "--certmode", "manual", "--certdir", str(certdir),
         "--http-port", "-1", "--stun=false", "--rate-config", str(rate_cfg),
         "-c", str(tmp_path / "derper.key")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    err = StderrLines(proc)
    try:
        wait_for(lambda: bool(err.matching("derper serving")), "the derper to listen", 30, proc)
        yield proc, err, port, certdir, serial, rate_cfg
    finally:
        code = stop(proc)
        if proc.stderr:
            proc.stderr.close()
    assert code == 0, "\n".join(err.lines[-20:])


def test_manual_certificate_reload_on_change_and_broken_pairs(derper: Any) -> None:
    proc, err, port, certdir, serial1, _ = derper
    assert served_serial(port) == serial1

    async def scenario() -> None:
        old_a, old_b = await derp_client(port), await derp_client(port)
        try:
            # A new pair on disk is picked up by polling (no signal) for new connections.
            crt, key, serial2 = make_pair(certdir)
            install(certdir, crt, key)
            await asyncio.to_thread(wait_for, lambda: served_serial(port) == serial2,
                                    "the replaced certificate", 15, proc)

            # Broken pairs: refused with one log line each, serial2 keeps serving.
            _, good_key, _ = make_pair(certdir)
            other_crt, _, _ = make_pair(certdir)
            exp_crt, exp_key, _ = make_pair(certdir, expired=True)
            cases = [(b"not a certificate\n", good_key, "not valid PEM"),
                     (other_crt, good_key, "does not match"),
                     (exp_crt, exp_key, "expired")]
            for i, (c, k, reason) in enumerate(cases, 1):
                install(certdir, c, k)
                await asyncio.to_thread(
                    wait_for, lambda n=i: len(err.matching("certificate refused")) >= n,
                    f"the refusal of pair {i}", 15, proc)
                assert reason in err.matching("certificate refused")[-1]
                assert served_serial(port) == serial2

            # The connections made before all this still relay.
            await old_a.send(old_b.public_key, b"still here")
            await recv_packets(old_b, 1, 5)
        finally:
            await old_a.close()
            await old_b.close()

    asyncio.run(scenario())
    # A good pair after the broken ones loads again; each broken one was logged exactly once.
    crt, key, serial3 = make_pair(certdir)
    install(certdir, crt, key)
    wait_for(lambda: served_serial(port) == serial3, "the certificate after the broken ones",
             15, proc)
    refused = err.matching("certificate refused")
    assert len(refused) == 3, refused
    assert all("Traceback" not in ln for ln in err.lines)
    assert f"serial {serial1:x}" not in "\n".join(refused)  # names the one still serving


def test_rate_config_reloads_on_sighup(derper: Any) -> None:
    proc, err, port, _, _, rate_cfg = derper
    rate = 20_000  # bytes/s; the burst is raised to one full frame (65 568 bytes)

    async def scenario() -> None:
        a, b = await derp_client(port), await derp_client(port)
        try:
            assert "TokenBucketBytesPerSecond" not in a.server_info
            rate_cfg.write_text(json.dumps({"PerClientRateLimitBytesPerSec": rate,
                                            "PerClientRateBurstBytes": 1000}))
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for, lambda: bool(err.matching("rate limit now")),
                                    "the rate config reload", 10, proc)
            c = await derp_client(port)
            assert c.server_info["TokenBucketBytesPerSecond"] == rate
            assert c.server_info["TokenBucketBytesBurst"] == 65_568
            await c.close()

            # ``a`` connected before the reload and is limited now: 120 kB beyond the burst
            # of 65.5 kB takes more than (120 - 65.6) / 20 ≈ 2.7 s to get through.
            pkt = bytes(1200)
            t0 = time.monotonic()
            for _ in range(100):
                a.send_nowait(b.public_key, pkt)
            await a.drain()
            await recv_packets(b, 100, 30)
            elapsed = time.monotonic() - t0
            assert elapsed > 2.0, elapsed
            waits = (await asyncio.to_thread(debug_vars, port))["rate_limit_waits"]
            assert waits >= 1

            # A broken file keeps the values in force, with one log line.
            rate_cfg.write_text("{not json")
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(
                wait_for, lambda: bool(err.matching("keeping the previous rate limit")),
                "the refusal of the broken rate config", 10, proc)
            d = await derp_client(port)
            assert d.server_info["TokenBucketBytesPerSecond"] == rate
            await d.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
    assert len(err.matching("keeping the previous rate limit")) == 1
    assert all("Traceback" not in ln for ln in err.lines)


@pytest.mark.asyncio
async def test_sighup_reloads_certificate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """File polling off: only SIGHUP (to this process, handled by ``cli.serve``) can reload."""
    from nodeagent_derper.app import DerperOptions
    from nodeagent_derper.cli import serve

    certdir = tmp_path / "certs"
    certdir.mkdir()
    crt, key, serial1 = make_pair(certdir)
    install(certdir, crt, key)
    port = free_port()
    opts = DerperOptions(private_key=bytes(PrivateKey.generate()), addr=f"{HOST}:{port}",
                         hostname=HOST, certmode="manual", certdir=str(certdir), http_port=-1,
                         stun=False, cert_poll_interval=0)
    task = asyncio.create_task(serve(opts))
    try:
        def serving() -> bool:
            try:
                return served_serial(port) == serial1
            except OSError:
                return False

        await asyncio.to_thread(wait_for, serving, "the derper to serve", 15)
        crt, key, serial2 = make_pair(certdir)
        install(certdir, crt, key)
        assert await asyncio.to_thread(served_serial, port) == serial1  # nothing polls
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.to_thread(wait_for, lambda: served_serial(port) == serial2,
                                "the certificate after SIGHUP", 10)

        # A mismatched pair on SIGHUP: refused at once, one line, serial2 stays.
        other_crt, _, _ = make_pair(certdir)
        _, other_key, _ = make_pair(certdir)
        install(certdir, other_crt, other_key)
        caplog.clear()
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.to_thread(
            wait_for, lambda: any("refused" in r.getMessage() for r in caplog.records),
            "the refusal", 10)
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1 and "does not match" in refused[0], refused
        assert f"serial {serial2:x}" in refused[0]
        assert await asyncio.to_thread(served_serial, port) == serial2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
