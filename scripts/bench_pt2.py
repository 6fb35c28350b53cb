#!/usr/bin/env python3
"""The two release formats side by side (issue 30), same run, same node: TorchScript against a
``torch.export`` + AOTInductor package (``--format pt2``), for a small MLP (784-256-10) and a
~100 MB one (6 x 2048^2 and a head).

Per model and format: publish (compile, or export + AOTInductor compile, parity and the batch
proof; then store and broadcast), the archive and its package (code) size; the first load on
the node (its ``load`` and ``check`` stages); request p50/p99 and req/s with 1 and 64 requests
in flight (closed-loop client processes, scripts/bench_serving.py's); a weight-only update of
the head through ``HubClient.publish_weights`` (five of them): the median publish time, the
bytes that reached the node, verified -> serving (the node's ``roll`` stage), how the node
took it, and the worst request latency during a swap (the median update's, and the worst)
against the steady p99, with one worker and one client in flight throughout.

The hub runs here, the node (``zmqmodels serve``, one worker) as its own process.
Usage: scripts/bench_pt2.py [--seconds 4] [--small-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from scripts.bench_serving import ENV, pct, run_clients, wait_idle_cpu  # noqa: E402

UPDATES = 5  # weight-only updates per model and format (the median's and the worst's latency)


def models():  # noqa: ANN201
    import torch
    from torch import nn

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(2048, 2048), nn.ReLU())])
            self.head = nn.Linear(2048, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    return {"small": (small, 784, "2"), "100MB": (Big().eval(), 2048, "head")}


def row(hub, name: str):  # noqa: ANN001, ANN201
    return next((n for n in hub.status().nodes if n.model == name), None)


def received(port: int) -> float:
    from tests.helpers import scrape

    return sum(v for k, v in scrape(port).items() if k.startswith("zmqmodels_bytes_received"))


def one(hub, node_addr: str, metrics: int, tag: str, model, width: int, head: str, fmt: str,  # noqa: ANN001, PLR0913
        seconds: float, tmp: str) -> dict:
    import torch

    from zmqmodels import HubClient, build_release, compile_model

    name = f"{tag}-{fmt}"
    examples = [torch.randn(4, width), torch.randn(2, width)]
    wait_idle_cpu()
    t0 = time.perf_counter()
    compiled = compile_model(model, examples, formats=[fmt])
    release = build_release(compiled, name, "v1")
    built_s = time.perf_counter() - t0
    done = hub.publish(release)
    assert hub.wait_for(name, done.seq, 1, 600)[0]
    publish_s = time.perf_counter() - t0
    m = release.manifest
    code = len(compiled.pt2.package) if compiled.pt2 else m.archive_bytes - sum(t.nbytes for t in m.tensors)
    st = row(hub, name)
    out = {"model": tag, "format": fmt, "publish_s": publish_s, "build_s": built_s,
           "archive_mb": m.archive_bytes / 2**20, "code_mb": code / 2**20,
           "load_s": st.stages.get("load", 0.0), "check_s": st.stages.get("check", 0.0)}
    for flight in (1, 64):
        wait_idle_cpu()
        got = run_clients(node_addr, name, flight, seconds, width, tmp)
        lat = [r[1] for r in got["rows"]]
        out[f"p50_{flight}"], out[f"p99_{flight}"] = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
        out[f"rps_{flight}"] = len(lat) / seconds
    # weight-only updates under one closed-loop client, UPDATES of them, 3 s apart
    wait_idle_cpu()
    before = received(metrics)
    result: dict = {}
    client = threading.Thread(target=lambda: result.update(
        run_clients(node_addr, name, 1, seconds + 10 + 4 * UPDATES, width, tmp)))
    client.start()
    time.sleep(seconds + 6)  # the client process imports torch, then runs steadily before the update
    windows, took = [], []
    for i in range(UPDATES):
        state = {k: v.clone() + 0.01 * (i + 1) for k, v in model.state_dict().items() if k.startswith(head)}
        t0, t_abs = time.perf_counter(), time.monotonic()
        up = HubClient(hub.address, timeout=600).publish_weights(name, state)
        assert hub.wait_for(name, up.seq, 1, 600)[0]
        took.append(time.perf_counter() - t0)
        windows.append((t_abs, t_abs + took[-1] + 0.5))
        time.sleep(3)
    client.join()
    rows = result["rows"]
    steady = [r[1] for r in rows if r[0] < windows[0][0]]
    maxes = sorted(max((r[1] for r in rows if a <= r[0] <= b), default=float("nan")) for a, b in windows)
    out["update_s"] = sorted(took)[len(took) // 2]
    out["steady_p99_ms"] = pct(steady, 0.99) * 1e3
    out["swap_max_ms"] = maxes[len(maxes) // 2] * 1e3  # the median update's worst request
    out["swap_worst_ms"] = maxes[-1] * 1e3
    st = row(hub, name)
    out["update_mb"] = (received(metrics) - before) / 2**20 / UPDATES
    out["roll_s"], out["how"] = st.stages.get("roll", float("nan")), st.how
    out["failures"] = result["failures"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--small-only", action="store_true")
    args = ap.parse_args()
    import torch

    from tests.helpers import free_port
    from zmqmodels import Hub
    from zmqmodels.release.store import Store

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="bench-pt2-")
    node_addr, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
    results = []
    with Hub("tcp://127.0.0.1:0", Store(Path(tmp) / "hub"), heartbeat_interval_s=0.25) as hub:
        names = [f"{t}-{f}" for t in ("small", "100MB") for f in ("torchscript", "pt2")]
        node = subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub.address, "--bind",
                                 node_addr, "--workers", "1", "--cache", f"{tmp}/cache", "--node-id", "n",
                                 "--metrics", str(metrics), *[a for n in names for a in ("--model", n)]],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/node.log", "w"))  # noqa: SIM115
        try:
            for tag, (model, width, head) in models().items():
                if args.small_only and tag != "small":
                    continue
                for fmt in ("torchscript", "pt2"):
                    results.append(one(hub, node_addr, metrics, tag, model, width, head, fmt,
                                       args.seconds, tmp))
                    print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            node.terminate()
            node.wait(30)
    report(results)


def report(results: list[dict]) -> None:
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {__import__('torch').__version__}; "
          "one node, one worker, one torch thread")
    print("\n| model | format | publish (s) | archive MB | code MB | first load + check (s) "
          "| p50/p99 ms, 1 in flight | req/s, 1 | p50/p99 ms, 64 in flight | req/s, 64 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['format']} | {r['publish_s']:.1f} | {r['archive_mb']:.1f} "
              f"| {r['code_mb']:.2f} | {r['load_s']:.3f} + {r['check_s']:.3f} "
              f"| {r['p50_1']:.2f}/{r['p99_1']:.2f} | {r['rps_1']:.0f} "
              f"| {r['p50_64']:.1f}/{r['p99_64']:.1f} | {r['rps_64']:.0f} |")
    print(f"\n{UPDATES} weight-only updates each (the head's tensors), one client in flight throughout:")
    print("\n| model | format | weights update: publish (s) | MB to the node | verified -> serving (s) | how "
          "| max latency in a swap, median / worst (ms) | steady p99 (ms) | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['format']} | {r['update_s']:.2f} | {r['update_mb']:.2f} "
              f"| {r['roll_s']:.3f} | {r['how']} | {r['swap_max_ms']:.1f} / {r['swap_worst_ms']:.1f} "
              f"| {r['steady_p99_ms']:.2f} "
              f"| {r['failures']} |")


if __name__ == "__main__":
    main()
