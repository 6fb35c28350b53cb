#!/usr/bin/env python3
"""Serving benchmark (one run, one machine; every baseline measured alongside):

1. round trip of a small MLP (784-256-10) through a node: p50/p99, vs the same model called
   in-process and vs an empty REQ/REP echo (plain pyzmq);
2. throughput with 1, 4 and 16 concurrent clients (closed loop);
3. p99 and max latency during swaps of a ~100 MB model vs steady state, K = 1 and K = 2
   workers, 4 clients;
4. a worker's peak RSS during swaps vs the archive size;
5. saturated swaps (clients > workers: a model whose forward runs all of its ~100 MB, so the
   node, not the clients, is the bottleneck): time from the node having the release verified
   to every worker serving it, and p99/max latency during the swap vs steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))]


# -- child roles -------------------------------------------------------------------------------
def role_echo(addr: str) -> None:
    import zmq

    s = zmq.Context.instance().socket(zmq.REP)
    s.bind(addr)
    while True:
        s.send_multipart(s.recv_multipart())


def role_broker(front_addr: str, back_addr: str) -> None:
    """The ZeroMQ guide's LRU broker reduced to its hops: one worker, no logic, no torch."""
    import zmq

    ctx = zmq.Context.instance()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(front_addr)
    back.bind(back_addr)
    worker = back.recv_multipart()[0]
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if front in events:
            f = front.recv_multipart(copy=False)
            back.send_multipart([worker, f[0], *f[2:]], copy=False)
        if back in events:
            f = back.recv_multipart(copy=False)
            front.send_multipart([f[1], b"", *f[2:]], copy=False)


def role_echo_worker(back_addr: str) -> None:
    import zmq

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.connect(back_addr)
    s.send(b"READY")
    while True:
        s.send_multipart(s.recv_multipart(copy=False), copy=False)


def role_client(addr: str, model: str, seconds: float, threads: int, out: str, width: int) -> None:
    """Closed-loop clients; writes [(monotonic start, latency s, label)] per thread to ``out``."""
    import torch

    from zmqmodels import Client

    torch.set_num_threads(1)
    rows: list[tuple[float, float, str]] = []
    lock = threading.Lock()
    failures = [0]

    def loop() -> None:
        x = torch.randn(1, width)
        mine = []
        with Client(addr, timeout=30, retries=0) as c:
            c.infer(model, x)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    r = c.infer(model, x)
                except Exception:
                    failures[0] += 1
                    continue
                mine.append((t0, time.monotonic() - t0, r.label, r.queue_ms, r.infer_ms, r.worker))
        with lock:
            rows.extend(mine)

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out, "w") as f:
        json.dump({"rows": rows, "failures": failures[0]}, f)


# -- helpers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def close(self) -> None:
        for p in self.procs:
            self.stop(p)


