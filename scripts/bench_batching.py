#!/usr/bin/env python3
"""Dynamic batching benchmark (one run, one machine; every baseline measured alongside).

Offered concurrency 1, 4, 16 and 64 requests in flight, closed loop, one row per request.
zmqmodels servers are driven by the native load generator (``cpp/build/zmqmodels-load``: one
process, one thread, 4 DEALER sockets; it outruns every server here), and once more at the
highest concurrency by the Python ``AsyncClient`` from 4 processes (the user's view: a Python
client's own limit shows there); TorchServe by keep-alive HTTP connections from at most 4
processes, one per request in flight. Models: the small MLP (784-256-10) and a ~100 MB one (25
layers of 1024x1024, all used). Servers, one torch thread per worker: the Python node K=1 and
K=2 and the C++ node (one serving thread), each with batching on (``--max-batch``) and off
(``--max-batch 1``); a minimal batching server (one Python process, one ROUTER, joins
everything queued up to 32 rows, one forward: the simplest server that could exist, the
product's architecture measured against it); TorchServe 0.12 with its own batching
(``batch_size``, ``max_batch_delay``). Reports req/s, p50, p99 and the mean rows per forward
that answered a request.

    scripts/bench_batching.py [--seconds 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_serving import ENV, Heavy, Procs, free_port, mlp, pct, wait_idle_cpu  # noqa: E402

BINARY = os.path.join(ROOT, "cpp", "build", "zmqmodels-node")
LOAD = os.environ.get("ZMQMODELS_LOAD", os.path.join(ROOT, "cpp", "build", "zmqmodels-load"))
WIDTH = {"mlp": 784, "heavy": 1024}
TS_BATCH, TS_DELAY_MS = 32, 5  # TorchServe's batching: up to 32 requests, waiting up to 5 ms


# -- client roles (separate processes) ---------------------------------------------------------
def role_zclient(addr: str, model: str, seconds: float, inflight: int, width: int, out: str) -> None:
    import torch

    from zmqmodels import AsyncClient

    torch.set_num_threads(1)
    rows: list[tuple[float, float, int]] = []
    failures = [0]

    async def loop(c: AsyncClient, end: float, k: int) -> None:
        x = torch.randn(1, width, generator=torch.Generator().manual_seed(k))
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = await c.infer(model, x, timeout=30)
            except Exception:  # noqa: BLE001 - counted
                failures[0] += 1
                continue
            rows.append((t0, time.monotonic() - t0, r.batch))

    async def main() -> None:
        async with AsyncClient(addr, timeout=30, retries=0) as c:
            await c.infer(model, torch.randn(1, width))
            end = time.monotonic() + seconds
            await asyncio.gather(*(loop(c, end, k) for k in range(inflight)))

    asyncio.run(main())
    with open(out, "w") as f:
        json.dump({"rows": rows, "failures": failures[0]}, f)


def role_tsclient(port: int, seconds: float, inflight: int, width: int, out: str) -> None:
    import numpy as np
    from peer_torchserve import HttpClient

    body = np.random.default_rng(0).standard_normal(width).astype("<f4").tobytes()
    rows: list[tuple[float, float, int]] = []
    failures = [0]
    lock = threading.Lock()

    def loop() -> None:
        c = HttpClient(port)
        c.call(body)
        mine = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                n = c.call(body).get("n", 1)
            except Exception:  # noqa: BLE001 - counted
                failures[0] += 1
                continue
            mine.append((t0, time.monotonic() - t0, n))
        with lock:
            rows.extend(mine)

    ts = [threading.Thread(target=loop) for _ in range(inflight)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out, "w") as f:
        json.dump({"rows": rows, "failures": failures[0]}, f)


def role_minimal(addr: str, path: str) -> None:
    """The minimal batching server: one ROUTER; take everything queued (up to 32 rows), one
    forward, one reply each. Speaks the node's protocol, checks nothing."""
    import msgspec
    import torch
    import zmq

    torch.set_num_threads(1)
    model = torch.jit.load(path).eval()
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(addr)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    with torch.inference_mode():
        while True:
            batch = [sock.recv_multipart()]
            while len(batch) < 32:
                try:
                    batch.append(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            heads = [dec.decode(m[3]) for m in batch]
            x = torch.frombuffer(bytearray().join(m[4] for m in batch), dtype=torch.float32)
            y = model(x.reshape(len(batch), -1)).contiguous()
            spec = {"t": "tensor", "dtype": "float32", "shape": [1, y.shape[1]], "f": 0}
            raw = y.numpy().tobytes()
            step = len(raw) // len(batch)
            for i, (m, h) in enumerate(zip(batch, heads, strict=True)):
                head = {"v": 1, "id": h["id"], "model": h["model"], "label": "", "seq": 1, "worker": "min",
                        "outputs": spec, "batch": len(batch)}
                sock.send_multipart([m[0], b"", b"OK", enc.encode(head), raw[i * step:(i + 1) * step]])


# -- the run ---------------------------------------------------------------------------------
def native(addr: str, model: str, width: int, concurrency: int, seconds: float, tmp: str) -> dict:
    """One run of the native load generator (``--out`` rows summarised like :func:`offer`'s),
    with its own CPU seconds."""
    out = os.path.join(tmp, f"n-{time.monotonic_ns()}.json")
    p = subprocess.run([LOAD, "--connect", addr, "--model", model, "--shape", f"1,{width}", "--inflight",
                        str(concurrency), "--sockets", str(min(concurrency, 4)), "--seconds", str(seconds),
                        "--connect-timeout", "60", "--out", out], capture_output=True, text=True,
                       timeout=seconds + 120)
    if p.returncode != 0:
        raise RuntimeError(f"zmqmodels-load: {p.stderr.strip()}")
    summary = json.loads(p.stdout)
    row = summarise([out])
    row["client_cpu_s"] = summary["client_cpu_s"]
    return row


def offer(role: list[str], concurrency: int, seconds: float, tmp: str, script: str = __file__) -> dict:
    """Run ``concurrency`` requests in flight from min(concurrency, 4) processes of ``script``
    (each writes ``{"rows": [[sent, seconds, rows joined?], ...], "failures": n}``); summary."""
    nproc = min(concurrency, 4)
    outs, ps = [], []
    for i in range(nproc):
        out = os.path.join(tmp, f"c{i}-{time.monotonic_ns()}.json")
        outs.append(out)
        ps.append(subprocess.Popen([sys.executable, script, *role, "--seconds", str(seconds),
                                    "--inflight", str(concurrency // nproc), "--out", out], env=ENV))
    for p in ps:
        p.wait(seconds + 180)
    return summarise(outs)


def summarise(outs: list[str]) -> dict:
    rows, failures = [], 0
    for out in outs:
        with open(out) as f:
            d = json.load(f)
        rows += d["rows"]
        failures += d["failures"]
    if not rows:
        return {"req_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "batch": 0.0, "failures": failures}
    start = min(r[0] for r in rows)
    span = max(r[0] + r[1] for r in rows) - start
    lat = [r[1] for r in rows]
    return {"req_s": len(rows) / span, "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3,
            "batch": sum(r[2] if len(r) > 2 else 1 for r in rows) / len(rows), "failures": failures}


def start_node(kind: str, batching: bool, procs: Procs, hub: str, tmp: str, device: str = "cpu"):  # noqa: ANN201
    addr = f"tcp://127.0.0.1:{free_port()}"
    cache = tempfile.mkdtemp(dir=tmp)
    mb = "32" if batching else "1"
    if kind == "C++ node":
        args = [BINARY, "--hub", hub, "--bind", addr, "--cache", cache, "--node-id", f"cpp-{mb}",
                "--model", "mlp", "--model", "heavy", "--threads", "1", "--max-batch", mb, "--device", device]
    else:
        k = kind.split("K=")[1]
        args = [sys.executable, "-m", "zmqmodels", "serve", "--hub", hub, "--bind", addr, "--cache", cache,
                "--node-id", f"{kind}-{mb}", "--model", "mlp", "--model", "heavy", "--workers", k,
                "--max-batch", mb, "--device", device]
    return procs.start(args), addr


def run_nodes(args: argparse.Namespace, tmp: str, results: dict) -> None:
    import torch

    from zmqmodels import Client, Hub, build_release, compile_model
    from zmqmodels.release.store import Store

    models = {"mlp": mlp(0), "heavy": Heavy.make(0, all_layers=True)}
    with Hub("tcp://127.0.0.1:0", Store(os.path.join(tmp, "store"))) as hub:
        for name, model in models.items():
            ex = [torch.randn(1, WIDTH[name]), torch.randn(3, WIDTH[name])]
            r = build_release(compile_model(model, ex), name, "v1", codec="none")
            print(f"# {r.notes[0]}", file=sys.stderr, flush=True)
            hub.publish(r)
        kinds = ["Python node K=1", "Python node K=2"] + (["C++ node"] if os.path.exists(BINARY) else [])
        for kind in [k for k in kinds if not args.kinds or k in args.kinds]:
            for batching in (True, False):
                procs = Procs()
                try:
                    p, addr = start_node(kind, batching, procs, hub.address, tmp, args.device)
                    deadline = time.monotonic() + 180
                    for name in models:  # every worker up and serving before anything is timed
                        while time.monotonic() < deadline:
                            try:
                                with Client(addr, timeout=5, retries=0) as c:
                                    c.infer(name, torch.randn(1, WIDTH[name]))
                                break
                            except Exception:  # noqa: BLE001 - not up yet
                                time.sleep(0.5)
                    time.sleep(2.0)
                    key = f"{kind}, batching {'on' if batching else 'off'}" + \
                        ("" if args.device == "cpu" else f", {args.device}")
                    for name in args.models:
                        measure(args, name, key, addr, tmp, results)
                finally:
                    procs.close()


def measure(args: argparse.Namespace, name: str, key: str, addr: str, tmp: str, results: dict) -> None:
    """``key``'s row for ``name``: the native client at every concurrency (the Python
    AsyncClient where it is not built), and the AsyncClient again at the highest (the user's
    view)."""
    role = ["--role", "zclient", "--addr", addr, "--model", name, "--width", str(WIDTH[name])]
    cells = [(key, conc, os.path.exists(LOAD)) for conc in args.concurrency]
    if os.path.exists(LOAD) and args.python_rows:
        cells.append((f"{key}, AsyncClient", max(args.concurrency), False))
    for row_key, conc, use_native in cells:
        wait_idle_cpu()
        row = native(addr, name, WIDTH[name], conc, args.seconds, tmp) if use_native else \
            offer(role, conc, args.seconds, tmp)
        results.setdefault(name, {}).setdefault(row_key, {})[conc] = row
        print(json.dumps({name: {row_key: {conc: row}}}), file=sys.stderr, flush=True)


def run_minimal(args: argparse.Namespace, tmp: str, results: dict) -> None:
    """The minimal batching server beside ours, driven by the native client."""
    import torch

    from zmqmodels import compile_model

    models = {"mlp": mlp(0), "heavy": Heavy.make(0, all_layers=True)}
    for name in args.models:
        path = os.path.join(tmp, f"min-{name}.pt")
        torch.jit.save(compile_model(models[name], torch.randn(2, WIDTH[name])).module, path)
        addr = f"tcp://127.0.0.1:{free_port()}"
        procs = Procs()
        try:
            procs.start([sys.executable, __file__, "--role", "minimal", "--addr", addr, "--out", path])
            measure(argparse.Namespace(**{**vars(args), "python_rows": False}), name,
                    "minimal batching server (1 process, 1 ROUTER)", addr, tmp, results)
        finally:
            procs.close()


def run_low_load(args: argparse.Namespace, tmp: str, results: dict) -> None:
    """One request in flight, batching on and off side by side: both nodes up at once, runs
    alternated ``--rounds`` times (the machine drifts by more than the 5 % asked of this);
    the median of each side's p50s and the median of the paired ratios (round by round)."""
    import statistics

    import torch

    from zmqmodels import Client, Hub, build_release, compile_model
    from zmqmodels.release.store import Store

    with Hub("tcp://127.0.0.1:0", Store(os.path.join(tmp, "low"))) as hub:
        ex = [torch.randn(1, 784), torch.randn(3, 784)]
        hub.publish(build_release(compile_model(mlp(0), ex), "mlp", "v1", codec="none"))
        kinds = ["Python node K=1"] + (["C++ node"] if os.path.exists(BINARY) else [])
        for kind in [k for k in kinds if not args.kinds or k in args.kinds]:
            procs = Procs()
            try:
                addrs = {b: start_node(kind, b, procs, hub.address, tmp, args.device)[1]
                         for b in (True, False)}
                for addr in addrs.values():
                    deadline = time.monotonic() + 180
                    while time.monotonic() < deadline:
                        try:
                            with Client(addr, timeout=5, retries=0) as c:
                                c.infer("mlp", torch.randn(1, 784))
                            break
                        except Exception:  # noqa: BLE001 - not up yet
                            time.sleep(0.5)
                p50s: dict[bool, list[float]] = {True: [], False: []}
                for i in range(args.rounds):
                    for b in ((True, False) if i % 2 == 0 else (False, True)):  # neither side always first
                        wait_idle_cpu()
                        role = ["--role", "zclient", "--addr", addrs[b], "--model", "mlp", "--width", "784"]
                        p50s[b].append(offer(role, 1, 2.0, tmp)["p50_ms"])
                on, off = statistics.median(p50s[True]), statistics.median(p50s[False])
                paired = statistics.median(a / b for a, b in zip(p50s[True], p50s[False], strict=True))
                results.setdefault("low_load", {})[kind] = {"on": on, "off": off, "rounds": args.rounds,
                                                            "paired": paired}
                print(json.dumps({"low_load": {kind: [p50s[True], p50s[False]]}}), file=sys.stderr,
                      flush=True)
            finally:
                procs.close()


def run_torchserve(args: argparse.Namespace, tmp: str, results: dict) -> None:
    import torch

    from zmqmodels import compile_model

    try:
        from peer_torchserve import TorchServe

        ts = TorchServe()
    except (ImportError, RuntimeError) as exc:
        results["torchserve_missing"] = str(exc)
        print(f"# TorchServe not run: {exc}", file=sys.stderr)
        return
    models = {"mlp": mlp(0), "heavy": Heavy.make(0, all_layers=True)}
    key = f"TorchServe 0.12, batch_size {TS_BATCH}, max_batch_delay {TS_DELAY_MS} ms"
    with ts:
        for name in args.models:
            path = os.path.join(tmp, f"{name}.pt")
            torch.jit.save(compile_model(models[name], torch.randn(2, WIDTH[name])).module, path)
            mar = ts.archive(path, name)
            ts.register(mar, batch_size=TS_BATCH, max_batch_delay_ms=TS_DELAY_MS)
            for conc in args.concurrency:
                wait_idle_cpu()
                role = ["--role", "tsclient", "--port", str(ts.port), "--width", str(WIDTH[name])]
                row = offer(role, conc, args.seconds, tmp)
                results.setdefault(name, {}).setdefault(key, {})[conc] = row
                print(json.dumps({name: {key: {conc: row}}}), file=sys.stderr, flush=True)
            ts.unregister(name)


def report(args: argparse.Namespace, results: dict) -> None:
    for name in args.models:
        print(f"\n**{name}** ({'784-256-10' if name == 'mlp' else '25 x 1024x1024, ~100 MB'}): "
              "req/s, p50 / p99 ms, mean rows per forward; failed requests in brackets if any\n")
        print("| server | " + " | ".join(f"{c} in flight" for c in args.concurrency) + " |")
        print("|---|" + "---|" * len(args.concurrency))
        for key, row in results.get(name, {}).items():
            cells = []
            for c in args.concurrency:
                v = row.get(c) or row.get(str(c))
                if v is None:
                    cells.append("-")
                    continue
                fail = f" [{v['failures']} failed]" if v["failures"] else ""
                cells.append(f"{v['req_s']:.0f}, {v['p50_ms']:.2f} / {v['p99_ms']:.2f}, "
                             f"{v['batch']:.1f}{fail}")
            print(f"| {key} | " + " | ".join(cells) + " |")
    low = results.get("low_load", {})
    if low:
        print("\n**1 in flight, batching on vs off** (small MLP; both nodes up, runs alternated, "
              "median p50 of each side)\n")
        print("| server | rounds | p50 on | p50 off | median of on / off, round by round |\n"
              "|---|---|---|---|---|")
        for kind, v in low.items():
            print(f"| {kind} | {v['rounds']} | {v['on']:.3f} ms | {v['off']:.3f} ms | {v['paired']:.3f} |")
    if "torchserve_missing" in results:
        print(f"\nTorchServe was not measured: {results['torchserve_missing']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="")
    ap.add_argument("--addr", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--width", type=int, default=784)
    ap.add_argument("--inflight", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true", help="the small MLP at 1 and 64 in flight only")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--device", default="cpu", help="the nodes' device (cuda:0 on a GPU machine)")
    ap.add_argument("--kinds", default="", help="comma-joined: only these servers (e.g. 'C++ node')")
    ap.add_argument("--concurrency", default="", help="comma-joined in-flight counts (default 1,4,16,64)")
    ap.add_argument("--no-torchserve", action="store_true")
    ap.add_argument("--no-python-rows", dest="python_rows", action="store_false",
                    help="skip the AsyncClient rows (the user's view) at the highest concurrency")
    ap.add_argument("--no-minimal", dest="minimal", action="store_false",
                    help="skip the minimal batching server")
    ap.add_argument("--rounds", type=int, default=11, help="alternated 1-in-flight runs per side (0: skip)")
    ap.add_argument("--only-low-load", action="store_true")
    args = ap.parse_args()
    if args.role == "zclient":
        return role_zclient(args.addr, args.model, args.seconds, args.inflight, args.width, args.out)
    if args.role == "tsclient":
        return role_tsclient(args.port, args.seconds, args.inflight, args.width, args.out)
    if args.role == "minimal":
        return role_minimal(args.addr, args.out)
    args.models = ["mlp"] if args.quick else ["mlp", "heavy"]
    args.concurrency = [int(c) for c in args.concurrency.split(",")] if args.concurrency else \
        [1, 64] if args.quick else [1, 4, 16, 64]
    args.kinds = [k for k in args.kinds.split(",") if k]
    import torch

    print(f"# {platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, python "
          f"{platform.python_version()}, commit {commit()}", file=sys.stderr)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="zmqm-bb-") as tmp:
        if not args.only_low_load:
            run_nodes(args, tmp, results)
            if args.minimal and os.path.exists(LOAD):
                run_minimal(args, tmp, results)
            if not args.no_torchserve:
                run_torchserve(args, tmp, results)
        if args.rounds:
            run_low_load(args, tmp, results)
    report(args, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
