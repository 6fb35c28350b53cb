#!/usr/bin/env python3
"""The C++ node (cpp/build/zmqmodels-node, one process) against the Python node (K = 1 and 2
worker processes), in one run on one machine, with the same hub, models and clients:

1. round trip of a small MLP (784-256-10): p50/p99 with one client; throughput with 4;
2. swaps of a ~100 MB model under 4 closed-loop clients: p99 and max latency during the swap
   vs steady state, failed requests;
3. release verified -> serving (cache write, load, example check, warm-up, swap) from the
   node's own stage timings;
4. peak RSS (the C++ process; the Python front plus its workers).

The C++ node loads either from its cache file or from the archive in memory (--load-from);
both are measured. Build it first with scripts/build_cpp.
Usage: scripts/bench_cpp_node.py [--seconds 5] [--swaps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serving import (  # noqa: E402
    ROOT,
    Heavy,
    Procs,
    build,
    children,
    free_port,
    mlp,
    pct,
    run_clients,
    status_kib,
    wait_idle_cpu,
)

sys.path.insert(0, ROOT)
BINARY = os.path.join(ROOT, "cpp", "build", "zmqmodels-node")


def start_node(kind: str, procs: Procs, hub: str, tmp: str, device: str) -> tuple[object, str]:
    addr = f"tcp://127.0.0.1:{free_port()}"
    cache = tempfile.mkdtemp(dir=tmp)
    if kind.startswith("cpp"):
        load_from = kind.split("-")[1]
        args = [BINARY, "--hub", hub, "--bind", addr, "--cache", cache, "--node-id", kind, "--model", "mlp",
                "--model", "heavy", "--device", device, "--threads", "2", "--load-from", load_from]
    else:
        k = kind.split("K=")[1]
        args = [sys.executable, "-m", "zmqmodels", "serve", "--hub", hub, "--bind", addr, "--cache", cache,
                "--node-id", kind, "--model", "mlp", "--model", "heavy", "--workers", k, "--device", device]
    return procs.start(args), addr


def rss_peak_mib(pid: int) -> float:
    pids = [pid, *children(pid)]
    return sum(status_kib(p, "VmHWM") for p in pids) / 1024


def measure(kind: str, args: argparse.Namespace, tmp: str) -> dict:
    from zmqmodels.clients.hub import HubClient

    procs = Procs()
    out: dict = {"kind": kind}
    try:
        # the hub runs in its own process at nice 10, standing in for a hub on another machine:
        # its verify-and-store of each 100 MB release must not take the node's CPU in a 2-core run
        hub_addr = f"tcp://127.0.0.1:{free_port()}"
        procs.start(["nice", "-n", "10", sys.executable, "-m", "zmqmodels", "hub", "--bind", hub_addr,
                     "--store", tempfile.mkdtemp(dir=tmp)])
        with HubClient(hub_addr, timeout=120) as hub:
            deadline = time.monotonic() + 60
            while True:
                try:
                    hub.status(timeout=2)
                    break
                except Exception:  # noqa: BLE001 (not up yet)
                    if time.monotonic() > deadline:
                        raise
            node, addr = start_node(kind, procs, hub_addr, tmp, args.device)
            small = hub.publish(build("mlp", mlp(0), "m1", 784)).seq
            heavy = [build("heavy", Heavy.make(i), f"h{i}", 1024) for i in range(args.swaps + 1)]
            seq = hub.publish(heavy[0]).seq
            for name, s in (("mlp", small), ("heavy", seq)):
                ok, st = hub.wait_for(name, s, 1, 180)
                if not ok:
                    raise SystemExit(f"{kind}: {name} did not serve: {st}")
            wait_idle_cpu()
            one = run_clients(addr, "mlp", 1, args.seconds, 784, tmp)
            lat = [r[1] * 1000 for r in one["rows"]]
            out["p50"], out["p99"] = statistics.median(lat), pct(lat, 0.99)
            four = run_clients(addr, "mlp", 4, args.seconds, 784, tmp)
            out["rps4"] = len(four["rows"]) / args.seconds
            # swaps under 4 clients
            wait_idle_cpu()
            import threading

            box: dict = {}
            seconds = 3 + args.swaps * 4.0
            t = threading.Thread(target=lambda: box.update(run_clients(addr, "heavy", 4, seconds, 1024, tmp)))
            t.start()
            time.sleep(2.5)
            windows, ready = [], []
            for rel in heavy[1:]:
                t0 = time.monotonic()
                s = hub.publish(rel).seq
                ok, st = hub.wait_for("heavy", s, 1, 120)
                windows.append((t0, time.monotonic() + 0.2))
                row = next(r for r in st.nodes if r.model == "heavy")
                stg = row.stages
                work = stg.get("roll", stg.get("load", 0) + stg.get("check", 0))
                ready.append(work + stg.get("cache_write", 0))
                time.sleep(max(0.5, 4.0 - (time.monotonic() - t0)))
            t.join()
            rows = box["rows"]
            during = [r[1] * 1000 for r in rows if any(a <= r[0] <= b for a, b in windows)]
            steady = [r[1] * 1000 for r in rows if r[0] < windows[0][0] - 0.2]
            out["steady_p99"] = pct(steady, 0.99)
            out["steady_max"] = max(steady)
            out["steady_n"] = len(steady)
            out["steady_over3"] = sum(x > 3 * out["steady_p99"] for x in steady)
            out["swap_p99"] = pct(during, 0.99) if during else float("nan")
            out["swap_max"] = max(during) if during else float("nan")
            out["failed"] = box["failures"]
            out["over3"] = sum(x > 3 * out["steady_p99"] for x in during)
            slow = [(round(r[0] - a, 3), round(r[1] * 1000, 1)) for r in rows for a, b in windows
                    if a <= r[0] <= b and r[1] * 1000 > 3 * out["steady_p99"]]
            print(f"  {kind}: slow requests (s after publish, ms): {slow[:40]}; windows "
                  f"{[round(b - a, 2) for a, b in windows]}", file=sys.stderr)
            out["during_n"] = len(during)
            out["ready_s"] = statistics.median(ready)
            out["rss_mib"] = rss_peak_mib(node.pid)
    finally:
        procs.close()
    print(f"  {kind}: {out}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default="cpp-file,cpp-memory,python K=1,python K=2")
    args = ap.parse_args()
    if not os.path.exists(BINARY):
        raise SystemExit("build the C++ node first: scripts/build_cpp")
    tmp = tempfile.mkdtemp(prefix="zmqm-bench-cpp-")
    try:
        results = [measure(k.strip(), args, tmp) for k in args.kinds.split(",")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, device {args.device}; MLP 784-256-10; ~100 MB model "
          f"(25 x Linear(1024, 1024)), {args.swaps} swaps under 4 clients\n")
    print("| node | RT p50 (ms) | RT p99 (ms) | 4 clients (req/s) | steady p99 (ms) | steady max (ms) | "
          "swap p99 (ms) | "
          "swap max (ms) | max / steady p99 | over 3x steady p99: steady, swaps | failed | "
          "verified -> serving (s) | "
          "peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kind']} | {r['p50']:.3f} | {r['p99']:.3f} | {r['rps4']:.0f} | {r['steady_p99']:.2f} | "
              f"{r['steady_max']:.2f} | "
              f"{r['swap_p99']:.2f} | {r['swap_max']:.2f} | {r['swap_max'] / r['steady_p99']:.1f}x | "
              f"{r['steady_over3'] / r['steady_n']:.2%}, {r['over3'] / max(1, r['during_n']):.2%} | "
              f"{r['failed']} | "
              f"{r['ready_s']:.3f} | {r['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