def children(pid: int) -> list[int]:
    """Child processes of ``pid``, whichever of its threads started them (a node spawns its
    workers from its I/O thread)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def mlp(seed: int):  # noqa: ANN201
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


class Heavy:
    """~100 MB of 4 MB layers (loads in ~0.15 s, like FACTS' 25-layer model); forward uses one
    (``all_layers``: every one, a few ms a request on one thread)."""

    @staticmethod
    def make(seed: int, all_layers: bool = False):  # noqa: ANN205
        import torch
        from torch import nn

        class HeavyNet(nn.Module):
            def __init__(self, depth: int) -> None:
                super().__init__()
                self.layers = nn.ModuleList([nn.Linear(1024, 1024) for _ in range(25)])
                self.depth = depth

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                for i, layer in enumerate(self.layers):
                    if i < self.depth:
                        x = layer(x)
                return x

        torch.manual_seed(seed)
        return HeavyNet(25 if all_layers else 1).eval()


def build(name: str, model, label: str, example_width: int):  # noqa: ANN001, ANN201
    import torch

    from zmqmodels import build_release, compile_model

    ex = [torch.randn(1, example_width), torch.randn(4, example_width)]
    return build_release(compile_model(model, ex), name, label, codec="none")


def run_clients(addr: str, model: str, clients: int, seconds: float, width: int, tmp: str) -> dict:
    procs = min(clients, 4)
    per = clients // procs
    outs, ps = [], []
    for i in range(procs):
        out = os.path.join(tmp, f"client-{i}-{time.monotonic_ns()}.json")
        outs.append(out)
        ps.append(subprocess.Popen([sys.executable, __file__, "--role", "client", "--addr", addr,
                                    "--model", model, "--seconds", str(seconds), "--threads",
                                    str(per), "--out", out, "--width", str(width)], env=ENV))
    for p in ps:
        p.wait(seconds + 120)
    rows, failures = [], 0
    for out in outs:
        with open(out) as f:
            data = json.load(f)
        rows += data["rows"]
        failures += data["failures"]
    return {"rows": rows, "failures": failures}


def bench_round_trip(args, procs, node, publish_wait, tmp, results) -> None:  # noqa: ANN001
    """Parts 1 and 2: round trip against its baselines, then throughput."""
    import torch
    import zmq

    from zmqmodels import Client

    # 1. round trip -------------------------------------------------------------------
    small = mlp(1)
    x = torch.randn(1, 784)
    scripted = torch.jit.script(small)
    inproc = []
    with torch.inference_mode():
        for _ in range(200):
            scripted(x)
        for _ in range(3000):
            t0 = time.perf_counter()
            scripted(x)
            inproc.append(time.perf_counter() - t0)
    echo_addr = f"tcp://127.0.0.1:{free_port()}"
    procs.start([sys.executable, __file__, "--role", "echo", "--addr", echo_addr])
    req = zmq.Context.instance().socket(zmq.REQ)
    req.linger = 0
    req.connect(echo_addr)
    echo = []
    payload = [b"x" * 64, bytes(784 * 4)]
    for i in range(3200):
        t0 = time.perf_counter()
        req.send_multipart(payload)
        req.recv_multipart()
        if i >= 200:
            echo.append(time.perf_counter() - t0)
    req.close()
    broker_addr = f"tcp://127.0.0.1:{free_port()}"
    back_addr = f"ipc://{tmp}/broker-back"
    procs.start([sys.executable, __file__, "--role", "broker", "--addr", broker_addr,
                 "--model", back_addr])
    time.sleep(0.5)
    procs.start([sys.executable, __file__, "--role", "echo-worker", "--addr", back_addr])
    time.sleep(0.5)
    req = zmq.Context.instance().socket(zmq.REQ)
    req.linger = 0
    req.connect(broker_addr)
    chain = []
    for i in range(3200):
        t0 = time.perf_counter()
        req.send_multipart(payload)
        req.recv_multipart()
        if i >= 200:
            chain.append(time.perf_counter() - t0)
    req.close()
    small_addr, _ = node("mlp", 2, "small")
    publish_wait(build("mlp", small, "v1", 784))
    rt = []
    with Client(small_addr, timeout=10) as c:
        for i in range(3200):
            t0 = time.perf_counter()
            c.infer("mlp", x)
            if i >= 200:
                rt.append(time.perf_counter() - t0)
    results["round_trip_ms"] = {
        name: {"p50": pct(v, 0.5) * 1e3, "p99": pct(v, 0.99) * 1e3}
        for name, v in (("in-process call", inproc), ("empty REQ/REP echo", echo),
                        ("REQ -> broker -> worker echo (the pattern's floor, no work)", chain),
                        ("zmqmodels node", rt))}
    print(json.dumps(results["round_trip_ms"]), file=sys.stderr, flush=True)

    # 2. throughput ---------------------------------------------------------------------
    results["throughput_rps"] = {}
    for n in (1, 4, 16):
        r = run_clients(small_addr, "mlp", n, args.seconds, 784, tmp)
        lat = [d for _, d, *_ in r["rows"]]
        results["throughput_rps"][n] = {"rps": len(lat) / args.seconds, "p50_ms": pct(lat, 0.5) * 1e3,
                                        "p99_ms": pct(lat, 0.99) * 1e3, "failures": r["failures"]}
        print(json.dumps({n: results["throughput_rps"][n]}), file=sys.stderr, flush=True)



def bench_saturated(args, procs, node, hc, tmp, results) -> None:  # noqa: ANN001
    """Part 5: swaps while ``--clients`` (4) clients keep K = 1 or 2 workers saturated."""
    slow = {label: build("slowheavy", Heavy.make(seed, all_layers=True), label, 1024)
            for seed, label in ((3, "a"), (4, "b"))}
    results["saturated"], results["clients"], results["device"] = {}, args.clients, args.device
    for k in (1, 2):
        tag = f"slow{k}"
        addr, p = node("slowheavy", k, tag)
        for rel in (slow["b"], slow["a"]):  # both stored: the measured swaps are rollbacks
            done = hc.publish(rel, timeout=300, reuse_label=True)  # a and b in turn, on purpose
            if not hc.wait_for("slowheavy", done.seq, 1, 300, poll_s=0.01)[0]:
                raise SystemExit("initial rollout failed")
        wait_idle_cpu()
        windows: list[tuple[float, float, float]] = []  # (rollback sent, verified seen, serving)

        def swapper(windows: list[tuple[float, float, float]] = windows, tag: str = tag, k: int = k) -> None:
            time.sleep(6.0)  # steady state first (the client processes import torch)
            for i in range(args.swaps):
                t0 = time.monotonic()
                done = hc.rollback("slowheavy", "b" if i % 2 == 0 else "a", timeout=300)
                verified = 0.0
                while True:  # the node reports verified, then loading, then serving
                    rows = [n for n in hc.status().nodes if n.node == tag and n.seq == done.seq]
                    now = time.monotonic()
                    if rows and not verified and rows[0].state in ("verified", "loading", "serving"):
                        verified = now
                    if rows and rows[0].state == "serving":
                        break
                    if now - t0 > 120:
                        raise SystemExit(f"saturated K={k}: seq {done.seq} not serving in 120 s")
                    time.sleep(0.005)
                windows.append((t0, verified, now))
                time.sleep(2.0)

        t = threading.Thread(target=swapper)
        t.start()
        rows = run_clients(addr, "slowheavy", args.clients, 6.0 + args.swaps * 5.0, 1024, tmp)
        t.join()
        in_swap = [d for t0, d, *_ in rows["rows"] if any(a <= t0 + d and t0 <= b for a, _, b in windows)]
        steady = [d for t0, d, *_ in rows["rows"]
                  if not any(a - 0.5 <= t0 + d and t0 <= b + 0.5 for a, _, b in windows)]
        results["saturated"][k] = {
            "verified_to_serving_s": [round(c - b, 3) for _, b, c in windows],
            "steady_p50_ms": pct(steady, 0.5) * 1e3, "steady_p99_ms": pct(steady, 0.99) * 1e3,
            "swap_p99_ms": pct(in_swap, 0.99) * 1e3 if in_swap else 0.0,
            "swap_max_ms": max(in_swap) * 1e3 if in_swap else 0.0,
            "requests": len(rows["rows"]), "failures": rows["failures"],
        }
        print(json.dumps({f"saturated K={k}": results["saturated"][k]}), file=sys.stderr, flush=True)
        procs.stop(p)


def wait_idle_cpu(limit: float = 0.3, timeout: float = 60.0) -> None:
    """Wait until the machine's load (busy share of all CPUs over 0.5 s) drops below ``limit``."""
    def busy() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        b0, t0 = busy()
        time.sleep(0.5)
        b1, t1 = busy()
        if (b1 - b0) / max(1, t1 - t0) < limit:
            return


def report(results: dict) -> None:
    """Print the tables (markdown) for what was measured."""
    rt = results.get("round_trip_ms", {})
    print("\n| round trip (small MLP, 1 client) | p50 ms | p99 ms |\n|---|---|---|")
    for name, v in rt.items():
        print(f"| {name} | {v['p50']:.3f} | {v['p99']:.3f} |")
    print("\n| concurrent clients | req/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|")
    for n, v in results.get("throughput_rps", {}).items():
        print(f"| {n} | {v['rps']:.0f} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['failures']} |")
    if "swap" in results:
        print(f"\n| swaps of a {results['archive_mb']:.0f} MB model, 4 clients | steady p50 / p99 ms "
              "| in-swap p99 / max ms | max / steady p50 | swap s | failed | worker RSS MB: idle -> peak "
              "| peak - idle vs archive |\n|---|---|---|---|---|---|---|---|")
        for k, v in results["swap"].items():
            growth = (v["worker_peak_mb"] - v["worker_baseline_mb"]) / results["archive_mb"]
            print(f"| K = {k} | {v['steady_p50_ms']:.2f} / {v['steady_p99_ms']:.2f} | "
                  f"{v['swap_p99_ms']:.2f} / {v['swap_max_ms']:.1f} | "
                  f"{v['swap_max_ms'] / v['steady_p50_ms']:.1f}x | {v['swap_s']:.2f} | {v['failures']} | "
                  f"{v['worker_baseline_mb']:.0f} -> {v['worker_peak_mb']:.0f} | {growth:.2f}x |")
    sat = results.get("saturated", {})
    if sat:
        print(f"\n| saturated swaps ({results.get('clients', 4)} clients > K workers, ~100 MB, every "
              f"layer run, {results.get('device', 'cpu')}) | verified -> "
              "all workers serving, s | steady p50 / p99 ms | in-swap p99 / max ms | max / steady p99 "
              "| failed |\n|---|---|---|---|---|---|")
        for k, v in sat.items():
            print(f"| K = {k} | {' / '.join(f'{x:.2f}' for x in v['verified_to_serving_s'])} | "
                  f"{v['steady_p50_ms']:.1f} / {v['steady_p99_ms']:.1f} | {v['swap_p99_ms']:.1f} / "
                  f"{v['swap_max_ms']:.1f} | {v['swap_max_ms'] / v['steady_p99_ms']:.1f}x | "
                  f"{v['failures']} of {v['requests']} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("--addr")
    ap.add_argument("--model")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--width", type=int, default=784)
    ap.add_argument("--swaps", type=int, default=3)
    ap.add_argument("--only-swap", action="store_true")
    ap.add_argument("--only-saturated", action="store_true")
    ap.add_argument("--device", default="cpu", help="the nodes' --device (cuda:0 on a GPU machine)")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop clients in the saturated part")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.role == "echo":
        return role_echo(args.addr)
    if args.role == "broker":
        return role_broker(args.addr, args.model)
    if args.role == "echo-worker":
        return role_echo_worker(args.addr)
    if args.role == "client":
        return role_client(args.addr, args.model, args.seconds, args.threads, args.out, args.width)

    import torch

    from zmqmodels import HubClient

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp(prefix="zmqm-bench-")
    procs = Procs()
    results: dict = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, Python "
                                f"{platform.python_version()}, torch {torch.__version__}"}
    print(f"# bench_serving on {results['machine']}", flush=True)
    try:
        hub_port = free_port()
        while True:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", hub_port + 1))
                break
            except OSError:
                hub_port = free_port()
        hub = f"tcp://127.0.0.1:{hub_port}"
        procs.start([sys.executable, "-m", "zmqmodels", "hub", "--bind", hub, "--store",
                     os.path.join(tmp, "store")])
        hc = HubClient(hub, timeout=60)

        def node(model: str, workers: int, tag: str) -> tuple[str, subprocess.Popen]:
            addr = f"tcp://127.0.0.1:{free_port()}"
            p = procs.start([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub, "--model",
                             model, "--bind", addr, "--workers", str(workers), "--cache",
                             os.path.join(tmp, f"cache-{tag}"), "--node-id", tag, "--device", args.device])
            return addr, p

        def publish_wait(release, count: int = 1) -> tuple[float, float]:
            t0 = time.monotonic()
            done = hc.publish(release, timeout=300, reuse_label=True)  # a and b in turn, on purpose
            ok, st = hc.wait_for(release.manifest.name, done.seq, count, 300, poll_s=0.01)
            if not ok:
                raise SystemExit(f"rollout failed: {st}")
            return t0, time.monotonic()

        if not (args.only_swap or args.only_saturated):
            bench_round_trip(args, procs, node, publish_wait, tmp, results)
        if args.only_saturated:
            bench_saturated(args, procs, node, hc, tmp, results)
            report(results)
            return

        # 3 + 4. swaps of a ~100 MB model, K = 1 and K = 2 -----------------------------------
        heavy = {label: build("heavy", Heavy.make(seed), label, 1024)
                 for seed, label in ((1, "a"), (2, "b"))}
        archive_mb = heavy["a"].manifest.archive_bytes / 2**20
        results["archive_mb"] = archive_mb
        results["swap"] = {}
        for k in (1, 2):
            tag = f"heavy{k}"
            addr, p = node("heavy", k, tag)
            time.sleep(3)  # workers up, nothing loaded yet
            baseline_kib = max((status_kib(c, "VmRSS") for c in children(p.pid)), default=0)
            publish_wait(heavy["b"])
            publish_wait(heavy["a"])  # both stored: the measured swaps are rollbacks
            windows: list[tuple[float, float]] = []
            rows: dict = {}

            def swapper(windows: list[tuple[float, float]] = windows) -> None:
                time.sleep(6.0)  # client processes import torch first: let steady state show
                for i in range(args.swaps):
                    # rollback = the hub re-broadcasts stored content under a new seq: the
                    # node does all of a swap's work, the hub (elsewhere in a real fleet)
                    # spends no CPU receiving and verifying 100 MB on these 2 cores
                    t0 = time.monotonic()
                    done = hc.rollback("heavy", "b" if i % 2 == 0 else "a", timeout=300)
                    ok, st = hc.wait_for("heavy", done.seq, 1, 300, poll_s=0.01)
                    if not ok:
                        raise SystemExit(f"rollout failed: {st}")
                    windows.append((t0, time.monotonic()))
                    time.sleep(1.0)

            t = threading.Thread(target=swapper)
            t.start()
            rows = run_clients(addr, "heavy", 4, 6.0 + args.swaps * 5.0, 1024, tmp)
            t.join()
            worst = sorted(rows["rows"], key=lambda r: -r[1])[:5]
            print(json.dumps({"slowest (t-rel, s, label, queue_ms, infer_ms, worker)":
                              [(round(r[0] - windows[0][0], 3), round(r[1], 4), *r[2:]) for r in worst],
                              "windows": [(round(a - windows[0][0], 3), round(b - windows[0][0], 3))
                                          for a, b in windows]}), file=sys.stderr, flush=True)
            in_swap = [d for t0, d, *_ in rows["rows"]
                       if any(a <= t0 + d and t0 <= b for a, b in windows)]
            steady = [d for t0, d, *_ in rows["rows"]
                      if not any(a - 0.5 <= t0 + d and t0 <= b + 0.5 for a, b in windows)]
            hwm = max((status_kib(c, "VmHWM") for c in children(p.pid)), default=0)
            results["swap"][k] = {
                "steady_p50_ms": pct(steady, 0.5) * 1e3, "steady_p99_ms": pct(steady, 0.99) * 1e3,
                "swap_p99_ms": pct(in_swap, 0.99) * 1e3 if in_swap else 0.0,
                "swap_max_ms": max(in_swap) * 1e3 if in_swap else 0.0,
                "requests_in_swaps": len(in_swap), "failures": rows["failures"],
                "swap_s": statistics.mean(b - a for a, b in windows),
                "worker_baseline_mb": baseline_kib / 1024, "worker_peak_mb": hwm / 1024,
            }
            print(json.dumps({k: results["swap"][k]}), file=sys.stderr, flush=True)
            procs.stop(p)
        bench_saturated(args, procs, node, hc, tmp, results)
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)

    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
