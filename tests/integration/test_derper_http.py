"""The derper's HTTP side in-process on loopback: endpoints, /debug/ access, metrics, accept
limit, and TLS in manual certmode (served from --certdir, reloaded on change, http/1.1 ALPN,
the --http-port redirector)."""

from __future__ import annotations

import asyncio
import datetime
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from nacl.public import PrivateKey

from tests.derptls import inproc_derpers

pytestmark = pytest.mark.feature("derper")


@pytest_asyncio.fixture
async def derper_factory() -> AsyncIterator[Callable[..., Any]]:
    async with inproc_derpers(stun_port=0, http_port=0) as make:
        yield make


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.request(kw.pop("method", "GET"), url,
                                                       allow_redirects=False, **kw) as r:
        return r.status, dict(r.headers), await r.read()


# --- plain HTTP endpoints ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_generate_204_challenge(derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory(addr="127.0.0.1:0", certmode="letsencrypt")
    assert not d.tls
    base = f"http://127.0.0.1:{d.main_port}"
    st, hdr, body = await get(base + "/generate_204", headers={"X-Tailscale-Challenge": "ts_a.b"})
    assert st == 204 and body == b""
    assert hdr["X-Tailscale-Response"] == "response ts_a.b"
    assert hdr["Cache-Control"] == "no-cache, no-store, must-revalidate, no-transform, max-age=0"
    for bad in ("x" * 65, "bad value", "a/b"):
        st, hdr, _ = await get(base + "/generate_204", headers={"X-Tailscale-Challenge": bad})
        assert st == 204 and "X-Tailscale-Response" not in hdr
    st, hdr, _ = await get(base + "/generate_204")
    assert st == 204 and "X-Tailscale-Response" not in hdr


