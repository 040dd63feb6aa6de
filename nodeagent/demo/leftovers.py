"""What a demo run made, written down before it is made, and the removal of it.

Owns the demo's state files: ``/run/nodeagent-demo/<pid>.json`` (``NODEAGENT_DEMO_STATE_DIR``
overrides the directory) lists the run's namespaces and temp dirs, the processes it started outside
them (``nodeagent web``), each with its start time, plus the pid's start time so a recycled pid
is not taken for the run. Every run first removes what dead runs left (their state files, and any
namespace named ``nademo-<pid>-…`` whose pid no longer runs). Removing a namespace kills every
process inside it first; outside the namespaces, only a listed process whose pid still has the
listed start time is killed, so nothing else is ever killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "nademo-"
NETNS_DIR = Path("/run/netns")
STATE_DIR_ENV = "NODEAGENT_DEMO_STATE_DIR"
DEFAULT_STATE_DIR = "/run/nodeagent-demo"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-")


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), or None if it is gone
    (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return fields[19]


def run_alive(pid: int, started: str | None) -> bool:
    """Whether the run ``pid`` (started at ``started``) still runs."""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


@dataclass
class Record:
    """The state file of one run: updated on disk at every change."""

    pid: int
    path: Path
    started: str | None = None
    namespaces: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)
    processes: list[tuple[int, str | None]] = field(default_factory=list)  # (pid, start time)

    @classmethod
    def create(cls) -> Record:
        d = state_dir()
        d.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        rec = cls(pid, d / f"{pid}.json", start_time(pid))
        rec.save()
        return rec

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "started": self.started,
                                   "namespaces": self.namespaces, "dirs": self.dirs,
                                   "processes": [list(p) for p in self.processes]}))
        os.replace(tmp, self.path)

    def add_namespace(self, name: str) -> None:
        self.namespaces.append(name)
        self.save()

    def add_dir(self, path: str) -> None:
        self.dirs.append(path)
        self.save()

    def add_process(self, pid: int) -> None:
        """A process started outside the namespaces (removing them would not stop it)."""
        self.processes.append((pid, start_time(pid)))
        self.save()

    def remove_all(self) -> list[str]:
        """Remove everything listed, then the state file; returns what was removed."""
        gone = remove(self.namespaces, self.dirs, self.processes)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        return gone


def netns_pids(name: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                       timeout=30)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _kill(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL to what is left after 3 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + 3.0
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if start_time(p) is not None]
            if pids:
                time.sleep(0.05)
        if not pids:
            break


def remove_namespace(name: str) -> bool:
    """Kill what runs inside ``name`` (SIGTERM, then SIGKILL after 3 s), delete it; True if it
    existed."""
    if not (NETNS_DIR / name).exists():
        return False
    me = os.getpid()
    _kill([p for p in netns_pids(name) if p != me])
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return True


def stop_process(pid: int, started: str | None) -> bool:
    """Kill ``pid`` if it is still the process that was listed (same start time); True if so."""
    if started is None or pid == os.getpid() or start_time(pid) != started:
        return False
    _kill([pid])
    return True


def remove(namespaces: list[str], dirs: list[str],
           processes: Sequence[tuple[int, str | None]] = ()) -> list[str]:
    gone = [f"process {pid}" for pid, started in processes if stop_process(pid, started)]
    gone += [f"namespace {ns}" for ns in reversed(namespaces) if remove_namespace(ns)]
    for d in dirs:
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(f"directory {d}")
    return gone


def clean_dead_runs() -> list[str]:
    """Remove what runs that no longer run left behind; returns one entry per thing removed."""
    gone: list[str] = []
    d = state_dir()
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            try:
                data = json.loads(f.read_text())
                pid = int(data["pid"])
                namespaces = [str(x) for x in data.get("namespaces") or []]
                dirs = [str(x) for x in data.get("dirs") or []]
                processes = [(int(p), None if st is None else str(st))
                             for p, st in data.get("processes") or []]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not ours to judge; left alone
            if run_alive(pid, data.get("started")):
                continue
            namespaces = [n for n in namespaces if n.startswith(PREFIX)]
            dirs = [x for x in dirs if os.path.basename(x).startswith(PREFIX)]
            gone += remove(namespaces, dirs, processes)
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    # Namespaces of a dead run whose state file is gone (deleted by hand, another state dir).
    if NETNS_DIR.is_dir():
        for entry in sorted(os.listdir(NETNS_DIR)):
            m = _NS_RE.match(entry)
            if m and start_time(int(m.group(1))) is None and remove_namespace(entry):
                gone.append(f"namespace {entry}")
    tmp = tempfile.gettempdir()
    for entry in sorted(os.listdir(tmp)):
        m = _NS_RE.match(entry)
        path = os.path.join(tmp, entry)
        if m and start_time(int(m.group(1))) is None and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(f"directory {path}")
    return gone
