"""Client admission of the derper: ``--verify-clients`` and ``--verify-client-url``.

Owns the two checks a logging-in node key passes before the relay registers it, the short cache
of the local agent's answers, and the refusal bookkeeping (reasons, metrics, log lines):

* :class:`LocalAPIVerifier` (``--verify-clients``): asks the node agent on this machine, over its
  LocalAPI Unix socket (``--socket``), ``GET /localapi/v0/whois?addr=nodekey:<hex>``. 200 (the key
  is the agent's own or a peer in its netmap) admits, 404 refuses. Both answers are cached for a
  few seconds in a bounded :class:`VerdictCache`, so a node deleted from control is refused soon
  after the agent's netmap drops it, and a storm of strangers costs the agent one request per key
  at most every few seconds. An agent that cannot be reached, or answers anything else, refuses
  (fail closed) and is not cached; the first failure is logged in one line, repeats are counted
  into the next (at most one line per interval), and recovery is logged once.
* :class:`URLVerifier` (``--verify-client-url``): Tailscale's admission webhook. ``POST`` JSON
  ``{"NodePublic": "nodekey:<hex>", "Source": "<ip>"}``, 5 s deadline; 200 with (the first
  4 KiB of) ``{"Allow": true}`` admits; another status, unusable JSON or ``Allow`` false refuses;
  an unreachable or timed-out URL admits when ``--verify-client-url-fail-open`` (the default)
  and refuses otherwise.
* :class:`Admission`: the ``verify_client`` callable of the ``DerpServer``. Runs the
  configured checks in that order (all must admit), counts refusals by reason
  (``derper_clients_refused_total{reason}`` on ``/debug/varz``, ``admission`` in
  ``/debug/vars``) and logs a refusal as one line with the key's prefix and the source address
  (at most one line per reason per second, the rest counted). The refused client gets a
  :class:`Verdict` whose ``message`` the connection sends in a Health frame before it closes.

Parsing the webhook's answer and the cache are plain functions/classes without I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodeagent.netguard import ThrottledLog

log = logging.getLogger("derper.verify")

ALLOW_TTL = 5.0  # seconds an admitting answer of the agent is reused
DENY_TTL = 3.0  # seconds a refusing (404) answer is reused
CACHE_ENTRIES = 16384  # bounded: strangers with random keys cannot grow it without limit
LOCALAPI_TIMEOUT = 5.0
LOCALAPI_CONCURRENCY = 32  # simultaneous whois requests to the agent
UNREACHABLE_LOG_INTERVAL = 60.0
REFUSAL_LOG_INTERVAL = 1.0
URL_TIMEOUT = 5.0  # Tailscale's deadline for the admission webhook
URL_READ_LIMIT = 4096  # bytes of the webhook's answer that are read
CAPABILITY_HEADER = ("Tailscale-Cap", "138")  # what Tailscale's LocalAPI clients send

REASONS = ("unknown_key", "agent_unreachable", "agent_error", "url_denied", "url_error",
           "url_unreachable")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One admission decision. Truthy when the client is admitted; a refusal carries a metric
    ``reason`` (one of :data:`REASONS`) and a one-line ``message`` for the client and the log."""

    allowed: bool
    reason: str = ""
    message: str = ""

    def __bool__(self) -> bool:
        return self.allowed


ADMIT = Verdict(True)


def key_text(key: bytes) -> str:
    return "nodekey:" + key.hex()


def short_key(key: bytes) -> str:
    """The key prefix used in log lines (as Tailscale shortens keys: 5 hex digits)."""
    return f"[{key.hex()[:5]}]" if key else "[?]"


