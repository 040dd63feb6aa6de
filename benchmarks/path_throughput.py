"""Benchmark: the direct path against the DERP-relayed path between two agents behind NATs.

On one natlab topology (``tests/natlab.py``: one TLS derper region, two homes behind easy NAT,
the control server, one ``nodeagent up`` per home) it measures, in the same run:

- TCP throughput (iperf3, one stream, ``--seconds``) and ping RTT over the direct path (both
  agents show the peer's ``CurAddr``) and over the relayed path (``block_direct_udp()``; both
  ``CurAddr`` empty and, while pinging, only the ``path="derp"`` counter of
  ``nodeagent_magicsock_tx_packets_total`` grows on both agents), alternating ``--runs`` times;
  prints the medians and the ratio relayed / direct (the issue's target is >= 0.5x);
- time to direct path: in a fresh lab per sample (``--samples``), from the first packet of a
  ping over the tailnet, started once both agents run and see each other, to the peer's
  ``CurAddr`` set in the pinging agent's status (and in the other's), polled every 50 ms;
- failover: with ``ping -i 0.05`` running over the direct path, direct UDP is blocked; the time
  from the block to the first reply after the outage (via DERP), and after unblocking, the time
  until both agents show ``CurAddr`` again; medians over ``--samples``, whose blocks and
  unblocks are spread over one heartbeat (3 s) and one discovery period (5 s) of magicsock.

Per run it also prints iperf3's TCP retransmissions and the packets the agents' DERP clients
dropped before sending (``nodeagent_derp_dropped_total``): what limits the relayed figure.

Nothing is asserted; the figures are printed. Run as root:
``python3 benchmarks/path_throughput.py [--seconds 5] [--runs 3] [--samples 5]``.
Needs: iperf3, ping, nftables, the derper feature installed, /dev/net/tun.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nodeagent.magicsock.endpoint import DISCO_PING_INTERVAL, HEARTBEAT_INTERVAL
from tests.natlab import Agent, NatLab, Router, natlab_missing, wait_until
from tests.netns import popen_in_netns
from tests.procutil import stop

POLL = 0.05
TX = "nodeagent_magicsock_tx_packets_total"
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")
_METRIC = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


class Pair:
    """One lab: region + derper, homes ``a`` and ``b`` (easy NAT), control, two agents."""

    def __init__(self, lab: NatLab) -> None:
        self.lab = lab
        lab.start_derper(lab.add_region("r1"))
        self.home_a: Router = lab.add_home("a", nat="easy")
        self.home_b: Router = lab.add_home("b", nat="easy")
        ctl = lab.start_control()
        key = ctl.authkey()
        self.a: Agent = lab.start_agent(self.home_a, ctl, auth_key=key)
        self.b: Agent = lab.start_agent(self.home_b, ctl, auth_key=key)
        self.a.wait_running()
        self.b.wait_running()
        wait_until(lambda: peer(self.a) and peer(self.b), 20, "the agents see each other")
        self.ip_a = peer(self.b)["TailscaleIPs"][0]
        self.ip_b = peer(self.a)["TailscaleIPs"][0]

    @property
    def agents(self) -> tuple[Agent, Agent]:
        return self.a, self.b

    def cur_addrs(self) -> tuple[str, str]:
        return cur_addr(self.a), cur_addr(self.b)

    def logs(self) -> str:
        return "".join(f"--- {ag.name} log (tail) ---\n{ag.log()[-2000:]}\n" for ag in self.agents)


def peer(agent: Agent) -> dict[str, Any] | None:
    """The agent's only peer in its status, or None."""
    peers = agent.api("status").get("Peer") or {}
    return next(iter(peers.values()), None)


def cur_addr(agent: Agent) -> str:
    p = peer(agent)
    return (p or {}).get("CurAddr", "")


def metrics(agent: Agent) -> dict[str, float]:
    """``nodeagent debug metrics`` as ``{'name{labels}': value}``."""
    r = agent.cli("debug", "metrics")
    if r.returncode != 0:
        raise RuntimeError(f"{agent.name}: debug metrics: {r.stderr.strip()}")
    out = {}
    for line in r.stdout.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def derp_drops(agent: Agent) -> float:
    """Packets the agent's DERP client dropped before sending (every reason and region)."""
    return sum(v for k, v in metrics(agent).items() if k.startswith("nodeagent_derp_dropped_"))


