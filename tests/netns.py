"""Network-namespace toolkit for integration tests: create, wire, run in, and always remove.

- ``netns_available()`` / ``tun_available()``: ``None`` when usable, else the reason to skip.
- ``make_netns(prefix)``: context manager yielding a uniquely named namespace (prefix + pid +
  random) with loopback up; removed on exit, even when the test fails, after killing any process
  still running inside it (it is unique to the test, so those are the test's own).
- ``netns_factory``: pytest fixture returning ``make(prefix="t") -> name``; all removed at teardown.
- ``veth_pair(ns_a, ns_b, addr_a, addr_b)``: a veth link between two namespaces, up, addressed.
- ``run_in_netns`` / ``popen_in_netns``: run a program inside a namespace (``ip netns exec``).
- ``in_netns(name)``: switch the *current thread* into a namespace and back, so the thread can
  open sockets there; ``call_in_netns`` / ``acall_in_netns`` run a function in a fresh thread
  inside a namespace (the safe way from async tests: the event-loop thread never moves).

A process-exit hook removes any namespace a crashed test left registered.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import pytest
from pyroute2 import netns as pr_netns

from nodeagent.tundev import netconf
from tests.procutil import stop

NETNS_DIR = "/run/netns"
T = TypeVar("T")

_live: set[str] = set()
_procs: dict[str, list[subprocess.Popen[Any]]] = {}
_live_lock = threading.Lock()


# --- availability ------------------------------------------------------------------------------


@functools.cache
def netns_available() -> str | None:
    """``None`` if namespaces can be made here, else a reason naming what is missing."""
    if os.geteuid() != 0:
        return "network namespaces need root (euid is not 0)"
    if shutil.which("ip") is None:
        return "the iproute2 'ip' tool is not installed"
    if not os.path.exists("/proc/self/ns/net"):
        return "the kernel has no network namespace support (/proc/self/ns/net missing)"
    probe = f"naprobe{os.getpid()}-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"'ip netns add' fails: {r.stderr.strip() or r.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@functools.cache
def tun_available() -> str | None:
    """``None`` if TUN devices can be created, else the reason (checked without creating one)."""
    if os.geteuid() != 0:
        return "TUN devices need root (euid is not 0)"
    from nodeagent.demo.lab import tun_unusable  # the check `nodeagent demo` makes

    return tun_unusable()


def skip_unless_netns(tun: bool = False) -> None:
    """``pytest.skip`` with the reason when namespaces (and optionally TUN) are unusable."""
    reason = netns_available() or (tun_available() if tun else None)
    if reason:
        pytest.skip(reason)


# --- creation and removal ----------------------------------------------------------------------


def unique_name(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def netns_pids(name: str) -> list[int]:
    r = _ip("netns", "pids", name, check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def remove_netns(name: str) -> None:
    """Kill what still runs inside (processes from ``popen_in_netns`` and any other pid in
    it), then delete the namespace. Quiet for an already removed namespace."""
    with _live_lock:
        procs = _procs.pop(name, [])
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            stop(proc, signal.SIGKILL)
    for pid in netns_pids(name):
        if pid == os.getpid():
            continue  # only if our main thread was left inside; never kill the test runner
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        _ip("netns", "del", name, check=False)
    with _live_lock:
        _live.discard(name)


def create_netns(prefix: str = "na") -> str:
    """Create a uniquely named namespace with loopback up; the caller must ``remove_netns``."""
    name = unique_name(prefix)
    _ip("netns", "add", name)
    with _live_lock:
        _live.add(name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        remove_netns(name)
        raise
    return name


@contextlib.contextmanager
def make_netns(prefix: str = "na") -> Iterator[str]:
    """A fresh namespace for the ``with`` body; removed afterwards whatever happened."""
    name = create_netns(prefix)
    try:
        yield name
    finally:
        remove_netns(name)


@atexit.register
def _remove_leftovers() -> None:
    with _live_lock:
        names = list(_live)
    for name in names:
        remove_netns(name)


@pytest.fixture
def netns_factory() -> Iterator[Callable[..., str]]:
    """``make(prefix="t") -> name``; every namespace made is removed at teardown."""
    made: list[str] = []

    def make(prefix: str = "t") -> str:
        name = create_netns(prefix)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            remove_netns(name)


# --- wiring ------------------------------------------------------------------------------------


def _addr_list(a: str | Sequence[str]) -> list[str]:
    return [a] if isinstance(a, str) else list(a)


def veth_pair(ns_a: str, ns_b: str, addr_a: str | Sequence[str] = (),
              addr_b: str | Sequence[str] = (),
              *, name_a: str = "veth-a", name_b: str = "veth-b",
              mtu: int | None = None) -> tuple[str, str]:
    """Link two namespaces with a veth pair created directly inside them (no name ever exists
    in ours), add ``addr/prefixlen`` addresses (IPv6 without DAD) and bring both ends up.
    The pair disappears with either namespace. Returns ``(name_a, name_b)``."""
    _ip("link", "add", name_a, "netns", ns_a, "type", "veth", "peer", "name", name_b,
        "netns", ns_b)
    for ns, dev, addrs in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        if mtu is not None:
            _ip("-n", ns, "link", "set", dev, "mtu", str(mtu))
        for a in _addr_list(addrs):
            extra = ["nodad"] if ":" in a else []
            _ip("-n", ns, "addr", "add", a, "dev", dev, *extra)
        _ip("-n", ns, "link", "set", dev, "up")
    return name_a, name_b


# --- running things inside ---------------------------------------------------------------------


def run_in_netns(name: str, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` inside the namespace; output captured as text and a 60 s timeout
    unless the caller says otherwise."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    kwargs.setdefault("timeout", 60)
    return subprocess.run(["ip", "netns", "exec", name, *argv], **kwargs)


def popen_in_netns(name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen`` inside the namespace. Stop it yourself; ``remove_netns`` kills
    whatever is left."""
    proc = subprocess.Popen(["ip", "netns", "exec", name, *argv], **kwargs)
    with _live_lock:
        _procs.setdefault(name, []).append(proc)
    return proc


def current_netns_inode() -> int:
    """Identity of the calling thread's namespace (thread-self: namespaces are per thread)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_inode(name: str) -> int:
    return os.stat(os.path.join(NETNS_DIR, name)).st_ino


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move the current thread into namespace ``name`` for the body, then back. Sockets opened
    inside stay in that namespace. Do not ``await`` inside it on an event-loop thread: other
    tasks would run in the wrong namespace — use ``acall_in_netns`` there instead."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            pr_netns.setns(target, flags=0)
        finally:
            os.close(target)
        try:
            yield
        finally:
            pr_netns.setns(home, flags=0)
    finally:
        os.close(home)


def call_in_netns(name: str, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
    """Run ``fn(*args)`` in a new thread inside ``name``; return or re-raise its outcome
    (``TimeoutError`` if it is still running after ``timeout`` s). The agent's own
    ``netconf.call_in_netns`` with positional arguments and a default timeout."""
    return netconf.call_in_netns(name, functools.partial(fn, *args), timeout=timeout)


async def acall_in_netns(name: str, fn: Callable[..., T], *args: Any,
                         timeout: float = 30.0) -> T:
    """``call_in_netns`` without blocking the event loop."""
    return await asyncio.to_thread(call_in_netns, name, fn, *args, timeout=timeout)
