"""Plain-words explanations of rejected connections: ``debug-rejects?explain=1``.

Owns the sentence (``Explanation``) and the facts behind it (``ExplanationDetail``) added to each
event. It reaches the agent only through the extension Host: ``explain_flow`` asks control about
an ``acl`` rejection (what the tailnet policy says), ``peer_path_status`` gives the path facts for
``peer-unreachable`` and ``timeout``. Control's answers are cached per flow (source IP,
destination IP, port, protocol) for :data:`CACHE_TTL` seconds, so a table refreshed every second
asks once. :meth:`Explainer.annotate` waits for control (bounded); :meth:`annotate_cached` never
waits: it uses what is cached, asks in the background and calls ``on_ready`` when an answer
arrives (the watch stream then sends a new snapshot). When control cannot be asked, the sentence
says so in one clause; the endpoint never fails because of it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from nodeagent.ipnext.api import ControlUnavailable, Host

log = logging.getLogger("nodeagent.connreject")

CACHE_TTL = 30.0
CACHE_MAX = 1024
ASK_TIMEOUT = 5.0
MAX_PARALLEL = 8

FlowQ = tuple[str, str, int, int]  # (src ip, dst ip, dst port, proto)


def split_endpoint(ep: str) -> tuple[str, int]:
    """``"100.64.0.1:22"`` / ``"[fd7a::1]:22"`` → (address, port); port 0 when absent."""
    if ep.startswith("["):
        addr, _, port = ep[1:].partition("]:")
    else:
        addr, _, port = ep.rpartition(":")
        if not addr:
            addr, port = ep, ""
    return addr, int(port) if port.isdecimal() else 0


def _ago(ts: float, now: float) -> str:
    d = max(0.0, now - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.0f}h ago"


def acl_sentence(direction: str, result: dict[str, Any] | None, why_not: str = "") -> str:
    """The sentence for an ``acl`` rejection, from control's explanation (or its absence)."""
    where = "this node's" if direction == "incoming" else "the peer's"
    if result is None:
        return f"The tailnet policy refused it at {where} filter; control could not be asked " \
               f"why ({why_not})."
    if result.get("Allowed"):
        return (f"{where.capitalize()} filter refused it, but the tailnet policy allows it now: "
                "the policy changed since, or the node has not received it yet.")
    return str(result.get("Sentence") or result.get("Summary") or "The tailnet policy denies it.")


def path_sentence(reason: str, peer_ip: str, port: int, st: dict[str, Any] | None,
                  now: float | None = None) -> str:
    """The sentence for ``peer-unreachable`` or ``timeout`` from the agent's path facts."""
    now = time.time() if now is None else now
    if st is None:
        return f"No node in the netmap owns {peer_ip} now."
    name = str(st.get("Name") or peer_ip)
    check = f"Check `nodeagent netcheck` and `nodeagent ping {name}`."
    hs = float(st.get("LastHandshake") or 0.0)
    if reason == "timeout":
        seen = f"last handshake {_ago(hs, now)}" if hs else "no handshake yet"
        return (f"The connection got no answer within 5 s though {name} is known ({seen}): "
                f"is a service listening on port {port} there, or does a firewall drop it "
                f"silently? {check}")
    failed: list[str] = []
    if not st.get("HasDiscoKey"):
        failed.append(f"{name} has no disco key, so no path to it can be found")
    if not st.get("InEngine"):
        failed.append(f"{name} is not a WireGuard peer here yet")
    if not st.get("HomeDERP") and not st.get("CurAddr"):
        failed.append(f"{name} has no home DERP region and no direct address")
    if not st.get("SelfHomeDERP"):
        failed.append("this node has no home DERP region")
    if st.get("Online") is False:
        failed.append(f"{name} is not connected to control")
    if not hs:
        failed.append(f"no WireGuard handshake with {name} has completed")
    if not failed:
        return (f"No path to {name} worked then; it looks fine now (last handshake "
                f"{_ago(hs, now)}). {check}")
    return f"No working path to {name}: {'; '.join(failed)}. {check}"


def sentence_for(ev: dict[str, Any], direction: str, host: Host,
                 control: dict[str, Any] | None, control_err: str) -> tuple[str, Any]:
    """(Explanation, ExplanationDetail or None) for one event."""
    reason = ev.get("Reason", "")
    peer_ep = ev.get("Dst", "") if direction == "outgoing" else ev.get("Src", "")
    peer_ip, _ = split_endpoint(peer_ep)
    _, port = split_endpoint(ev.get("Dst", ""))
    if reason == "acl":
        return acl_sentence(direction, control, control_err), control
    if reason == "shields":
        if direction == "incoming":
            return "This node has shields-up on: it accepts no incoming connections.", None
        return "The peer has shields-up on.", None
    if reason == "host-firewall":
        return "The peer's own firewall refused; the tailnet policy allowed it.", None
    if reason == "host-ip-forwarding":
        return "The peer cannot forward to that subnet: IP forwarding is off there.", None
    if reason == "no-peer":
        return f"No node in the netmap owns {peer_ip}.", None
    if reason in ("peer-unreachable", "timeout"):
        st = host.peer_path_status(peer_ip)
        return path_sentence(reason, peer_ip, port, st), st
    return "The peer refused it without naming a reason.", None