def tx_packets(agent: Agent) -> tuple[float, float]:
    """WireGuard packets sent so far: (direct, derp)."""
    m = metrics(agent)
    return m.get(f'{TX}{{path="direct"}}', 0.0), m.get(f'{TX}{{path="derp"}}', 0.0)


def sent_since(before: list[tuple[float, float]], pair: Pair) -> tuple[float, float]:
    """(direct, derp) WireGuard packets both agents sent since the ``tx_packets`` snapshot
    ``before`` (one per agent)."""
    now = [tx_packets(ag) for ag in pair.agents]
    return (sum(n[0] - b[0] for b, n in zip(before, now, strict=True)),
            sum(n[1] - b[1] for b, n in zip(before, now, strict=True)))


def timed_wait(cond: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll ``cond`` every 50 ms; seconds until it held (``TimeoutError`` after ``timeout``)."""
    t0 = time.monotonic()
    wait_until(cond, timeout, what, interval=POLL)
    return time.monotonic() - t0


# --- ping -------------------------------------------------------------------------------------


class Pinger:
    """``ping -D -i INTERVAL`` from a's LAN namespace to b's tailnet address, to a file."""

    def __init__(self, pair: Pair, path: Path, interval: float = 0.05) -> None:
        self.path = path
        self.out = open(path, "w")  # closed in stop()
        self.started = time.monotonic()
        self.proc = popen_in_netns(pair.home_a.lan.ns, [
            "ping", "-D", "-n", "-i", f"{interval:g}", pair.ip_b], stdout=self.out,
            stderr=subprocess.STDOUT)

    def replies(self) -> list[tuple[float, int]]:
        """(wall-clock time, icmp_seq) of every reply so far."""
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            m = _REPLY.match(line)
            if m:
                out.append((float(m.group(1)), int(m.group(2))))
        return out

    def stop(self) -> None:
        stop(self.proc, signal.SIGINT, timeout=5)
        self.out.close()


@contextlib.contextmanager
def pinging(pair: Pair, interval: float = 0.05) -> Iterator[Pinger]:
    p = Pinger(pair, pair.lab.dir / f"ping-{time.monotonic_ns()}.txt", interval)
    try:
        yield p
    finally:
        p.stop()


def ping_rtt(pair: Pair, count: int = 20) -> float:
    """Average RTT (ms) of ``count`` pings a -> b at 50 ms intervals."""
    r = pair.lab.run(pair.home_a, ["ping", "-n", "-q", "-c", str(count), "-i", "0.05",
                                   pair.ip_b], capture_output=True, text=True, timeout=60)
    m = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return float(m.group(1)) if m else float("nan")


# --- paths --------------------------------------------------------------------------------------


def wait_direct(pair: Pair, timeout: float = 30.0) -> float:
    """Unblock direct UDP and keep pinging until both agents show ``CurAddr``; seconds taken."""
    if pair.lab.udp_blocked:
        pair.lab.unblock_direct_udp()
    with pinging(pair, 0.2):
        try:
            return timed_wait(lambda: all(pair.cur_addrs()), timeout, "CurAddr on both agents")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{pair.logs()}") from None


def derp_only(pair: Pair) -> bool:
    """Both ``CurAddr`` empty, and a burst of pings went out via DERP only on both agents."""
    if any(pair.cur_addrs()):
        return False
    before = [tx_packets(ag) for ag in pair.agents]
    ping_rtt(pair, count=6)
    after = [tx_packets(ag) for ag in pair.agents]
    return all(d1 == d0 and r1 > r0 for (d0, r0), (d1, r1) in zip(before, after, strict=True))


def wait_relayed(pair: Pair, timeout: float = 60.0) -> tuple[float, float]:
    """Block direct UDP; seconds until both ``CurAddr`` are empty, and until traffic flows via
    DERP only."""
    t0 = time.monotonic()
    pair.lab.block_direct_udp()
    with pinging(pair, 0.2):
        try:
            t_empty = timed_wait(lambda: not any(pair.cur_addrs()), timeout,
                                 "CurAddr empty on both agents")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{pair.logs()}") from None
    try:
        wait_until(lambda: derp_only(pair), timeout, "packets via DERP only", interval=0.2)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{pair.logs()}") from None
    return t_empty, time.monotonic() - t0


def iperf(pair: Pair, seconds: int) -> tuple[float, int]:
    """(Mbit/s received by iperf3 in b, TCP retransmissions), sent from a, one TCP stream over
    the tailnet."""
    lab = pair.lab
    srv = popen_in_netns(pair.home_b.lan.ns, ["iperf3", "-s", "-1", "-B", pair.ip_b],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: ":5201" in lab.run(pair.home_b, ["ss", "-ltn"], capture_output=True,
                                              text=True).stdout, 10, "iperf3 server",
                   interval=POLL)
        r = lab.run(pair.home_a, ["iperf3", "-c", pair.ip_b, "-t", str(seconds), "-J"],
                    capture_output=True, text=True, timeout=seconds + 60)
        try:
            end = json.loads(r.stdout)["end"]
            return (float(end["sum_received"]["bits_per_second"]) / 1e6,
                    int(end["sum_sent"].get("retransmits", -1)))
        except (ValueError, KeyError):
            print(f"  iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}", file=sys.stderr)
            return float("nan"), -1
    finally:
        stop(srv, signal.SIGKILL)


# --- measurements -------------------------------------------------------------------------------


def throughput(pair: Pair, seconds: int, runs: int) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {k: [] for k in (
        "direct", "relayed", "rtt_direct", "rtt_relayed", "to_empty", "to_derp_only")}
    for i in range(runs):
        wait_direct(pair)
        snap = [tx_packets(ag) for ag in pair.agents]
        tput, retr_direct = iperf(pair, seconds)
        res["direct"].append(tput)
        direct_pkts, derp_pkts = sent_since(snap, pair)
        derp_share = derp_pkts / max(1.0, direct_pkts + derp_pkts)
        res["rtt_direct"].append(ping_rtt(pair))
        t_empty, t_derp = wait_relayed(pair)
        res["to_empty"].append(t_empty)
        res["to_derp_only"].append(t_derp)
        snap = [tx_packets(ag) for ag in pair.agents]
        drops0 = sum(derp_drops(ag) for ag in pair.agents)
        tput, retr_relayed = iperf(pair, seconds)
        res["relayed"].append(tput)
        direct_during_relay, sent = sent_since(snap, pair)
        drops = sum(derp_drops(ag) for ag in pair.agents) - drops0
        res["rtt_relayed"].append(ping_rtt(pair))
        print(f"  run {i + 1}: direct {res['direct'][-1]:6.1f} Mbit/s ({retr_direct} TCP "
              f"retransmits, {derp_share:.1%} of packets via DERP), relayed "
              f"{res['relayed'][-1]:6.1f} Mbit/s ({retr_relayed} TCP retransmits, "
              f"{direct_during_relay:.0f} packets direct, DERP client dropped {drops:.0f} of "
              f"{sent:.0f}); RTT {res['rtt_direct'][-1]:.2f} / {res['rtt_relayed'][-1]:.2f} ms; "
              f"block -> CurAddr empty {t_empty:.2f} s, -> DERP only {t_derp:.2f} s",
              flush=True)
    wait_direct(pair)
    return res


def time_to_direct(samples: int) -> dict[str, list[float]]:
    """A fresh lab per sample: first ping packet -> CurAddr in a's status (and b's)."""
    res: dict[str, list[float]] = {"a": [], "both": [], "first_reply": []}
    for i in range(samples):
        with NatLab() as lab:
            pair = Pair(lab)
            with pinging(pair, 0.05) as p:
                t_a = t_b = None
                t_start = time.time() - (time.monotonic() - p.started)
                deadline = p.started + 30
                while time.monotonic() < deadline and (t_a is None or t_b is None):
                    ca, cb = pair.cur_addrs()
                    now = time.monotonic() - p.started
                    if ca and t_a is None:
                        t_a = now
                    if cb and t_b is None:
                        t_b = now
                    time.sleep(POLL)
                replies = p.replies()
            first = replies[0][0] - t_start if replies else float("nan")
            if t_a is None or t_b is None:
                print(f"  sample {i + 1}: CurAddr not set within 30 s (a {t_a}, b {t_b})\n"
                      f"{pair.logs()}", flush=True)
                res["a"].append(float("inf") if t_a is None else t_a)
                res["both"].append(float("inf"))
                continue
            res["a"].append(t_a)
            res["both"].append(max(t_a, t_b))
            res["first_reply"].append(first)
            print(f"  sample {i + 1}: first reply {first * 1000:.0f} ms, CurAddr at a "
                  f"{t_a:.2f} s, at b {t_b:.2f} s", flush=True)
    return res


def resumed(p: Pinger, t_block: float) -> tuple[float, float] | None:
    """Once replies came back after an outage (a gap > 0.25 s) that began at or after
    ``t_block`` (wall clock): (block -> first reply after it, the gap); else None."""
    reps = [ts for ts, _ in p.replies()]
    before = [ts for ts in reps if ts <= t_block]
    after = [ts for ts in reps if ts > t_block]
    last = before[-1] if before else t_block
    for prev, ts in itertools.pairwise([last, *after]):
        if ts - prev > 0.25:
            return ts - t_block, ts - prev
    return None


def failover(pair: Pair, samples: int) -> dict[str, list[float]]:
    """Continuous ping over the direct path; block direct UDP; outage until replies resume;
    unblock; time until both agents show CurAddr again. The block and the unblock come at
    moments spread over one heartbeat period (3 s) and one discovery period (5 s): their phase
    against the agents' timers decides the figures."""
    res: dict[str, list[float]] = {"outage": [], "gap": [], "back": [], "back_gap": []}
    for i in range(samples):
        spread = (i + 0.5) / samples
        wait_direct(pair)
        with pinging(pair, 0.05) as p:
            time.sleep(1.0 + HEARTBEAT_INTERVAL * spread)
            t_block = time.time()
            pair.lab.block_direct_udp()
            try:
                outage, gap = wait_until(lambda p=p, t=t_block: resumed(p, t), 30,
                                         "ping replies after the block", interval=POLL)
            except TimeoutError:
                print(f"  sample {i + 1}: no replies within 30 s of the block\n{pair.logs()}",
                      flush=True)
                outage = gap = float("inf")
            time.sleep(1.0 + DISCO_PING_INTERVAL * spread)
            t_unblock = time.time()
            pair.lab.unblock_direct_udp()
            try:
                back = timed_wait(lambda: all(pair.cur_addrs()), 30, "CurAddr again")
            except TimeoutError:
                back = float("inf")
            time.sleep(0.5)
            reps = [ts for ts, _ in p.replies() if ts > t_unblock - 0.5]
            back_gap = max((b - a for a, b in itertools.pairwise(reps)), default=float("nan"))
        res["outage"].append(outage)
        res["gap"].append(gap)
        res["back"].append(back)
        res["back_gap"].append(back_gap)
        print(f"  sample {i + 1}: block -> first reply via DERP {outage:.2f} s (reply gap "
              f"{gap:.2f} s); unblock -> CurAddr on both {back:.2f} s (largest reply gap "
              f"{back_gap * 1000:.0f} ms)", flush=True)
    return res


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per measurement")
    ap.add_argument("--runs", type=int, default=3, help="direct/relayed throughput alternations")
    ap.add_argument("--samples", type=int, default=5,
                    help="fresh labs for time to direct; block/unblock rounds for failover")
    args = ap.parse_args()
    if (why := natlab_missing(derper=True, tun=True)) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1

    print(f"time to direct path ({args.samples} fresh labs):", flush=True)
    ttd = time_to_direct(args.samples)

    with NatLab() as lab:
        pair = Pair(lab)
        print(f"throughput ({args.runs} runs of {args.seconds} s each way, alternating):",
              flush=True)
        tp = throughput(pair, args.seconds, args.runs)
        print(f"failover ({args.samples} samples):", flush=True)
        fo = failover(pair, args.samples)

    direct, relayed = med(tp["direct"]), med(tp["relayed"])
    print()
    print(f"TCP direct   {direct:8.1f} Mbit/s   ping RTT {med(tp['rtt_direct']):.2f} ms")
    print(f"TCP relayed  {relayed:8.1f} Mbit/s   ping RTT {med(tp['rtt_relayed']):.2f} ms")
    print(f"ratio relayed/direct: throughput {relayed / direct:.2f}x (target >= 0.5x), "
          f"RTT {med(tp['rtt_relayed']) / med(tp['rtt_direct']):.2f}x")
    print(f"time to direct path: CurAddr at the pinger {med(ttd['a']):.2f} s, at both "
          f"{med(ttd['both']):.2f} s (max {max(ttd['both']):.2f} s; first reply "
          f"{med(ttd['first_reply']) * 1000:.0f} ms)")
    print(f"block -> CurAddr empty on both {med(tp['to_empty']):.2f} s, -> DERP only "
          f"{med(tp['to_derp_only']):.2f} s")
    print(f"failover: block -> replies via DERP {med(fo['outage']):.2f} s "
          f"(max {max(fo['outage']):.2f} s; largest reply gap {med(fo['gap']):.2f} s)")
    print(f"return: unblock -> CurAddr on both {med(fo['back']):.2f} s "
          f"(max {max(fo['back']):.2f} s; largest reply gap "
          f"{med(fo['back_gap']) * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
