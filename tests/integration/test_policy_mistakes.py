"""Policy mistakes a new user makes, reported with file:line:column: a mistyped node attribute
(a warning: the policy still applies) and a host that is not declared (refused)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nodeagent.control.policy import PolicyError, parse_policy
from tests.agentutil import nodeagent_cmd, public_tempdir, run_cli
from tests.procutil import stop

TYPO_ATTR = """{
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "nodeAttrs": [
    {"target": ["*"], "attr": ["debug-conn-reject",
                               "debug-conn-rejects"]},
  ],
}
"""
UNDECLARED_HOST = """{
  "hosts": {"lab": "10.1.0.0/16"},
  "acls": [
    {"action": "accept", "src": ["*"],
     "dst": ["db.internal:5432"]},
  ],
}
"""


def test_unknown_node_attribute_is_a_warning_with_line_and_column() -> None:
    pol = parse_policy(TYPO_ATTR)
    assert pol.warnings == [
        "5:32: nodeAttrs: unknown attribute 'debug-conn-rejects' (did you mean "
        "'debug-conn-reject'? nodes get it, but nodeagent does not use it)"]
    assert parse_policy(TYPO_ATTR.replace('"debug-conn-rejects"', '"debug-conn-reject"')
                        ).warnings == []


def test_undeclared_host_is_refused_with_line_and_column() -> None:
    with pytest.raises(PolicyError) as ei:
        parse_policy(UNDECLARED_HOST)
    assert str(ei.value).startswith("5:14: host 'db.internal' is not declared in hosts")
    # Node names (DNS labels) and users stay valid selectors: nodes may join later.
    parse_policy(UNDECLARED_HOST.replace("db.internal", "db"))
    parse_policy(UNDECLARED_HOST.replace("db.internal", "bob@example.com"))
    # A label close to a declared host is accepted, with a warning.
    pol = parse_policy(UNDECLARED_HOST.replace("db.internal", "labs"))
    assert len(pol.warnings) == 1 and "'labs' is not declared in hosts (did you mean 'lab'?)" \
        in pol.warnings[0] and pol.warnings[0].startswith("5:14: ")


def _serve(d: str, policy: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*nodeagent_cmd(), "control", "serve", "--state-dir",
                             os.path.join(d, "ctl"), "--listen", "127.0.0.1:0", "--policy",
                             str(policy)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> str:
    """stderr of ``proc`` up to the first line matching ``pattern`` (or its exit, or the
    timeout), read by a thread so the wait is bounded."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen += line
        if re.search(pattern, line):
            break
    return seen


def test_control_server_names_the_policy_file() -> None:
    d = public_tempdir()
    typo = Path(d) / "typo.hujson"
    typo.write_text(TYPO_ATTR)
    proc = _serve(d, typo)
    try:
        out = _read_until(proc, "listening on")
        assert f"{typo}:5:32: nodeAttrs: unknown attribute 'debug-conn-rejects'" in out, out
        assert "listening on" in out  # a warning, not a refusal
        # The admin CLI warns the same way, naming the file it was given.
        r = run_cli("control", "policy", "set", "--state-dir", os.path.join(d, "ctl"),
                    str(typo))
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == (f"nodeagent: warning: {typo}:5:32: nodeAttrs: unknown "
                                    "attribute 'debug-conn-rejects' (did you mean "
                                    "'debug-conn-reject'? nodes get it, but nodeagent does not "
                                    "use it)")
        bad = Path(d) / "bad.hujson"
        bad.write_text(UNDECLARED_HOST)
        r = run_cli("control", "policy", "set", "--state-dir", os.path.join(d, "ctl"), str(bad))
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert f"{bad}:5:14: host 'db.internal' is not declared in hosts" in r.stderr
    finally:
        stop(proc)
    bad_start = _serve(d, Path(d) / "bad.hujson")
    try:
        bad_start.wait(timeout=30)
        err = bad_start.stderr.read() if bad_start.stderr else ""
        assert bad_start.returncode == 1 and "Traceback" not in err
        assert "bad.hujson:5:14: host 'db.internal' is not declared in hosts" in err
    finally:
        stop(bad_start)
        if bad_start.stderr:
            bad_start.stderr.close()
