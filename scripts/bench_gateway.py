#!/usr/bin/env python3
"""The Open Inference Protocol gateway against a real Triton server (PyTriton), one run, one machine.

Same client for every server: NVIDIA's ``tritonclient`` (HTTP with binary tensor data, and
gRPC), 1 and 16 requests in flight (closed loop, from min(in flight, 4) client processes, one
client object per thread), one row per request. Same models: the small MLP (784-256-10) and a
~100 MB one (25 x 1024x1024, all used), the same TorchScript files. Servers, one torch thread
each, dynamic batching on (defaults: ours up to 32 rows / 200 us, Triton's up to 32 / 200 us):

* ``zmqmodels gateway`` -> the Python node (``serve --workers 1``), over TCP;
* ``serve --workers 1 --http --grpc``: the same node with the gateway as its child process, over ipc;
* ``zmqmodels gateway`` -> the C++ node (one serving thread), when built;
* PyTriton 0.7 (tritonserver 2.51 with its Python backend) in ``.venv-pytriton``, made on first
  use (``pip install nvidia-pytriton torch==2.13.0``; PyTriton pins numpy < 2).

Also the native client (zmqmodels ``AsyncClient``) straight to each node: what the gateway adds.
Reports req/s, p50 and p99 per cell.

    scripts/bench_gateway.py [--seconds 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_batching  # noqa: E402
from bench_serving import ENV, Heavy, Procs, free_port, mlp, wait_idle_cpu  # noqa: E402

BINARY = os.path.join(ROOT, "cpp", "build", "zmqmodels-node")
PYTRITON_VENV = os.path.join(ROOT, ".venv-pytriton")
WIDTH = {"mlp": 784, "heavy": 1024}


# -- client roles (separate processes) ---------------------------------------------------------
def role_tclient(url: str, protocol: str, model: str, seconds: float, inflight: int, width: int,
                 out: str) -> None:
    import numpy as np

    if protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    rows: list[tuple[float, float]] = []
    failures = [0]
    lock = threading.Lock()

    def loop() -> None:
        c = tc.InferenceServerClient(url)
        inp = tc.InferInput("INPUT__0", [1, width], "FP32")
        inp.set_data_from_numpy(x)
        c.infer(model, [inp])
        mine = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                c.infer(model, [inp])
            except Exception:  # noqa: BLE001 - counted
                failures[0] += 1
                continue
            mine.append((t0, time.monotonic() - t0))
        with lock:
            rows.extend(mine)

    ts = [threading.Thread(target=loop) for _ in range(inflight)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with open(out, "w") as f:
        json.dump({"rows": rows, "failures": failures[0]}, f)


def role_zclient(addr: str, model: str, seconds: float, inflight: int, width: int, out: str) -> None:
    import asyncio

    import numpy as np

    from zmqmodels import AsyncClient

    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    rows: list[tuple[float, float]] = []
    failures = [0]

    async def loop(c: AsyncClient, end: float) -> None:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                await c.infer(model, x, timeout=30)
            except Exception:  # noqa: BLE001 - counted
                failures[0] += 1
                continue
            rows.append((t0, time.monotonic() - t0))

    async def main() -> None:
        async with AsyncClient(addr, timeout=30, retries=0, arrays="numpy") as c:
            await c.infer(model, x)
            end = time.monotonic() + seconds
            await asyncio.gather(*(loop(c, end) for _ in range(inflight)))

    asyncio.run(main())
    with open(out, "w") as f:
        json.dump({"rows": rows, "failures": failures[0]}, f)


# -- the run ---------------------------------------------------------------------------------
def offer(role: list[str], concurrency: int, seconds: float, tmp: str) -> dict:
    return bench_batching.offer(role, concurrency, seconds, tmp, script=__file__)


def pytriton_python() -> str:
    py = os.path.join(PYTRITON_VENV, "bin", "python")
    if not os.path.exists(py):
        print("# setting up .venv-pytriton (nvidia-pytriton, torch 2.13.0): a few minutes", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", PYTRITON_VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0", "nvidia-pytriton"], check=True)
    return py


def start_pytriton(procs: Procs, files: dict[str, str]) -> tuple[str, str]:
    py = pytriton_python()
    # Triton's Python-backend stub links the system's libpython; point it at the interpreter's own
    libdir = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    http, grpc, metrics = free_port(), free_port(), free_port()
    args = [py, os.path.join(ROOT, "scripts", "peer_pytriton.py"), "--http", str(http), "--grpc", str(grpc),
            "--metrics", str(metrics)]
    for name, path in files.items():
        args += ["--model", f"{name}={path}:{WIDTH[name]}"]
    env = {**ENV, "LD_LIBRARY_PATH": libdir}
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         start_new_session=True)
    procs.procs.append(p)
    seen = []
    for line in p.stdout or ():  # Triton's own log lines come first
        seen.append(line)
        if line.strip() == "ready":
            break
    else:
        raise RuntimeError(f"PyTriton did not start (exit {p.poll()}): {''.join(seen[-5:])}")
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # keep its pipe drained
    return f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"


def wait_ready(url: str, models: list[str], timeout: float = 180) -> None:
    import tritonclient.http as th

    c = th.InferenceServerClient(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if all(c.is_model_ready(m) for m in models):
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def run(args: argparse.Namespace, tmp: str, results: dict) -> None:
    import torch

    from zmqmodels import Hub, build_release, compile_model
    from zmqmodels.release.store import Store

    torch.set_num_threads(1)
    models = {"mlp": mlp(0), "heavy": Heavy.make(0, all_layers=True)}
    files = {}
    with Hub("tcp://127.0.0.1:0", Store(os.path.join(tmp, "store"))) as hub:
        for name, model in models.items():
            compiled = compile_model(model, [torch.randn(1, WIDTH[name]), torch.randn(3, WIDTH[name])])
            files[name] = os.path.join(tmp, f"{name}.pt")
            torch.jit.save(compiled.module, files[name])
            hub.publish(build_release(compiled, name, "v1", codec="none"))
        servers: dict[str, tuple[str, str, str]] = {}  # label -> (http url, grpc url, native addr)
        procs = Procs()
        try:
            kinds = ["Python node K=1"] + (["C++ node"] if os.path.exists(BINARY) else [])
            addr = f"tcp://127.0.0.1:{free_port()}"
            http, grpc = free_port(), free_port()
            procs.start([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub.address, "--bind", addr,
                         "--cache", tempfile.mkdtemp(dir=tmp), "--model", "mlp", "--model", "heavy",
                         "--workers", "1", "--node-id", "serve-http", "--http", f"127.0.0.1:{http}",
                         "--grpc", f"127.0.0.1:{grpc}"])
            servers["serve --http/--grpc (Python node K=1)"] = (f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", "")
            for kind in kinds:
                addr = f"tcp://127.0.0.1:{free_port()}"
                cache = tempfile.mkdtemp(dir=tmp)
                if kind == "C++ node":
                    procs.start([BINARY, "--hub", hub.address, "--bind", addr, "--cache", cache,
                                 "--node-id", "cpp", "--model", "mlp", "--model", "heavy", "--threads", "1"])
                else:
                    procs.start([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub.address,
                                 "--bind", addr, "--cache", cache, "--model", "mlp", "--model", "heavy",
                                 "--workers", "1"])
                http, grpc = free_port(), free_port()
                procs.start([sys.executable, "-m", "zmqmodels", "gateway", "--node", addr,
                             "--http", f"127.0.0.1:{http}", "--grpc", f"127.0.0.1:{grpc}"])
                servers[f"gateway -> {kind}"] = (f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", addr)
            if not args.no_pytriton:
                http_url, grpc_url = start_pytriton(procs, files)
                servers["PyTriton (Triton 2.51)"] = (http_url, grpc_url, "")
            for http_url, _, _ in servers.values():
                wait_ready(http_url, list(models))
            time.sleep(2.0)
            for name in args.models:
                for label, (http_url, grpc_url, addr) in servers.items():
                    cells = [(p, u) for p, u in (("HTTP", http_url), ("gRPC", grpc_url))]
                    if addr:
                        cells.append(("native", addr))
                    for protocol, url in cells:
                        for conc in args.concurrency:
                            wait_idle_cpu()
                            if protocol == "native":
                                role = ["--role", "zclient", "--addr", url]
                                key = label.replace("gateway -> ", "native client -> ")
                            else:
                                role = ["--role", "tclient", "--addr", url, "--protocol", protocol.lower()]
                                key = f"{label}, {protocol}"
                            role += ["--model", name, "--width", str(WIDTH[name])]
                            row = offer(role, conc, args.seconds, tmp)
                            results.setdefault(name, {}).setdefault(key, {})[conc] = row
                            print(json.dumps({name: {key: {conc: row}}}), file=sys.stderr, flush=True)
        finally:
            procs.close()


def report(results: dict, concurrency: list[int]) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{sysconfig.get_platform()}; tritonclient for every v2 row, one torch thread per server")
    for name, rows in results.items():
        print(f"\n{name}: req/s, p50 / p99 ms (failed)")
        print("| server, protocol | " + " | ".join(f"{c} in flight" for c in concurrency) + " |")
        print("|---|" + "---|" * len(concurrency))
        for key, cells in rows.items():
            parts = []
            for c in concurrency:
                r = cells.get(c) or cells.get(str(c))
                parts.append("-" if r is None else f"{r['req_s']:.0f}, {r['p50_ms']:.2f} / {r['p99_ms']:.2f}"
                             + (f" ({r['failures']})" if r["failures"] else ""))
            print(f"| {key} | " + " | ".join(parts) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role")
    ap.add_argument("--addr")
    ap.add_argument("--protocol")
    ap.add_argument("--model")
    ap.add_argument("--width", type=int)
    ap.add_argument("--inflight", type=int)
    ap.add_argument("--out")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--models", nargs="*", default=["mlp", "heavy"])
    ap.add_argument("--concurrency", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--quick", action="store_true", help="1 s per cell, the MLP only")
    ap.add_argument("--no-pytriton", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.role == "tclient":
        return role_tclient(args.addr, args.protocol, args.model, args.seconds, args.inflight, args.width,
                            args.out)
    if args.role == "zclient":
        return role_zclient(args.addr, args.model, args.seconds, args.inflight, args.width, args.out)
    if args.quick:
        args.seconds, args.models = 1.0, ["mlp"]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        run(args, tmp, results)
    report(results, args.concurrency)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
