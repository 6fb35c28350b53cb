#!/usr/bin/env python3
"""Updates benchmark: what each kind of model update costs, against a full release of the same
model measured in the same run (issue 18).

A ~100 MB MLP (6 x 2048^2 layers and a 2048 -> 16 head) is trained for a few steps here, then
updated four ways:

  (a) head only   the head fine-tuned for 3 steps (the body frozen)      -> publish_weights
  (b) full step   one Adam step on every weight, lr 1e-5                 -> publish_weights
  (c) random      every weight re-initialised                            -> publish_weights
  (d) new code    another architecture (GELU for ReLU), compiled         -> build + publish
  full release    the (b) weights compiled and published as a new build  -> build + publish

Two nodes follow one hub (in this process; their workers are processes): one with K=1 worker,
one with K=2. One closed-loop client per node runs throughout. For each update the table gives
the bytes that reached a node (broadcast and fetched), the publisher's CPU seconds, the
node's verified -> serving (roll stage), how it swapped (load / apply), the max request
latency during the swap (K=1, K=2) against the steady p99, and the nodes' PSS (front and
workers).

Usage: scripts/bench_updates.py [--size-mb 100] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    except OSError:
        return 0


def node_pss(node) -> int:  # noqa: ANN001
    return sum(pss(p.pid) for p in node._procs.procs.values() if p is not None)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else float("nan")


class Load:
    """One closed-loop client on a node: (time, latency, seq) of every reply."""

    def __init__(self, address: str, x) -> None:  # noqa: ANN001
        self.address, self.x = address, x
        self.log: list[tuple[float, float, int]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        from zmqmodels import Client

        with Client(self.address, timeout=30, retries=0) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.infer("m", self.x)
                except Exception:  # noqa: BLE001 (counted)
                    self.failed += 1
                    continue
                t1 = time.perf_counter()
                self.log.append((t1, t1 - t0, r.seq))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="rollouts under load per peer")
    ap.add_argument("--no-torchserve", action="store_true", help="skip the rollout-under-load table")
    args = ap.parse_args()
    import torch

    from zmqmodels import Hub, HubClient, Node, build_release, compile_model
    from zmqmodels.store import Store

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(args.size_mb * 2**20 / (width * width * 4)))

    class MLP(torch.nn.Module):
        def __init__(self, act: str = "relu") -> None:
            super().__init__()
            self.body = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(layers)])
            self.head = torch.nn.Linear(width, 16)
            self.act = torch.nn.GELU() if act == "gelu" else torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.body:
                x = self.act(layer(x))
            return self.head(x)

    def train(model, steps: int, lr: float, params=None) -> None:  # noqa: ANN001
        opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
        for _ in range(steps):
            x, y = torch.randn(32, width), torch.randint(0, 16, (32,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    model = MLP()
    train(model, 3, 1e-3)
    examples = [(torch.randn(2, width),)]
    x = torch.randn(1, width)
    tmp = tempfile.mkdtemp(prefix="zmqm-bu-")
    rows = []
    with Hub("tcp://127.0.0.1:0", Store(os.path.join(tmp, "hub")), heartbeat_interval_s=0.25) as hub:
        nodes = [Node(hub.address, ["m"], "tcp://127.0.0.1:0", workers=k, cache=os.path.join(tmp, f"n{k}"),
                      node_id=f"k{k}").start() for k in (1, 2)]
        client = HubClient(hub.address, timeout=300)
        try:
            first = client.publish(build_release(compile_model(model, examples), "m", "v1"), timeout=300)
            assert hub.wait_for("m", first.seq, 2, 300)[0]
            settle()
            loads = [Load(n.address, x) for n in nodes]
            time.sleep(3)
            steady = [pct([lat for _, lat, _ in ld.log], 0.99) for ld in loads]

            def measure(kind: str, publish) -> None:  # noqa: ANN001
                before = [n.follower_stats().get("bytes_received", 0) for n in nodes]
                p0 = time.process_time()
                t0 = time.perf_counter()
                done = publish()
                cpu = time.process_time() - p0
                ok, st = hub.wait_for("m", done.seq, 2, 300)
                assert ok, st
                t_served = time.perf_counter()
                time.sleep(1.0)
                rows_of = {r.node: r for r in hub.status().nodes if r.model == "m"}
                moved = [n.follower_stats()["bytes_received"] - b for n, b in zip(nodes, before, strict=True)]
                worst = []
                for ld in loads:
                    window = [lat for t, lat, _ in ld.log if t0 <= t <= t_served + 0.5]
                    worst.append(max(window) if window else float("nan"))
                r1 = rows_of["k1"]
                how = "apply" if "apply" in r1.stages else "load"
                rows.append((kind, max(moved), cpu, r1.stages.get("roll", float("nan")),
                             rows_of["k2"].stages.get("roll", float("nan")), how, worst[0], worst[1],
                             node_pss(nodes[0]), node_pss(nodes[1]), t_served - t0))
                time.sleep(2)  # the clients keep the CPUs busy: no idle to wait for

            full_size = [0]

            def full_release(m, label: str):  # noqa: ANN001, ANN202
                def go():  # noqa: ANN202
                    r = build_release(compile_model(m, examples), "m", label)
                    full_size[0] = r.manifest.compressed_bytes
                    return client.publish(r, timeout=300)
                return go

            # (a) head only
            for p in model.body.parameters():
                p.requires_grad_(False)
            train(model, 3, 1e-3, model.head.parameters())
            for p in model.body.parameters():
                p.requires_grad_(True)
            measure("(a) head only, publish_weights", lambda: client.publish_weights("m", model))
            # (b) one Adam step, lr 1e-5, on everything
            train(model, 1, 1e-5)
            measure("(b) full step, publish_weights", lambda: client.publish_weights("m", model))
            measure("full release of (b)'s weights", full_release(model, "full"))
            # (c) new random weights
            fresh = MLP().eval()
            model.load_state_dict(fresh.state_dict())
            measure("(c) random, publish_weights", lambda: client.publish_weights("m", model))
            # (d) new code
            other = MLP("gelu").eval()
            other.load_state_dict(model.state_dict())
            measure("(d) new code, build + publish", full_release(other, "gelu"))
            failed = sum(ld.failed for ld in loads)
            for ld in loads:
                ld.stop()
        finally:
            for n in nodes:
                n.close()
    mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"model {layers} x {width}^2 + head ({mib:.0f} MiB "
          f"fp32), full release {full_size[0] / 2**20:.1f} MiB compressed; steady p99 "
          f"{steady[0] * 1e3:.1f} ms (K=1), {steady[1] * 1e3:.1f} ms (K=2); failed requests {failed}\n")
    if not args.no_torchserve:
        settle()
        print("\n".join(rollout_vs_torchserve(lambda: MLP().eval(), x, args.rounds)))
        print()
    print("| update | bytes to a node | vs full | publish CPU s | publish -> all serving s | "
          "verified -> serving K=1 / K=2 s | swap | max latency K=1 / K=2 ms (x steady p99) | "
          "PSS K=1 / K=2 MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, moved, cpu, roll1, roll2, how, w1, w2, m1, m2, total in rows:
        print(f"| {kind} | {moved / 2**20:.2f} MiB | {moved / max(full_size[0], 1):.1%} | {cpu:.2f} | "
              f"{total:.2f} | {roll1:.2f} / {roll2:.2f} | {how} | {w1 * 1e3:.0f} ({w1 / steady[0]:.1f}x) / "
              f"{w2 * 1e3:.0f} ({w2 / steady[1]:.1f}x) | {m1 / 2**20:.0f} / {m2 / 2**20:.0f} |")


def rollout_vs_torchserve(make, x, rounds: int) -> list[str]:  # noqa: ANN001
    """4 closed-loop clients on one worker (one torch thread): from the start of the publish
    (register) call to the last reply by the old version; zmqmodels (a built release, and
    publish_weights) and TorchServe (register v2 + set-default), each ``rounds`` times."""
    import torch

    from scripts.peer_torchserve import HttpClient, TorchServe
    from zmqmodels import Client, Hub, HubClient, Node, build_release, compile_model
    from zmqmodels.store import Store

    v1, v2 = make(), make()
    examples = [(torch.randn(2, x.shape[1]),)]
    body = x.numpy().astype("float32").tobytes()
    out: dict[str, list[float]] = {"TorchServe register + set-default": [],
                                   "zmqmodels publish (built release)": [],
                                   "zmqmodels publish_weights": []}
    failed = {k: 0 for k in out}

    def drive(infer, start, new_version) -> tuple[float, int]:  # noqa: ANN001
        """Run 4 clients; ``start()`` the swap after 2 s; the seconds to the last old reply."""
        log: list[tuple[float, object]] = []
        stop = threading.Event()
        fails = [0]

        def loop() -> None:
            call = infer()
            while not stop.is_set():
                try:
                    v = call()
                except Exception:  # noqa: BLE001 (counted)
                    fails[0] += 1
                    continue
                log.append((time.perf_counter(), v))

        threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        t0 = time.perf_counter()
        new = start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(v == new_version(new) and t > t0 for t, v in log[-50:]):
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        old = [t for t, v in log if v != new_version(new)]
        return max(max(old) - t0, 0.0), fails[0]

    tmp = tempfile.mkdtemp(prefix="zmqm-rv-")
    paths = []
    for i, m in enumerate((v1, v2)):
        paths.append(os.path.join(tmp, f"v{i + 1}.pt"))
        torch.jit.save(compile_model(m, examples).module, paths[-1])
    try:
        with TorchServe() as ts:
            mars = [ts.archive(p, f"{i + 1}.0") for i, p in enumerate(paths)]
            for _ in range(rounds):
                ts.register(mars[0])
                ts.set_default("1.0")
                settle()

                def swap():  # noqa: ANN202
                    ts.register(mars[1])
                    ts.set_default("2.0")
                    return "2.0"

                def ts_infer():  # noqa: ANN202
                    c = HttpClient(ts.port)
                    return lambda: c.infer(body)

                dur, f = drive(ts_infer, swap, lambda new: new)
                out["TorchServe register + set-default"].append(dur)
                failed["TorchServe register + set-default"] += f
                ts._manage("PUT", "/models/m/1.0/set-default")
                ts._manage("DELETE", "/models/m/2.0")
                ts._manage("DELETE", "/models/m/1.0")
    except RuntimeError as exc:
        print(f"TorchServe not measured: {exc}")
    with Hub("tcp://127.0.0.1:0", Store(os.path.join(tmp, "hub")), heartbeat_interval_s=0.25) as hub:
        node = Node(hub.address, ["m"], "tcp://127.0.0.1:0", workers=1, cache=os.path.join(tmp, "n"),
                    node_id="n").start()
        client = HubClient(hub.address, timeout=300)
        try:
            for _ in range(rounds):
                for kind in ("zmqmodels publish (built release)", "zmqmodels publish_weights"):
                    base = client.publish(build_release(compile_model(v1, examples), "m", "v1"), timeout=300)
                    assert hub.wait_for("m", base.seq, 1, 300)[0]
                    built = build_release(compile_model(v2, examples), "m", "v2")
                    settle()

                    def swap(kind=kind, built=built):  # noqa: ANN001, ANN202
                        if kind.endswith("publish_weights"):
                            return client.publish_weights("m", v2).seq
                        return client.publish(built, timeout=300).seq

                    def infer():  # noqa: ANN202
                        c = Client(node.address, timeout=60, retries=0)
                        return lambda: c.infer("m", x).seq

                    dur, f = drive(infer, swap, lambda new: new)
                    out[kind].append(dur)
                    failed[kind] += f
        finally:
            node.close()
    lines = ["| 4 clients, 1 worker, 100 MB | publish call -> last old-version reply, s (median of "
             f"{rounds}) | vs TorchServe | failed requests |", "|---|---|---|---|"]
    ts_runs = sorted(out["TorchServe register + set-default"])
    ts_med = ts_runs[len(ts_runs) // 2] if ts_runs else None
    for kind, xs in out.items():
        if not xs:
            continue
        med = sorted(xs)[len(xs) // 2]
        ratio = f"{med / ts_med:.2f}x" if ts_med else "n/a"
        runs = ", ".join(f"{v:.2f}" for v in xs)
        lines.append(f"| {kind} | {med:.2f} ({runs}) | {ratio} | {failed[kind]} |")
    return lines


def settle(limit: float = 0.3, timeout: float = 60.0) -> None:
    """Wait until the machine's CPUs are mostly idle (a busy CPU times the wrong thing)."""
    def busy() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = busy()
        time.sleep(1.0)
        b = busy()
        if (b[0] - a[0]) / max(1, b[1] - a[1]) < limit:
            return


if __name__ == "__main__":
    main()
