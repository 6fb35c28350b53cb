#!/usr/bin/env python3
"""Updates benchmark: what each kind of model update costs, against a full release of the same
model measured in the same run (issue 18).

A ~100 MB MLP (6 x 2048^2 layers and a 2048 -> 16 head) is trained for a few steps here, then
updated four ways:

  (a) head only   the head fine-tuned for 3 steps (the body frozen)      -> publish_weights
  (b) full step   one Adam step on every weight, lr 1e-5                 -> publish_weights
  (c) random      every weight re-initialised                            -> publish_weights
  (d) new code    another architecture (GELU for ReLU), compiled         -> build + publish
  full release    new random weights compiled and published (every byte new), under the same
                  load; the first release (idle fleet) gives the "vs full" bytes

The hub and two nodes run as their own processes (`zmqmodels hub`, `zmqmodels serve`): one node
with K=1 worker, one with K=2; one closed-loop client process per node runs throughout; this
process is the publisher (a training process). Per update: the bytes that reached a node
(its metrics' zmqmodels_bytes_received), the publisher's CPU seconds, publish call -> both
nodes serving, the node's verified -> serving (its `roll` stage), how it swapped (load /
apply), the max request latency during the swap (K=1, K=2) against the steady p99, and each
node's PSS (front and workers).

Then the rollout under load against TorchServe 0.12 (scripts/peer_torchserve.py), each peer
with one worker and 4 closed-loop client processes: from the start of the publish (register)
call to the last reply by the old version; publish_weights cold (the newest release came from
elsewhere: the publisher fetches and loads it first) and warm (this process published it).

Usage: scripts/bench_updates.py [--size-mb 100] [--rounds 3] [--no-torchserve]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
ZM = [sys.executable, "-m", "zmqmodels"]

from scripts.bench_serving import wait_idle_cpu as settle  # noqa: E402  (the same idle rule)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pss_tree(pid: int) -> int:
    """PSS of ``pid`` and its children (a node's front and workers), bytes."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(c) for c in f.read().split()]
    for p in pids:
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    return total


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else float("nan")


# -- a client process --------------------------------------------------------------------------
def run_client(target: str, out: str, width: int) -> None:
    """Closed loop until SIGTERM; every reply as ``wall_time latency version`` in ``out``."""
    import numpy as np

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    rows = []
    if target.startswith("http:"):
        from scripts.peer_torchserve import HttpClient

        c = HttpClient(int(target.split(":")[1]))
        body = x.tobytes()
        call = lambda: c.infer(body)  # noqa: E731
    else:
        from zmqmodels import Client

        zc = Client(target, timeout=60, retries=0)
        call = lambda: zc.infer("m", x).seq  # noqa: E731
    fails = 0
    while not stop:
        t0 = time.perf_counter()
        try:
            v = call()
        except Exception:  # noqa: BLE001 (counted)
            fails += 1
            continue
        rows.append(f"{time.time():.6f} {time.perf_counter() - t0:.6f} {v}\n")
    with open(out, "w") as f:
        f.write(f"# failed {fails}\n")
        f.writelines(rows)


class Clients:
    """Client processes against ``target``; :meth:`stop` returns their replies and failures."""

    def __init__(self, target: str, n: int, width: int, tmp: str) -> None:
        self.files = [os.path.join(tmp, f"client-{time.monotonic_ns()}-{i}.txt") for i in range(n)]
        self.procs = [subprocess.Popen([sys.executable, __file__, "--client", target, "--out", f,
                                        "--width", str(width)], env=ENV) for f in self.files]

    def stop(self) -> tuple[list[list[tuple[float, float, str]]], int]:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            p.wait(60)
        logs, failed = [], 0
        for f in self.files:
            with open(f) as fh:
                failed += int(fh.readline().split()[2])
                logs.append([(float(a), float(b), c) for a, b, c in (line.split() for line in fh)])
        return logs, failed


# -- the fleet ---------------------------------------------------------------------------------
class Fleet:
    """A hub and nodes (``workers`` each), all processes."""

    def __init__(self, tmp: str, workers: tuple[int, ...]) -> None:
        self.hub = f"tcp://127.0.0.1:{free_port()}"
        self.procs = [subprocess.Popen([*ZM, "hub", "--bind", self.hub, "--store", os.path.join(tmp, "hub"),
                                        "--heartbeat", "0.25"], env=ENV, stderr=subprocess.DEVNULL)]
        self.nodes = []
        for k in workers:
            addr, mport = f"tcp://127.0.0.1:{free_port()}", free_port()
            p = subprocess.Popen([*ZM, "serve", "--hub", self.hub, "--model", "m", "--bind", addr,
                                  "--workers", str(k), "--cache", os.path.join(tmp, f"k{k}"),
                                  "--node-id", f"k{k}", "--metrics", str(mport)],
                                 env=ENV, stderr=subprocess.DEVNULL)
            self.procs.append(p)
            self.nodes.append((f"k{k}", addr, mport, p))

    def received(self, mport: int) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("zmqmodels_bytes_received_total"))

    def close(self) -> None:
        for p in self.procs[::-1]:
            p.send_signal(signal.SIGTERM)
        for p in self.procs[::-1]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="rollouts under load per peer")
    ap.add_argument("--no-torchserve", action="store_true", help="skip the rollout against TorchServe")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write each update's numbers here (for bench_against.py)")
    ap.add_argument("--rollout-only", action="store_true", help="only the rollout against TorchServe")
    args = ap.parse_args()
    if args.client:
        run_client(args.client, args.out, args.width)
        return
    import torch

    from zmqmodels import HubClient, build_release, compile_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    width = args.width
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
        model.train()
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
    tmp = tempfile.mkdtemp(prefix="zmqm-bu-")
    if args.rollout_only:
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; model "
              f"{layers} x {width}^2 + head\n")
        print("\n".join(rollout_vs_torchserve(MLP, width, examples, args.rounds, tmp, args.no_torchserve,
                                               args.json)))
        return
    rows = []
    fleet = Fleet(tmp, (1, 2))
    client = HubClient(fleet.hub, timeout=300)
    full_bytes = 0
    try:
        deadline = time.monotonic() + 300
        while len({r.node for r in client.status().nodes}) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # both nodes up (their workers importing torch) before timing
        settle()

        def measure(kind: str, publish) -> None:  # noqa: ANN001
            before = [fleet.received(mport) for _, _, mport, _ in fleet.nodes]
            kids = os.times()  # a CLI publisher's CPU is its own process's
            p0, t0 = time.process_time() + kids.children_user + kids.children_system, time.time()
            done = publish()
            kids = os.times()
            cpu, call = time.process_time() + kids.children_user + kids.children_system - p0, time.time() - t0
            ok, st = client.wait_for("m", done.seq, 2, 300, poll_s=0.02)
            assert ok, st
            t_served = time.time()
            time.sleep(1.0)
            by_node = {r.node: r for r in client.status().nodes if r.model == "m"}
            ports = [mport for _, _, mport, _ in fleet.nodes]
            moved = [fleet.received(mport) - b for mport, b in zip(ports, before, strict=True)]
            r1 = by_node["k1"]
            rows.append((kind, max(moved), cpu, call, t_served - t0,
                         r1.stages.get("roll", float("nan")), by_node["k2"].stages.get("roll", float("nan")),
                         "apply" if "apply" in r1.stages else "load",
                         t0, t_served, [pss_tree(p.pid) for *_, p in fleet.nodes]))
            time.sleep(2)

        def first():  # noqa: ANN202
            nonlocal full_bytes
            full = build_release(compile_model(model, examples), "m", "v1")
            full_bytes = full.manifest.compressed_bytes
            return client.publish(full, timeout=300)

        measure("first release, idle fleet (compile + build + publish)", first)
        settle()
        loads = [Clients(addr, 1, width, tmp) for _, addr, _, _ in fleet.nodes]
        time.sleep(5)
        # (a) head only, through each publish path a user takes after training
        def head_step() -> None:
            for p in model.body.parameters():
                p.requires_grad_(False)
            train(model, 3, 1e-3, model.head.parameters())
            for p in model.body.parameters():
                p.requires_grad_(True)

        def cli(*args: str):  # noqa: ANN202
            out = subprocess.run([*ZM, "publish", *args, "--hub", fleet.hub, "--json"], env=ENV,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            return argparse.Namespace(seq=json.loads(out.stdout)["seq"])

        head_step()
        measure("(a) head only: publish_weights", lambda: client.publish_weights("m", model))
        head_step()
        saved = os.path.join(tmp, "head.pt")
        torch.jit.save(compile_model(model, examples).module, saved)  # the training job's own save
        measure("(a) head only: CLI `publish FILE` (a saved file)",
                lambda: cli(saved, "--name", "m", "--example-input", f"2x{width}"))
        head_step()
        measure("(a) head only: a module (build_release + publish)",
                lambda: client.publish(build_release(compile_model(model, examples), "m"), timeout=300))
        head_step()
        ckpt = os.path.join(tmp, "head-ckpt.pt")
        torch.save({"model": model.state_dict(), "step": 3}, ckpt)
        measure("(a) head only: CLI `--weights CKPT --like m`", lambda: cli("--weights", ckpt, "--like", "m"))
        # (b) one Adam step, lr 1e-5, on everything
        train(model, 1, 1e-5)
        measure("(b) full step: publish_weights", lambda: client.publish_weights("m", model))
        # a full release under the same load: new random weights, compiled (every byte new)
        model.load_state_dict(MLP().state_dict())
        measure("full release: compile + build + publish",
                lambda: client.publish(build_release(compile_model(model, examples), "m", "full"),
                                       timeout=300))
        # (c) new random weights
        model.load_state_dict(MLP().state_dict())
        measure("(c) random: publish_weights", lambda: client.publish_weights("m", model))
        # (d) new code
        other = MLP("gelu").eval()
        other.load_state_dict(model.state_dict())
        measure("(d) new code: build + publish",
                lambda: client.publish(build_release(compile_model(other, examples), "m", "gelu"),
                                       timeout=300))
        logs = [ld.stop() for ld in loads]
    finally:
        fleet.close()
    steady = []
    for replies, _ in logs:
        quiet = [lat for t, lat, _ in replies[0] if all(not (r[8] - 1 <= t <= r[9] + 1) for r in rows)]
        steady.append(pct(quiet, 0.99))
    mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    failed = sum(f for _, f in logs)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; model "
          f"{layers} x {width}^2 + head ({mib:.0f} MiB fp32); a full release is {full_bytes / 2**20:.1f} MiB "
          f"compressed; steady p99 {steady[0] * 1e3:.1f} ms (K=1), {steady[1] * 1e3:.1f} ms (K=2); "
          f"failed requests {failed}\n")
    print("| update | bytes to a node | vs full release | publish CPU s | publish call s | "
          "publish -> both serving s | verified -> serving K=1 / K=2 s | swap | max latency K=1 / K=2 ms "
          "(x steady p99) | PSS K=1 / K=2 MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    numbers = {"steady_p99_ms": [round(p * 1e3, 2) for p in steady], "failed": failed}
    for kind, moved, cpu, call, total, roll1, roll2, how, t0, t1, mem in rows:
        worst = [max([lat for t, lat, _ in replies[0] if t0 <= t <= t1 + 0.5] or [float("nan")])
                 for replies, _ in logs]
        numbers[kind.split(":")[0]] = {"moved_share": moved / full_bytes, "publish_to_serving_s": total,
                                       "worst_x_p99_k1": worst[0] / steady[0],
                                       "worst_x_p99_k2": worst[1] / steady[1]}
        print(f"| {kind} | {moved / 2**20:.2f} MiB | {moved / full_bytes:.1%} | {cpu:.2f} | {call:.2f} | "
              f"{total:.2f} | "
              f"{roll1:.2f} / {roll2:.2f} | {how} | {worst[0] * 1e3:.0f} ({worst[0] / steady[0]:.1f}x) / "
              f"{worst[1] * 1e3:.0f} ({worst[1] / steady[1]:.1f}x) | "
              f"{mem[0] / 2**20:.0f} / {mem[1] / 2**20:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(numbers, f)
    if not args.no_torchserve:
        settle()
        print()
        print("\n".join(rollout_vs_torchserve(MLP, width, examples, args.rounds, tmp)))


def rollout_vs_torchserve(MLP, width: int, examples, rounds: int, tmp: str,  # noqa: ANN001, N803
                          no_torchserve: bool = False, json_path: str | None = None) -> list[str]:
    """4 closed-loop client processes on one worker (one torch thread): publish (register) call
    -> the last reply by the old version; zmqmodels (the CLI on a saved TorchScript file and on
    a release `build` stored, a built release through the API, publish_weights) and TorchServe
    (register v2 + set-default), each ``rounds`` times, alternating. v2 is v1 fine-tuned (one
    Adam step on every weight): what a user publishes after training."""
    import torch

    from scripts.peer_torchserve import TorchServe
    from zmqmodels import HubClient, build_release, compile_model
    from zmqmodels.release.store import write_release_file

    v1 = MLP().eval()
    v2 = MLP().eval()
    v2.load_state_dict(v1.state_dict())
    opt = torch.optim.Adam(v2.parameters(), lr=1e-5)
    v2.train()
    torch.nn.functional.cross_entropy(v2(torch.randn(32, width)), torch.randint(0, 16, (32,))).backward()
    opt.step()
    v2.eval()
    cli_file = "zmqmodels: CLI `publish v2.pt` (a saved file)"
    cli_built = "zmqmodels: CLI `publish` of a built release"
    out: dict[str, list[float]] = {"TorchServe 0.12: register v2 + set-default": [],
                                   cli_file: [], cli_built: [],
                                   "zmqmodels: publish a built release": [],
                                   "zmqmodels: publish_weights (cold)": [],
                                   "zmqmodels: publish_weights (warm)": []}
    failed = dict.fromkeys(out, 0)

    def drive(target: str, swap, is_new) -> tuple[float, int]:  # noqa: ANN001
        clients = Clients(target, 4, width, tmp)
        time.sleep(4)
        t0 = time.time()
        new = swap()
        time.sleep(3)
        logs, fails = clients.stop()
        old = [t for replies in logs for t, _, v in replies if not is_new(v, new) and t >= t0]
        return (max(old) - t0 if old else 0.0), fails

    paths = []
    for i, m in enumerate((v1, v2)):
        paths.append(os.path.join(tmp, f"v{i + 1}.pt"))
        torch.jit.save(compile_model(m, examples).module, paths[-1])
    built_path = os.path.join(tmp, "v2.zmqm")
    write_release_file(Path(built_path), build_release(compile_model(v2, examples), "m", "v2"))
    try:
        if no_torchserve:
            raise RuntimeError("--no-torchserve")
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

                dur, f = drive(f"http:{ts.port}", swap, lambda v, new: v == new)
                out["TorchServe 0.12: register v2 + set-default"].append(dur)
                failed["TorchServe 0.12: register v2 + set-default"] += f
                ts.set_default("1.0")
                ts.unregister("2.0")
                ts.unregister("1.0")
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"TorchServe not measured: {exc}")
    fleet = Fleet(os.path.join(tmp, "rv"), (1,))
    client = HubClient(fleet.hub, timeout=300)
    # the same releases again each round: labels reused on purpose (a baseline tree without the
    # rule takes no such option)
    import inspect

    again = {"reuse_label": True} if "reuse_label" in inspect.signature(client.publish).parameters else {}
    again_flag = ["--reuse-label"] if again else []
    try:
        for _ in range(rounds):
            for kind in out:
                if kind.startswith("TorchServe"):
                    continue
                if kind.endswith("(warm)"):  # a training loop: this process published the base
                    base = client.publish_weights("m", v1)
                else:  # a release from elsewhere: the first publish_weights fetches and loads it
                    base = client.publish(build_release(compile_model(v1, examples), "m", "v1"), timeout=300,
                                          **again)
                assert client.wait_for("m", base.seq, 1, 300)[0]
                built = build_release(compile_model(v2, examples), "m", "v2")
                settle()

                def swap(kind=kind, built=built):  # noqa: ANN001, ANN202
                    if kind in (cli_file, cli_built):
                        src = [paths[1], "--example-input", f"2x{width}"] if kind == cli_file \
                            else [built_path]
                        done = subprocess.run([*ZM, "publish", *src, "--name", "m", "--hub", fleet.hub,
                                               "--json", *again_flag], env=ENV, capture_output=True,
                                              text=True, timeout=300)
                        print(f"  {kind}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                        assert done.returncode == 0, done.stderr
                        return json.loads(done.stdout)["seq"]
                    if "publish_weights" in kind:
                        return client.publish_weights("m", v2).seq
                    return client.publish(built, timeout=300, **again).seq

                dur, f = drive(fleet.nodes[0][1], swap, lambda v, new: int(v) >= new)
                out[kind].append(dur)
                failed[kind] += f
    finally:
        fleet.close()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({k: sorted(v)[len(v) // 2] for k, v in out.items() if v}, f)
    ts_runs = sorted(out["TorchServe 0.12: register v2 + set-default"])
    ts_med = ts_runs[len(ts_runs) // 2] if ts_runs else None
    lines = ["| 4 clients, 1 worker, same model | publish call -> last old-version reply, s: median "
             f"(each of {rounds}) | vs TorchServe | failed requests |", "|---|---|---|---|"]
    for kind, xs in out.items():
        if xs:
            med = sorted(xs)[len(xs) // 2]
            ratio = f"{med / ts_med:.2f}x" if ts_med else "n/a"
            each = ", ".join(f"{v:.2f}" for v in xs)
            lines.append(f"| {kind} | {med:.2f} ({each}) | {ratio} | {failed[kind]} |")
    return lines


if __name__ == "__main__":
    main()
