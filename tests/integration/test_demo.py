"""``nodeagent demo`` end to end: the story it tells, and that it leaves nothing behind.

- a whole run: the permitted connection works, the blocked ``connect()`` is refused within a
  second, the rejection shows on both nodes with control's explanation (the policy line), over
  c2n, and ``control explain`` gives the policy's lines and the entry that would allow it (with
  connreject), the path is DERP (with derper) — and afterwards no namespace, process, temp dir or
  state file of the run is left;
- a ``--web`` run keeps everything until Ctrl-C (SIGINT): its page answers, its event stream
  carries the demo's rejection, its state file lists the web server; then it removes it all and
  exits 0 (without connreject: one line with the install hint, and the story still runs);
- a ``--keep`` (``--web``) run killed with SIGKILL leaves its namespaces, and the next run
  (``--cleanup``, the same code every run starts with) removes them; a process listed in a dead
  run's state file is stopped, one whose start time differs is not;
- as a non-root user it says so in one line.

Each test gives the demo a state directory of its own (``NODEAGENT_DEMO_STATE_DIR``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import feature_installed
from tests.netns import netns_available, tun_available

_missing = netns_available() or tun_available()
pytestmark = [pytest.mark.integration]
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

DEMO = [sys.executable, "-m", "nodeagent.cli.main", "demo"]
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy


@pytest.fixture
def state_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="na-demostate-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def env_with(state_dir: str) -> dict[str, str]:
    return {**os.environ, "NODEAGENT_DEMO_STATE_DIR": state_dir, "PYTHONDONTWRITEBYTECODE": "1"}


def leftovers(pid: int, state_dir: str) -> list[str]:
    """Whatever the demo run ``pid`` made that still exists."""
    prefix = f"nademo-{pid}-"
    out = [f"namespace {n}" for n in os.listdir("/run/netns") if n.startswith(prefix)] \
        if os.path.isdir("/run/netns") else []
    tmp = tempfile.gettempdir()
    out += [f"directory {tmp}/{n}" for n in os.listdir(tmp) if n.startswith(prefix)]
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if prefix in cmd:
            out.append(f"process {p.name}: {cmd[:120]}")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    out += [f"link {ln.split(':')[1].strip()}" for ln in links.splitlines()
            if "to-laptop" in ln or "to-server" in ln]
    out += [f"state file {f}" for f in os.listdir(state_dir)]
    return out


def test_demo_tells_the_story_and_leaves_nothing(state_dir: str) -> None:
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_with(state_dir), cwd="/")
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the demo took longer than 240 s:\n{out}")
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    # one progress line per step, each ending ok
    steps = [ln for ln in out.splitlines() if re.match(r"\[\d+\] ", ln)]
    assert len(steps) >= 6 and all(re.search(r" \.\.\. ok \(\d+\.\d+s\)$", s) for s in steps), out
    assert re.search(r"^permitted: connected in [\d.]+ ms; server said 'hello from server, "
                     r"port 8080'$", out, re.M), out
    m = re.search(r"^blocked: connect\(\) refused after ([\d.]+) ms", out, re.M)
    assert m and float(m.group(1)) < 1000, out
    if feature_installed("derper"):
        assert "via DERP(demo)" in out and 'relay "demo"' in out, out
    else:
        assert "feature derper is not installed" in out and "direct 198.18.79.2:" in out, out
    if feature_installed("connreject"):
        assert re.search(r"^  outgoing +tcp +server \(100\.\d+\.\d+\.\d+\) +22 +acl +tsmp_recv",
                         out, re.M), out
        assert re.search(r"^  incoming +tcp +laptop \(100\.\d+\.\d+\.\d+\) +22 +acl +tsmp_sent",
                         out, re.M), out
        assert "  status 200" in out and '"Reason": "acl"' in out, out
        # --explain: control's sentence on both sides, naming the policy line that came nearest
        assert "→ refused by the tailnet policy on server" in out, out
        whys = re.findall(r"^      why: (.*)$", out, re.M)
        assert len(whys) == 2 and all("port 22" in w and "acls[0] at policy.hujson:6" in w
                                      for w in whys), out
        # control explain from the hub: the verdict, the policy lines, the suggested entry
        explain = out.split(" control explain laptop server:22 --state-dir ", 1)[-1]
        assert re.search(r"^  Denied: .*laptop.*server.*port 22", explain, re.M), out
        assert "  acls[0] at policy.hujson:6: laptop → server:8080" in explain, out
        assert re.search(r'^    \{"action": "accept", "src": \["laptop"\], "dst": \["server:22"\]',
                         explain, re.M), out
    else:
        assert "feature connreject is not installed" in out, out
    assert "debug rejects --watch" in out and "status --socket" in out, out
    assert out.rstrip().endswith("removed the demo's namespaces, processes and temp files"), out
    assert leftovers(proc.pid, state_dir) == []


def start_keep(env: dict[str, str], *flags: str) -> tuple[subprocess.Popen[str], str]:
    """``nodeagent demo FLAGS`` (default ``--keep``), returned with its output once it says it
    keeps running."""
    proc = subprocess.Popen([*DEMO, *(flags or ["--keep"])], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd="/")
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # readline returns at EOF too: the loop ends
        line = proc.stdout.readline()
        lines.append(line)
        if not line or line.startswith("running until Ctrl-C"):
            break
    if not lines[-1].startswith("running until Ctrl-C"):
        proc.kill()
        proc.wait(10)
        pytest.fail("".join(lines))
    return proc, "".join(lines)


def sse_until(url: str, want: Any, timeout: float) -> dict[str, Any]:
    """Read the server-sent events at ``url`` until a ``snapshot`` whose data satisfies
    ``want``; returns that data."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    with HTTP.open(url, timeout=timeout) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        while time.monotonic() < deadline:
            line = r.readline().decode()
            if not line:
                break
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "snapshot":
                data = json.loads(line[6:])
                if want(data):
                    return data
                seen.append(line[:300])
    pytest.fail(f"no matching snapshot from {url} within {timeout}s: {seen}")