def _question(ev: dict[str, Any]) -> FlowQ:
    src, _ = split_endpoint(ev.get("Src", ""))
    dst, port = split_endpoint(ev.get("Dst", ""))
    return src, dst, port, int(ev.get("Proto") or 0)


class Explainer:
    """Per-extension cache of control's answers, and the annotation of a response."""

    def __init__(self, host_getter: Callable[[], Host | None]) -> None:
        self._host = host_getter
        # question → (expires, result or None, why none)
        self._cache: dict[FlowQ, tuple[float, dict[str, Any] | None, str]] = {}
        self._inflight: dict[FlowQ, asyncio.Task[None]] = {}
        self._sem = asyncio.Semaphore(MAX_PARALLEL)

    def _cached(self, q: FlowQ, now: float) -> tuple[dict[str, Any] | None, str] | None:
        hit = self._cache.get(q)
        if hit is None or hit[0] < now:
            return None
        return hit[1], hit[2]

    async def _ask(self, host: Host, q: FlowQ) -> None:
        async with self._sem:
            try:
                res: dict[str, Any] | None = await host.explain_flow(*q, timeout=ASK_TIMEOUT)
                why = ""
            except ControlUnavailable as e:
                res, why = None, str(e)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        # A failure is remembered briefly: control may come back any moment.
        ttl = CACHE_TTL if res is not None else 2.0
        self._cache[q] = (time.monotonic() + ttl, res, why)

    def _start(self, host: Host, q: FlowQ,
               on_ready: Callable[[], None] | None) -> asyncio.Task[None]:
        task = self._inflight.get(q)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(host, q))
            self._inflight[q] = task

            def done(t: asyncio.Task[None]) -> None:
                self._inflight.pop(q, None)
                if not t.cancelled() and t.exception() is not None:
                    log.warning("connreject: explaining %s failed: %s", q, t.exception())
                if on_ready is not None:
                    on_ready()

            task.add_done_callback(done)
        return task

    async def annotate(self, resp: dict[str, Any]) -> dict[str, Any]:
        """A copy of ``resp`` with ``Explanation`` (and ``ExplanationDetail``) per event,
        asking control about every ``acl`` flow not cached (bounded by :data:`ASK_TIMEOUT`)."""
        host = self._host()
        if host is not None:
            now = time.monotonic()
            tasks = [self._start(host, q, None) for q in self._acl_questions(resp)
                     if self._cached(q, now) is None]
            if tasks:
                await asyncio.wait(tasks, timeout=ASK_TIMEOUT + 1.0)
        return self.annotate_cached(resp, None, ask=False)

    def annotate_cached(self, resp: dict[str, Any], on_ready: Callable[[], None] | None,
                        *, ask: bool = True) -> dict[str, Any]:
        """As :meth:`annotate` without waiting: uncached ``acl`` rows say control is being
        asked, and ``on_ready`` is called when an answer arrives."""
        out = copy.deepcopy(resp)
        host = self._host()
        now = time.monotonic()
        for key, direction in (("Outgoing", "outgoing"), ("Incoming", "incoming")):
            for ev in out.get(key) or []:
                control: dict[str, Any] | None = None
                err = "this node is not running"
                if ev.get("Reason") == "acl" and host is not None:
                    q = _question(ev)
                    hit = self._cached(q, now)
                    if hit is not None:
                        control, err = hit
                    elif ask:
                        self._start(host, q, on_ready)
                        err = "asking control now"
                    else:
                        err = "control did not answer in time"
                if host is None:
                    ev["Explanation"] = "The agent is stopping; no explanation."
                    continue
                sentence, detail = sentence_for(ev, direction, host, control, err)
                ev["Explanation"] = sentence
                if detail is not None:
                    ev["ExplanationDetail"] = detail
        return out

    def _acl_questions(self, resp: dict[str, Any]) -> list[FlowQ]:
        qs = [_question(ev) for key in ("Outgoing", "Incoming") for ev in resp.get(key) or []
              if ev.get("Reason") == "acl"]
        return list(dict.fromkeys(qs))

    def close(self) -> None:
        for t in list(self._inflight.values()):
            t.cancel()
        self._inflight.clear()