def source_ip(remote: Any) -> str:
    """The client's IP from a peername tuple (IPv4-mapped IPv6 unmapped, zone dropped); "" when
    unknown."""
    if not remote:
        return ""
    host = str(remote[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


# --- the cache (no I/O) ------------------------------------------------------------------------


class VerdictCache:
    """Verdicts by node key, each valid for its TTL; at most ``max_entries`` (the least recently
    stored go first). ``clock`` is injectable for tests."""

    __slots__ = ("allow_ttl", "deny_ttl", "max_entries", "clock", "_d")

    def __init__(self, allow_ttl: float = ALLOW_TTL, deny_ttl: float = DENY_TTL,
                 max_entries: int = CACHE_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be ≥ 1")
        self.allow_ttl, self.deny_ttl, self.max_entries = allow_ttl, deny_ttl, max_entries
        self.clock = clock
        self._d: OrderedDict[bytes, tuple[float, Verdict]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: bytes) -> Verdict | None:
        hit = self._d.get(key)
        if hit is None:
            return None
        if self.clock() >= hit[0]:
            del self._d[key]
            return None
        return hit[1]

    def put(self, key: bytes, v: Verdict) -> None:
        ttl = self.allow_ttl if v.allowed else self.deny_ttl
        if ttl <= 0:
            return
        d = self._d
        d[key] = (self.clock() + ttl, v)
        d.move_to_end(key)
        while len(d) > self.max_entries:
            d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()


# --- the webhook's answer (no I/O) ------------------------------------------------------------


def parse_admit_response(body: bytes) -> bool:
    """``Allow`` of a DERPAdmitClientResponse (``{"Allow": bool}``; keys matched without regard
    to case, as Go's decoder does; a missing ``Allow`` is false). ValueError (one line) for
    anything that is not such an object. Never raises anything else."""
    try:
        # Like Go's json.Decoder: the first JSON value counts, whatever follows it does not
        # (the answer may be cut at the read limit after a complete object).
        obj, _ = json.JSONDecoder().raw_decode(body.decode("utf-8").lstrip(" \t\r\n"))
    except UnicodeDecodeError:
        raise ValueError("answer is not UTF-8") from None
    except RecursionError:
        raise ValueError("answer is not usable JSON: nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"answer is not JSON: {' '.join(str(e).split())}") from None
    if not isinstance(obj, dict):
        raise ValueError("answer is not a JSON object")
    allow: Any = False
    for k, v in obj.items():
        if k.lower() == "allow":
            allow = v  # Go: the last matching key wins
    if not isinstance(allow, bool):
        raise ValueError("answer's Allow is not a boolean")
    return allow


def admit_request_body(key: bytes, source: str) -> bytes:
    """The DERPAdmitClientRequest JSON for ``key`` connecting from ``source``."""
    return json.dumps({"NodePublic": key_text(key), "Source": source}).encode()


# --- the checks -------------------------------------------------------------------------------


class LocalAPIVerifier:
    """``--verify-clients``: the local agent's netmap decides (see the module docstring)."""

    name = "local agent"

    def __init__(self, socket_path: str, *, cache: VerdictCache | None = None,
                 timeout: float = LOCALAPI_TIMEOUT,
                 unreachable_log_interval: float = UNREACHABLE_LOG_INTERVAL) -> None:
        self.socket_path = socket_path
        self.cache = cache if cache is not None else VerdictCache()
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[bytes, asyncio.Task[Verdict]] = {}
        self._sem = asyncio.Semaphore(LOCALAPI_CONCURRENCY)
        self._down_log = ThrottledLog(log, unreachable_log_interval)
        self.down = False  # the last request failed to reach the agent
        self.requests = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A connection per request (force_close): the agent closes idle keep-alive
            # connections, and a request racing that close would refuse a member.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path, force_close=True,
                                                limit=LOCALAPI_CONCURRENCY),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def close(self) -> None:
        for t in list(self._inflight.values()):
            t.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, key: bytes, source: str) -> Verdict:
        v = self.cache.get(key)
        if v is not None:
            return v
        task = self._inflight.get(key)
        if task is None:
            # A task of its own: the same key logging in twice at once makes one request, and a
            # connection that goes away meanwhile does not cancel the others' answer.
            task = asyncio.get_running_loop().create_task(self._ask(key, source))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(task)

    async def _ask(self, key: bytes, source: str) -> Verdict:
        q = urllib.parse.quote(key_text(key), safe="")
        url = f"http://local-tailscaled.sock/localapi/v0/whois?addr={q}"
        self.requests += 1
        try:
            async with self._sem, self._http().get(url, headers=[CAPABILITY_HEADER]) as r:
                status = r.status
                text = (await r.content.read(512)).decode("utf-8", "replace") if status != 200 \
                    else ""
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            why = "no answer in time" if isinstance(e, TimeoutError) else _oserror_text(e)
            self.down = True
            self._down_log.warning(
                "--verify-clients: cannot reach the local nodeagent at %s (%s); refusing every "
                "client until it answers (this one: %s from %s)", self.socket_path, why,
                short_key(key), source or "?")
            return Verdict(False, "agent_unreachable",
                           "DERP server cannot check clients now (its local node agent is "
                           "unreachable)")
        if self.down:
            self.down = False
            log.info("--verify-clients: the local nodeagent at %s answers again",
                     self.socket_path)
        if status == 200:
            self.cache.put(key, ADMIT)
            return ADMIT
        if status == 404:
            v = Verdict(False, "unknown_key",
                        "DERP server does not admit this node key: not in its tailnet")
            self.cache.put(key, v)
            return v
        detail = " ".join(_error_text(text).split())[:200]
        if "invalid 'addr' parameter" in detail:
            detail = "its agent does not know node-key lookups (too old?)"
        return Verdict(False, "agent_error",
                       f"DERP server cannot check clients now (local node agent answered "
                       f"{status}{': ' + detail if detail else ''})")


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """At most ``limit`` bytes of a body (the rest is never read)."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = await stream.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _error_text(text: str) -> str:
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k.lower() == "error" and isinstance(v, str):
                return v
    return text


def _oserror_text(e: BaseException) -> str:
    os_err = getattr(e, "os_error", None)
    if isinstance(os_err, OSError) and os_err.strerror:
        return os_err.strerror
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or type(e).__name__


class URLVerifier:
    """``--verify-client-url``: Tailscale's admission webhook (see the module docstring)."""

    name = "admission URL"

    def __init__(self, url: str, *, fail_open: bool = True, timeout: float = URL_TIMEOUT,
                 error_log_interval: float = UNREACHABLE_LOG_INTERVAL) -> None:
        self.url = url
        self.fail_open = fail_open
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._err_log = ThrottledLog(log, error_log_interval)
        self.fail_open_admits = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
                total=self.timeout))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, key: bytes, source: str) -> Verdict:
        try:
            async with self._http().post(
                    self.url, data=admit_request_body(key, source),
                    headers={"Content-Type": "application/json"}) as r:
                status = r.status
                body = await _read_limited(r.content, URL_READ_LIMIT) if status == 200 else b""
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            why = "no answer in time" if isinstance(e, TimeoutError) else _oserror_text(e)
            self._err_log.warning("--verify-client-url %s: %s; %s clients (fail-%s)", self.url,
                                  why, "admitting" if self.fail_open else "refusing",
                                  "open" if self.fail_open else "closed")
            if self.fail_open:
                self.fail_open_admits += 1
                return ADMIT
            return Verdict(False, "url_unreachable",
                           "DERP server cannot check clients now (its admission URL is "
                           "unreachable)")
        if status != 200:
            return Verdict(False, "url_error",
                           f"DERP server's admission URL answered {status}")
        try:
            allow = parse_admit_response(body)
        except ValueError as e:
            return Verdict(False, "url_error", f"DERP server's admission URL: {e}")
        if not allow:
            return Verdict(False, "url_denied",
                           "DERP server does not admit this node key (refused by its admission "
                           "URL)")
        return ADMIT