@pytest.mark.asyncio
async def test_probe_robots_home_bootstrap(derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory(bootstrap_dns_names=["localhost"])
    base = f"http://127.0.0.1:{d.main_port}"
    for path in ("/derp/probe", "/derp/latency-check"):
        for method in ("GET", "HEAD"):
            st, hdr, _ = await get(base + path, method=method)
            assert st == 200 and hdr["Access-Control-Allow-Origin"] == "*"
        st, _, _ = await get(base + path, method="POST")
        assert st == 405
    st, hdr, body = await get(base + "/robots.txt")
    assert body == b"User-agent: *\nDisallow: /\n" and hdr["X-Frame-Options"] == "DENY"
    st, _, body = await get(base + "/")
    assert st == 200 and b"DERP" in body and b"/debug/" in body  # loopback may debug
    await d.bootstrap.refresh()
    st, hdr, body = await get(base + "/bootstrap-dns")
    table = json.loads(body)
    assert "127.0.0.1" in table["localhost"] and hdr["Content-Type"].startswith("application/json")
    assert b"\t" in body  # tab-indented, as Tailscale's
    assert d.registry.get_sample_value("bootstrap_dns_requests_total") == 1


@pytest.mark.asyncio
async def test_home_blank_and_redirect(derper_factory: Callable[..., Any]) -> None:
    blank = await derper_factory(home="blank")
    st, _, body = await get(f"http://127.0.0.1:{blank.main_port}/")
    assert st == 200 and body == b""
    redir = await derper_factory(home="https://example.com/derp-info")
    st, hdr, _ = await get(f"http://127.0.0.1:{redir.main_port}/")
    assert st == 302 and hdr["Location"] == "https://example.com/derp-info"


@pytest.mark.asyncio
async def test_derp_disabled_and_login(derper_factory: Callable[..., Any]) -> None:
    from nodeagent.derp.client import DerpClient

    off = await derper_factory(derp=False)
    st, _, _ = await get(f"http://127.0.0.1:{off.main_port}/derp")
    assert st == 404
    on = await derper_factory()
    c = await DerpClient.connect(f"http://127.0.0.1:{on.main_port}/derp",
                                 bytes(PrivateKey.generate()))
    try:
        assert c.server_public_key == bytes(PrivateKey(on.opts.private_key).public_key)
    finally:
        await c.close()


# --- debug ------------------------------------------------------------------------------------


def test_debug_acl_addresses() -> None:
    from nodeagent_derper.debug import debug_allowed_ip

    for ok in ("127.0.0.1", "127.5.6.7", "::1", "100.64.0.1", "100.127.255.254",
               "fd7a:115c:a1e0::1", "::ffff:127.0.0.1", "::ffff:100.100.100.100"):
        assert debug_allowed_ip(ok), ok
    for no in ("198.18.0.2", "10.0.0.1", "100.115.92.1", "100.63.255.255", "100.128.0.0",
               "fd7a:115c:a1e1::1", "2001:db8::1", "", None, "garbage"):
        assert not debug_allowed_ip(no), no


@pytest.mark.asyncio
async def test_debug_pages_and_forwarded_denied(derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory()
    base = f"http://127.0.0.1:{d.main_port}"
    st, _, body = await get(base + "/debug/")
    assert st == 200 and b"/debug/varz" in body and b"/debug/pprof/goroutine" in body
    st, _, body = await get(base + "/debug/", headers={"X-Forwarded-For": "127.0.0.1"})
    assert st == 403 and b"debug access denied" in body
    st, _, body = await get(base + "/debug/pprof/goroutine")
    assert st == 200 and b"asyncio tasks:" in body and b"thread MainThread" in body
    st, _, body = await get(base + "/debug/pprof/profile?seconds=0.3")
    assert st == 200 and body.startswith(b"# sampling profile: 0.3s")
    assert b";" in body  # collapsed stacks of the sampled threads
    st, _, body = await get(base + "/debug/pprof/heap?seconds=0.1")
    assert st == 200 and body.startswith(b"# tracemalloc:")
    st, _, _ = await get(base + "/debug/pprof/profile?seconds=1000")
    assert st == 400
    st, _, body = await get(base + "/debug/vars")
    assert st == 200 and "current_connections" in json.loads(body)


@pytest.mark.asyncio
async def test_varz_passes_promtool(derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory()
    st, hdr, body = await get(f"http://127.0.0.1:{d.main_port}/debug/varz")
    assert st == 200 and hdr["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in ("stun_requests_total{disposition=\"success\"}", "process_resident_memory_bytes",
                 "derper_uptime_seconds", "tls_listener_accepted_connections_total"):
        assert name in text, name
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                       timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        (r.stdout + r.stderr).decode()


@pytest.mark.asyncio
async def test_accept_rate_limit_closes_excess(derper_factory: Callable[..., Any]) -> None:
    d = await derper_factory(accept_connection_limit=0.001, accept_connection_burst=2)
    results = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", d.main_port)
        writer.write(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            data = await asyncio.wait_for(reader.read(), 5.0)
        except ConnectionResetError:
            data = b""
        writer.close()
        results.append(data.split(b"\r\n", 1)[0])
    assert results == [b"HTTP/1.1 204 No Content"] * 2 + [b""]
    assert d.registry.get_sample_value("tls_listener_rejected_connections_total") == 1
    assert d.registry.get_sample_value("tls_listener_accepted_connections_total") == 2


# --- TLS, manual certmode ---------------------------------------------------------------------


class CA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodeagent test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.name = name
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, names: list[str]) -> tuple[bytes, bytes, int]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        san = [x509.IPAddress(__import__("ipaddress").ip_address(n)) if n[0].isdigit()
               else x509.DNSName(n) for n in names]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.name).public_key(key.public_key()).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(san), False)
                .sign(self.key, hashes.SHA256()))
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()), serial)


