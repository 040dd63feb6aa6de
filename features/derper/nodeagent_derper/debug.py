"""``/debug/`` of the derper: access control, metrics and Python's answers to Go's pprof.

Owns the rule of who may see debug pages (loopback, Tailscale addresses 100.64.0.0/10 except
100.115.92.0/23 and fd7a:115c:a1e0::/48, and only without ``X-Forwarded-For``; everyone else gets
403), and the handlers: index, ``varz`` (Prometheus text), ``vars`` (JSON), ``pprof/goroutine``
(every thread's and asyncio task's stack), ``pprof/profile?seconds=N`` (a time-bounded sampling
profile in collapsed-stack form, run in a thread so the event loop keeps serving and is sampled
too), ``pprof/heap?seconds=N`` (a tracemalloc snapshot), and ``gc``.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import html
import io
import ipaddress
import json
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

_TAILNET4 = ipaddress.ip_network("100.64.0.0/10")
_TAILNET4_EXCLUDED = ipaddress.ip_network("100.115.92.0/23")
_TAILNET6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
MAX_PROFILE_SECONDS = 60.0
_SAMPLE_INTERVAL = 0.005


def debug_allowed_ip(ip: str | None) -> bool:
    """True for loopback and Tailscale addresses (IPv4-mapped forms unmapped first)."""
    if not ip:
        return False
    try:
        a = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if a.is_loopback:
        return True
    if isinstance(a, ipaddress.IPv4Address):
        return a in _TAILNET4 and a not in _TAILNET4_EXCLUDED
    return a in _TAILNET6


def debug_allowed(request: web.Request) -> bool:
    return "X-Forwarded-For" not in request.headers and debug_allowed_ip(request.remote)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(h: Handler) -> Handler:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        if not debug_allowed(request):
            return web.Response(status=403, text="debug access denied\n")
        return await h(request)

    return wrapper


def _seconds(request: web.Request, default: float) -> float:
    try:
        v = float(request.query.get("seconds", default))
    except ValueError:
        raise web.HTTPBadRequest(text="seconds: not a number\n") from None
    if not 0 <= v <= MAX_PROFILE_SECONDS:
        raise web.HTTPBadRequest(text=f"seconds: want 0..{MAX_PROFILE_SECONDS:g}\n")
    return v


def stacks_text() -> str:
    """Every thread's stack, then every asyncio task's stack (of the running loop)."""
    out = io.StringIO()
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    out.write(f"threads: {len(frames)}\n\n")
    for ident, frame in frames.items():
        out.write(f"thread {names.get(ident, '?')} (id {ident}):\n")
        out.write("".join(traceback.format_stack(frame)))
        out.write("\n")
    tasks = asyncio.all_tasks()
    out.write(f"asyncio tasks: {len(tasks)}\n\n")
    for t in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"task {t.get_name()} {t.get_coro()!r}:\n")
        buf = io.StringIO()
        t.print_stack(file=buf)
        out.write(buf.getvalue())
        out.write("\n")
    return out.getvalue()


def sample_profile(seconds: float, interval: float = _SAMPLE_INTERVAL) -> str:
    """Sample all threads' stacks (except this sampler's) for ``seconds``; return collapsed
    stacks ``outer;...;inner count`` (flame-graph input), most frequent first."""
    me = threading.get_ident()
    counts: collections.Counter[str] = collections.Counter()
    samples = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            parts = []
            f: Any = frame
            while f is not None:
                co = f.f_code
                parts.append(f"{co.co_name} ({co.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno})")
                f = f.f_back
            counts[";".join(reversed(parts))] += 1
        samples += 1
        time.sleep(interval)
    head = f"# sampling profile: {seconds:g}s, {samples} samples every {interval * 1000:g}ms\n"
    return head + "".join(f"{stack} {n}\n" for stack, n in counts.most_common())


async def heap_snapshot_text(seconds: float, limit: int = 50) -> str:
    """Top allocation sites by size. Starts tracemalloc for ``seconds`` when it is not on."""
    started = False
    if not tracemalloc.is_tracing():
        tracemalloc.start(10)
        started = True
        await asyncio.sleep(seconds)
    try:
        snap = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    stats = snap.statistics("lineno")
    out = [f"# tracemalloc: traced {current} bytes now, peak {peak}; "
           f"{f'traced for {seconds:g}s' if started else 'tracing was already on'}\n"]
    for s in stats[:limit]:
        out.append(f"{s.size} bytes in {s.count} blocks: {s.traceback}\n")
    return "".join(out)


class DebugHandlers:
    """The ``/debug/`` pages; ``info()`` supplies the index facts, ``stats()`` the relay's."""

    def __init__(self, registry: CollectorRegistry, info: Callable[[], dict[str, Any]],
                 stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = registry
        self.info = info
        self.stats = stats
        self._profile_lock = asyncio.Lock()  # one profile or heap trace at a time

    def add_routes(self, app: web.Application) -> None:
        for path, h in (("/debug/", self.index), ("/debug/varz", self.varz),
                        ("/debug/vars", self.vars), ("/debug/pprof/", self.pprof_index),
                        ("/debug/pprof/goroutine", self.goroutine),
                        ("/debug/pprof/profile", self.profile), ("/debug/pprof/heap", self.heap),
                        ("/debug/gc", self.gc)):
            app.router.add_get(path, guarded(h))
        app.router.add_get("/debug", guarded(self.redirect))

    async def redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/debug/")

    async def index(self, request: web.Request) -> web.StreamResponse:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self.info().items())
        links = "".join(f'<li><a href="{u}">{u}</a> {html.escape(d)}</li>' for u, d in (
            ("/debug/varz", "Prometheus metrics"), ("/debug/vars", "relay stats (JSON)"),
            ("/debug/pprof/", "profiles"), ("/debug/pprof/goroutine", "thread and task stacks"),
            ("/debug/pprof/profile?seconds=5", "5 s sampling profile"),
            ("/debug/pprof/heap?seconds=5", "tracemalloc snapshot"),
            ("/debug/gc", "run the garbage collector")))
        body = (f"<!doctype html><html><head><title>derper debug</title></head><body>"
                f"<h1>derper debug</h1><table>{rows}</table><ul>{links}</ul></body></html>")
        return web.Response(text=body, content_type="text/html")

    async def varz(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def vars(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats(), dumps=lambda o: json.dumps(o, default=str))

    async def pprof_index(self, request: web.Request) -> web.StreamResponse:
        body = ("goroutine  all threads' and asyncio tasks' stacks\n"
                "profile    ?seconds=N (default 30, max 60) sampling profile, collapsed stacks\n"
                "heap       ?seconds=N (default 5) tracemalloc snapshot, top sites\n")
        return web.Response(text=body)

    async def goroutine(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=stacks_text())

    async def profile(self, request: web.Request) -> web.StreamResponse:
        seconds = _seconds(request, 30.0)
        if self._profile_lock.locked():
            return web.Response(status=409, text="a profile is already running\n")
        async with self._profile_lock:
            text = await asyncio.to_thread(sample_profile, seconds)
        return web.Response(text=text)

    async def heap(self, request: web.Request) -> web.StreamResponse:
        seconds = _seconds(request, 5.0)
        if self._profile_lock.locked():
            return web.Response(status=409, text="a profile is already running\n")
        async with self._profile_lock:
            text = await heap_snapshot_text(seconds)
        return web.Response(text=text)

    async def gc(self, request: web.Request) -> web.StreamResponse:
        n = gc.collect()
        return web.Response(text=f"gc: {n} objects collected\n")
