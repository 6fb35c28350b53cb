#!/usr/bin/env python3
"""What trust costs: signing, CURVE and both, each against the same path without it, in one run.

  sign / verify   Ed25519 over a release manifest (SigningKey.seal, Trust.verify), median of 200
  pipe            4 MiB messages over one loopback connection (tcp and ipc), plain vs CURVE
  broadcast       hub -> N subscriber processes (scripts/bench_broadcast.py), plain vs signed+CURVE
  inference       sequential round trips to a `zmqmodels serve` node (1 worker), plain vs CURVE

Usage: scripts/bench_secure.py [--size-mb 100] [--subs 1,4] [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def timed(fn, n: int) -> float:  # noqa: ANN001
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_signing(keys: Path) -> list[tuple[str, str, str]]:
    import torch

    from tests.helpers import raw_release
    from zmqmodels.release.manifest import pack_tensors
    from zmqmodels.release.signing import SigningKey, Trust

    key, trust = SigningKey.load(keys / "signing.key"), Trust.load([keys / "signing.pub"])
    rows = []
    plain = raw_release("m", os.urandom(100 << 20), chunk_bytes=4 << 20)
    for what, rel in (("100 MB, 25 chunks, no examples", plain), ("+ 1 MB of example tensors", None)):
        if rel is None:
            import msgspec

            rel = type(plain)(msgspec.structs.replace(plain.manifest, examples=pack_tensors(
                [(torch.randn(256, 1024),)])), plain.chunks)
        sealed = key.seal(rel, 1)
        sign = timed(lambda: key.seal(rel, 1), 200)  # noqa: B023
        verify = timed(lambda: trust.verify(sealed.manifest, sealed.raw, sealed.signature), 200)  # noqa: B023
        rows.append((f"{what} (manifest {len(sealed.raw):,} B)", f"{sign * 1e6:.0f} µs",
                     f"{verify * 1e6:.0f} µs"))
    return rows


def pipe_mbps(transport: str, curve: bool, tmp: str, n: int = 64) -> float:
    import zmq

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    if curve:
        sp, ss = zmq.curve_keypair()
        cp, cs = zmq.curve_keypair()
        a.curve_secretkey, a.curve_publickey, a.curve_server = ss, sp, True
        b.curve_secretkey, b.curve_publickey, b.curve_serverkey = cs, cp, sp
    if transport == "tcp":
        addr = f"tcp://127.0.0.1:{a.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        addr = f"ipc://{tmp}/pipe-{int(curve)}"
        a.bind(addr)
    b.connect(addr)
    payload = os.urandom(4 << 20)
    a.send(b"x")
    b.recv()
    t = time.perf_counter()
    for _ in range(n):
        a.send(payload, copy=False)
        b.recv(copy=False)
    dt = time.perf_counter() - t
    a.close(linger=0)
    b.close(linger=0)
    ctx.term()
    return n * len(payload) / dt / 1e6


def infer_rtt(keys: Path, secure: bool, tmp: str, requests: int) -> tuple[float, float]:
    import torch

    from tests.models import Probe, probe_examples
    from zmqmodels import Client, Hub, build_release, compile_model
    from zmqmodels.release.store import Store
    from zmqmodels.transport.curve import Curve

    tag = "s" if secure else "p"
    hub_addr, node_addr = f"ipc://{tmp}/hub-{tag}", f"ipc://{tmp}/node-{tag}"
    args = [sys.executable, "-m", "zmqmodels", "serve", "--hub", hub_addr, "--model", "probe", "--bind",
            node_addr, "--workers", "1", "--cache", f"{tmp}/cache-{tag}"]
    hub_kw, client_curve = {}, None
    if secure:
        pk, sk = keys / "public_keys", keys / "private_keys"
        args += ["--curve-key", str(sk / "node.key_secret"), "--curve-server", str(pk / "hub.key"),
                 "--curve-allow", str(pk / "client.key")]
        hub_kw = {"curve": Curve.load(sk / "hub.key_secret", None, [pk])}
        client_curve = Curve.load(sk / "client.key_secret", pk / "node.key")
    node = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        with Hub(hub_addr, Store(f"{tmp}/store-{tag}"), **hub_kw) as hub:
            m = hub.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "v1"))
            if not hub.wait_for("probe", m.seq, 1, 120)[0]:
                raise SystemExit("node did not serve")
            x = torch.ones(1, 4)
            with Client(node_addr, timeout=10, curve=client_curve) as c:
                for _ in range(200):
                    c.infer("probe", x)
                lat = []
                for _ in range(requests):
                    t = time.perf_counter()
                    c.infer("probe", x)
                    lat.append((time.perf_counter() - t) * 1000)
        lat.sort()
        return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    finally:
        node.terminate()
        node.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--subs", default="1,4")
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()

    from bench_broadcast import zmq_fanout

    from tests.helpers import raw_release
    from zmqmodels.release.signing import generate_signing_key
    from zmqmodels.transport.curve import generate_curve_keys

    tmp = tempfile.mkdtemp(prefix="zmqm-sec-", dir="/tmp")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    try:
        keys = Path(tmp) / "keys"
        generate_signing_key(keys)
        generate_curve_keys(keys, ["hub", "node", "client"])
        print(f"# bench_secure on {platform.node()}: {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}", flush=True)

        print("\n| Ed25519 on a manifest | sign (seal) | verify |\n|---|---|---|")
        for row in bench_signing(keys):
            print("| " + " | ".join(row) + " |", flush=True)

        print("\n| one connection, 4 MiB messages | plain MB/s | CURVE MB/s | CURVE / plain |")
        print("|---|---|---|---|")
        for transport in ("tcp", "ipc"):
            plain, curve = pipe_mbps(transport, False, tmp), pipe_mbps(transport, True, tmp)
            print(f"| {transport} loopback | {plain:.0f} | {curve:.0f} | {curve / plain:.2f} |", flush=True)

        release = raw_release("bench", os.urandom(args.size_mb << 20), chunk_bytes=4 << 20)
        print(f"\n| broadcast {args.size_mb} MB | subs | plain s (first / next) | signed + CURVE s "
              "(first / next) | next, secure / plain |\n|---|---|---|---|---|")
        for n in [int(x) for x in args.subs.split(",")]:
            res = []
            for k in (None, str(keys)):
                store = tempfile.mkdtemp(prefix="zmqm-bench-", dir=shm)
                try:
                    res.append(zmq_fanout(release, n, store, k))
                finally:
                    shutil.rmtree(store, ignore_errors=True)
            p, s = res
            print(f"| | {n} | {p['fanout_cold_s']:.2f} / {p['fanout_warm_s']:.2f} "
                  f"| {s['fanout_cold_s']:.2f} / {s['fanout_warm_s']:.2f} "
                  f"| {s['fanout_warm_s'] / p['fanout_warm_s']:.1f}x |", flush=True)

        print(f"\n| inference round trip, {args.requests} sequential | p50 ms | p99 ms |\n|---|---|---|")
        for secure in (False, True):
            p50, p99 = infer_rtt(keys, secure, tmp, args.requests)
            print(f"| {'CURVE' if secure else 'plain'} | {p50:.3f} | {p99:.3f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