Check = LocalAPIVerifier | URLVerifier


class Admission:
    """The ``verify_client`` of a DerpServer: every check must admit (local agent first)."""

    def __init__(self, checks: list[Check]) -> None:
        if not checks:
            raise ValueError("Admission needs at least one check")
        self.checks = checks
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.admitted = 0
        self._logs = {r: ThrottledLog(log, REFUSAL_LOG_INTERVAL) for r in REASONS}

    async def __call__(self, key: bytes, info: dict[str, Any], remote: Any = None) -> Verdict:
        source = source_ip(remote)
        for c in self.checks:
            try:
                v = await c.check(key, source)
            except Exception as e:  # a bug or a surprise of a check: refuse, say so
                log.error("client check (%s) failed: %s: %s", c.name, type(e).__name__, e)
                v = Verdict(False, "agent_error" if isinstance(c, LocalAPIVerifier)
                            else "url_error", "DERP server cannot check clients now")
            if not v:
                self._refused(key, source, v)
                return v
        self.admitted += 1
        return ADMIT

    def _refused(self, key: bytes, source: str, v: Verdict) -> None:
        reason = v.reason if v.reason in self.refused else "agent_error"
        self.refused[reason] += 1
        if reason in ("agent_unreachable", "url_unreachable"):
            return  # the verifier's own (throttled) line says it all
        self._logs[reason].warning("refused DERP client %s from %s: %s", short_key(key),
                                   source or "?", v.message)

    async def close(self) -> None:
        for c in self.checks:
            await c.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"admitted": self.admitted, "refused": dict(self.refused)}
        for c in self.checks:
            if isinstance(c, LocalAPIVerifier):
                out["agent_cache_entries"] = len(c.cache)
                out["agent_requests"] = c.requests
                out["agent_unreachable"] = c.down
            elif isinstance(c, URLVerifier):
                out["url_fail_open_admits"] = c.fail_open_admits
        return out

    # prometheus_client custom collector
    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily("derper_clients_refused",
                                      "DERP logins refused by --verify-clients / "
                                      "--verify-client-url, by reason", labels=["reason"])
        for r, n in self.refused.items():
            refused.add_metric([r], n)
        yield refused
        yield CounterMetricFamily("derper_clients_admitted",
                                  "DERP logins admitted by the client checks", value=self.admitted)
        st = self.stats()
        if "agent_cache_entries" in st:
            yield GaugeMetricFamily("derper_verify_cache_entries",
                                    "cached answers of the local agent", st["agent_cache_entries"])
            yield CounterMetricFamily("derper_verify_agent_requests",
                                      "whois requests sent to the local agent",
                                      value=st["agent_requests"])
        if "url_fail_open_admits" in st:
            yield CounterMetricFamily("derper_verify_url_fail_open_admits",
                                      "clients admitted because the admission URL failed "
                                      "(--verify-client-url-fail-open)",
                                      value=st["url_fail_open_admits"])


def check_url(url: str) -> str:
    """``--verify-client-url`` as given, or ValueError (one line) when it is not http(s)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"--verify-client-url {url!r}: want an http:// or https:// URL")
    return url


def build_admission(verify_clients: bool, socket_path: str, url: str, fail_open: bool,
                    registry: Any = None) -> Admission | None:
    """The derper's admission from its flags (None when neither check is on), its metrics
    registered in ``registry``. ``socket_path`` "" means the agent's default socket."""
    checks: list[Check] = []
    if verify_clients:
        if not socket_path:
            from nodeagent.localapi.server import default_socket_path

            socket_path = default_socket_path()
        checks.append(LocalAPIVerifier(socket_path))
        log.info("--verify-clients: admitting only node keys the nodeagent at %s knows",
                 socket_path)
    if url:
        checks.append(URLVerifier(check_url(url), fail_open=fail_open))
        log.info("--verify-client-url: asking %s about every client (fail-%s)", url,
                 "open" if fail_open else "closed")
    if not checks:
        return None
    adm = Admission(checks)
    if registry is not None:
        registry.register(adm)
    return adm