def client_ctx(ca_pem: bytes, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def served_cert(port: int, ca_pem: bytes, sni: str = "derp.test",
                alpn: list[str] | None = None) -> tuple[int, str | None]:
    """(serial of the served certificate, negotiated ALPN) — verified against the CA."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client_ctx(ca_pem, alpn).wrap_socket(raw, server_hostname=sni) as s:
        der = s.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number, s.selected_alpn_protocol()


@pytest.mark.asyncio
async def test_manual_certmode_serves_and_reloads(tmp_path: Path,
                                                  derper_factory: Callable[..., Any]) -> None:
    ca = CA()
    crt, key, serial1 = ca.issue(["derp.test"])
    (tmp_path / "derp.test.crt").write_bytes(crt)
    (tmp_path / "derp.test.key").write_bytes(key)
    d = await derper_factory(certmode="manual", hostname="derp.test", certdir=str(tmp_path))
    assert d.tls and d.http_port > 0
    got = await asyncio.to_thread(served_cert, d.main_port, ca.pem(), "derp.test",
                                  ["h2", "http/1.1"])
    assert got == (serial1, "http/1.1")  # never h2: DERP needs an HTTP/1.1 upgrade

    ctx = client_ctx(ca.pem())
    async with aiohttp.ClientSession() as s, s.get(
            f"https://127.0.0.1:{d.main_port}/generate_204", ssl=ctx,
            server_hostname="derp.test", headers={"X-Tailscale-Challenge": "c1"}) as r:
        assert r.status == 204 and r.headers["X-Tailscale-Response"] == "response c1"

    # A wrong SNI name is refused.
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(served_cert, d.main_port, ca.pem(), "other.test")

    # Replace the files: new handshakes get the new certificate, no restart.
    crt2, key2, serial2 = ca.issue(["derp.test"])
    (tmp_path / "derp.test.key.new").write_bytes(key2)
    (tmp_path / "derp.test.crt.new").write_bytes(crt2)
    (tmp_path / "derp.test.key.new").replace(tmp_path / "derp.test.key")
    (tmp_path / "derp.test.crt.new").replace(tmp_path / "derp.test.crt")
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        serial, _ = await asyncio.to_thread(served_cert, d.main_port, ca.pem())
        if serial == serial2 or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.2)  # poll: the store re-checks file signatures once a second
    assert serial == serial2
    assert d.registry.get_sample_value("derper_cert_reloads_total") == 2

    # DERP over TLS.
    from nodeagent.derp.client import DerpClient

    c = await DerpClient.connect(f"https://127.0.0.1:{d.main_port}/derp",
                                 bytes(PrivateKey.generate()), ssl=_ctx_for_ip(ca.pem()))
    await c.close()

    # The plain --http-port listener: redirect, 400 for non-GET, 204, ACME 404.
    hp = f"http://127.0.0.1:{d.http_port}"
    st, hdr, _ = await get(hp + "/some/path?q=1", headers={"Host": "derp.test"})
    assert st == 302 and hdr["Location"] == f"https://derp.test:{d.main_port}/some/path?q=1"
    st, _, body = await get(hp + "/x", method="POST")
    assert st == 400 and b"Use HTTPS" in body
    st, _, _ = await get(hp + "/generate_204")
    assert st == 204
    st, hdr, _ = await get(hp + "/")
    assert st == 302 and hdr["Location"] == "/debug/"  # loopback may debug
    st, _, _ = await get(hp + "/.well-known/acme-challenge/nope")
    assert st == 404


def _ctx_for_ip(ca_pem: bytes) -> ssl.SSLContext:
    # The test dials 127.0.0.1 (no SNI); the chain is still verified against the CA.
    ctx = client_ctx(ca_pem)
    ctx.check_hostname = False
    return ctx


@pytest.mark.asyncio
async def test_manual_certmode_ip_hostname_self_signed(tmp_path: Path,
                                                       derper_factory: Callable[..., Any]
                                                       ) -> None:
    d = await derper_factory(certmode="manual", hostname="127.0.0.1", certdir=str(tmp_path),
                             http_port=-1)
    assert (tmp_path / "127.0.0.1.crt").exists() and d.http_port == 0
    ca_pem = (tmp_path / "127.0.0.1.crt").read_bytes()  # self-signed: it is its own CA
    _, alpn = await asyncio.to_thread(served_cert, d.main_port, ca_pem, "127.0.0.1",
                                      ["http/1.1"])
    assert alpn == "http/1.1"
