"""Benchmark: what the connreject feature costs the data plane.

Prints, in one run on one machine:
- TUN Wrapper inbound packets/s (1400-byte allowed TCP packets, and ACL-dropped SYNs that hit the
  note site) with the feature absent (no callback), installed but disabled, and enabled — with
  the ratios against absent (target: installed-but-disabled within 1 %);
- the median cost of one ``note()`` in µs (target ≤ 2 µs), enabled, on a repeat key;
- memory after 1 000 000 distinct events (bounded by the LRU);
- the installed size of the feature package.

Run: ``python3 benchmarks/connreject_cost.py`` (``BENCH_N`` sets packets per round).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "features", "connreject"))

from nodeagent.filter import Filter, parse_rules  # noqa: E402
from nodeagent.packet import TCP_ACK, TCP_PSH, TCP_SYN, build_tcp, ip_to_int  # noqa: E402
from nodeagent.tundev.fake import FakeTun  # noqa: E402
from nodeagent.tundev.wrapper import Wrapper  # noqa: E402

N = int(os.environ.get("BENCH_N", "200000"))
ROUNDS = 5
BATCH = 64


def _wrapper() -> Wrapper:
    rules = parse_rules([{"SrcIPs": ["100.64.0.0/10"],
                          "DstPorts": [{"IP": "100.64.0.1", "Ports": {"First": 80, "Last": 80}}]}])
    w = Wrapper(FakeTun(), Filter(rules, ["100.64.0.1/32"]))
    w.set_outbound_sink(lambda pkts: None)
    w.tun.write_many = lambda pkts: None  # type: ignore[method-assign]
    return w


def _batches(kind: str) -> list[list[bytes]]:
    _, me = ip_to_int("100.64.0.1")
    out = []
    for i in range(N // BATCH):
        batch = []
        for j in range(BATCH):
            src = (100 << 24) | (64 << 16) | ((i * BATCH + j) % 60000 + 2)
            if kind == "allowed":
                batch.append(build_tcp(4, src, me, 40000, 80, 1, 1, TCP_ACK | TCP_PSH,
                                       payload=bytes(1400 - 40)))
            else:
                batch.append(build_tcp(4, src, me, 40000 + j, 22, 1, 0, TCP_SYN))
        out.append(batch)
    return out


def _rate(w: Wrapper, batches: list[list[bytes]]) -> float:
    best = 0.0
    for _ in range(ROUNDS):
        gc.collect()
        t0 = time.perf_counter()
        for b in batches:
            w.from_peer(b)
        best = max(best, len(batches) * BATCH / (time.perf_counter() - t0))
    return best


def data_plane() -> None:
    from nodeagent_connreject.extension import ConnRejectExtension

    for kind in ("allowed", "rejected-syn"):
        batches = _batches(kind)
        results = {}
        for mode in ("absent", "installed-disabled", "enabled"):
            w = _wrapper()
            if mode != "absent":
                ext = ConnRejectExtension()
                ext.aggregator.set_enabled(mode == "enabled")
                w.set_conn_reject_note(ext.note)
            results[mode] = _rate(w, batches)
        base = results["absent"]
        for mode, r in results.items():
            print(f"wrapper inbound {kind:13s} {mode:19s} {r / 1e3:8.1f} kpkt/s  "
                  f"ratio vs absent {r / base:.3f}")


def note_cost() -> None:
    from nodeagent_connreject.extension import ConnRejectExtension

    ext = ConnRejectExtension()
    ext.aggregator.set_enabled(True)
    note = ext.note
    samples = []
    for _ in range(50):
        t0 = time.perf_counter_ns()
        for _ in range(1000):
            note("outgoing", 6, 4, 0x64400001, 5000, 0x64400002, 22, "acl", "tsmp_recv", False)
        samples.append((time.perf_counter_ns() - t0) / 1000 / 1000)
    print(f"note() repeat key, enabled: median {statistics.median(samples):.3f} µs "
          f"(p90 {sorted(samples)[44]:.3f} µs)")
    ext.aggregator.set_enabled(False)
    t0 = time.perf_counter_ns()
    for _ in range(100000):
        note("outgoing", 6, 4, 0x64400001, 5000, 0x64400002, 22, "acl", "tsmp_recv", False)
    print(f"note() disabled: {(time.perf_counter_ns() - t0) / 100000 / 1000:.3f} µs")


def memory() -> None:
    from nodeagent_connreject.aggregator import Aggregator, Event

    agg = Aggregator()
    agg.set_enabled(True)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for i in range(1_000_000):
        d = f"100.{64 + (i >> 16) % 64}.{(i >> 8) & 255}.{i & 255}:22"
        agg.note(Event("outgoing" if i & 1 else "incoming", 6, d, d, "acl", "tsmp_recv"))
    took = time.perf_counter() - t0
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"1 000 000 distinct events: {took:.1f} s under tracemalloc, kept {len(agg.outgoing())}+"
          f"{len(agg.incoming())} entries, aggregator memory {(after - before) / 1024:.0f} KiB, "
          f"evicted {agg.evicted}")


def installed_size() -> None:
    import nodeagent_connreject

    pkg = Path(nodeagent_connreject.__file__).parent
    src = sum(p.stat().st_size for p in pkg.rglob("*.py"))
    allf = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    print(f"feature package {pkg}: {src / 1024:.1f} KiB of source, {allf / 1024:.1f} KiB on disk "
          "(Go's feature trims ~41 KB)")


if __name__ == "__main__":
    data_plane()
    note_cost()
    memory()
    installed_size()