def demo_rejection(snap: dict[str, Any]) -> bool:
    return any(ev["Dst"].endswith(":22") and ev["Reason"] == "acl" and ev.get("Explanation")
               for ev in (snap.get("Rejects") or {}).get("Outgoing") or [])


def test_web_serves_the_live_view_until_ctrl_c_then_cleans_up(state_dir: str) -> None:
    web = feature_installed("connreject")
    proc, out = start_keep(env_with(state_dir), *(["--web"] if web else ["--web", "--keep"]))
    try:
        assert leftovers(proc.pid, state_dir) != []  # still there while it keeps running
        if web:
            m = re.search(r"^open (http://127\.0\.0\.1:\d+/) in a browser", out, re.M)
            assert m, out
            with HTTP.open(m.group(1), timeout=30) as r:
                assert r.status == 200 and "text/html" in r.headers["Content-Type"]
            sse_until(m.group(1) + "api/events", demo_rejection, 30)
            listed = json.loads((Path(state_dir) / f"{proc.pid}.json").read_text())["processes"]
            cmds = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid, _ in listed]
            assert len(cmds) == 1 and b"web" in cmds[0], (listed, cmds)
        else:
            hint = [ln for ln in out.splitlines() if ln.startswith("--web: ")]
            assert len(hint) == 1 and "feature connreject is not installed" in hint[0] \
                and "pip install" in hint[0], out
            assert re.search(r"^blocked: connect\(\) refused", out, re.M), out
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "removed the demo's namespaces, processes and temp files" in rest, rest
        assert leftovers(proc.pid, state_dir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_killed_demo_is_cleaned_by_the_next_run(state_dir: str) -> None:
    env = env_with(state_dir)
    proc, _ = start_keep(env, "--web") if feature_installed("connreject") else start_keep(env)
    try:
        proc.send_signal(signal.SIGKILL)  # no cleanup of its own
        proc.wait(10)
        left = leftovers(proc.pid, state_dir)
        assert any(x.startswith("namespace ") for x in left), left
        assert f"state file {proc.pid}.json" in left, left
        r = subprocess.run([*DEMO, "--cleanup"], capture_output=True, text=True, env=env,
                           timeout=120, cwd="/")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"namespace nademo-{proc.pid}-hub" in r.stdout, r.stdout
        deadline = time.monotonic() + 10  # processes killed by the cleanup may still be exiting
        while (left := leftovers(proc.pid, state_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()
        subprocess.run([*DEMO, "--cleanup"], capture_output=True, env=env, timeout=120)


def test_cleanup_stops_a_listed_process_only_if_it_is_the_same(
        state_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from nodeagent.demo.leftovers import clean_dead_runs, start_time

    dead = subprocess.Popen(["true"])
    dead.wait(10)  # a run that is gone
    listed = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])  # listed with another start time: a recycled pid
    try:
        (Path(state_dir) / f"{dead.pid}.json").write_text(json.dumps({
            "pid": dead.pid, "started": None, "namespaces": [], "dirs": [],
            "processes": [[listed.pid, start_time(listed.pid)], [other.pid, "1"]]}))
        monkeypatch.setenv("NODEAGENT_DEMO_STATE_DIR", state_dir)
        gone = clean_dead_runs()
        assert f"process {listed.pid}" in gone and f"process {other.pid}" not in gone, gone
        assert listed.wait(10) == -signal.SIGTERM
        assert other.poll() is None
        assert os.listdir(state_dir) == []
    finally:
        for p in (listed, other):
            p.kill()
            p.wait(10)


def test_not_root_is_one_clear_line() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import nodeagent"],
                           capture_output=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        # This interpreter lives where nobody may not look (e.g. under /root): let the
        # unprivileged process read it, and nothing else; it is still not root.
        nobody += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    r = subprocess.run([*nobody, *DEMO], capture_output=True, text=True, timeout=60, cwd="/",
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodeagent: demo needs root"), r.stderr
