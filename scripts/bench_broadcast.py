#!/usr/bin/env python3
"""Broadcast benchmark: time from publish to every subscriber holding the verified archive.

For each archive size and subscriber count, in one run:
  zmqmodels  hub process (store on /dev/shm) -> PUB fan-out -> N subscriber processes, each
             verifying chunk digests and the archive sha256;
  (a) tcp    single-stream plain-TCP loopback bandwidth (sendall 4 MiB -> recv_into a reused buffer);
  (b) naive  a plain TCP server sending the raw archive to each of N receivers in turn (each
             receiver also computes sha256, as ours do).
Prints a markdown table. Usage: scripts/bench_broadcast.py [--sizes-mb 100,1000] [--subs 1,4,8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BLOCK = 4 << 20


# -- roles run as child processes ----------------------------------------------------------------
def secure_opts(keys: str | None, role: str) -> dict:
    """Library arguments for a fleet secured with `zmqmodels keys generate --out KEYS`."""
    if not keys:
        return {}
    from zmqmodels.release.signing import SigningKey, Trust
    from zmqmodels.transport.curve import Curve

    k = f"{keys}/private_keys/{role}.key_secret"
    if role == "hub":
        return {"curve": Curve.load(k, None, [f"{keys}/public_keys"])}
    curve = Curve.load(k, f"{keys}/public_keys/hub.key")
    if role == "node":
        return {"curve": curve, "trust": Trust.load([f"{keys}/signing.pub"])}
    return {"curve": curve, "signing_key": SigningKey.load(f"{keys}/signing.key")}


def role_sub(hub: str, node: str, keys: str | None = None) -> None:
    from zmqmodels import FollowOptions, Subscriber

    sub: Subscriber

    def done(m, archive) -> None:  # noqa: ANN001
        sub.report(m.name, "serving", seq=m.seq, label=m.label)

    sub = Subscriber(hub, ["bench"], on_release=done, load=False,
                     follow=FollowOptions(node_id=node, **secure_opts(keys, "node")))
    with sub:
        sys.stdin.read()  # until the parent closes our stdin


def role_tcp_recv(port: int, size: int) -> None:
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    h = hashlib.sha256() if os.environ.get("BENCH_SHA") else None
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while got < size:
            n = s.recv_into(view, min(BLOCK, size - got))
            if not n:
                raise SystemExit("short read")
            if h:
                h.update(view[:n])
            got += n
        s.sendall(b"k")


# -- measurements ------------------------------------------------------------------------------
def rss_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmHWM): the hub's own memory, and its peak RSS including mapped store pages."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon", "VmHWM")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0])
    return vals["RssAnon"], vals["VmHWM"]


def tcp_single_stream(data: memoryview) -> float:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    child = subprocess.Popen([sys.executable, __file__, "--role", "tcp-recv", "--port", str(port),
                              "--size", str(len(data))])
    conn, _ = srv.accept()
    t0 = time.perf_counter()
    for i in range(0, len(data), BLOCK):
        conn.sendall(data[i:i + BLOCK])
    conn.recv(1)
    dt = time.perf_counter() - t0
    conn.close()
    srv.close()
    child.wait(30)
    return len(data) / dt / 1e9


def tcp_naive(data: memoryview, n: int) -> float:
    srv = socket.create_server(("127.0.0.1", 0), backlog=n)
    port = srv.getsockname()[1]
    env = {**os.environ, "BENCH_SHA": "1"}
    kids = [subprocess.Popen([sys.executable, __file__, "--role", "tcp-recv", "--port", str(port),
                              "--size", str(len(data))], env=env) for _ in range(n)]
    conns = [srv.accept()[0] for _ in range(n)]
    t0 = time.perf_counter()
    for c in conns:  # one after another, the way a hand-rolled server would
        for i in range(0, len(data), BLOCK):
            c.sendall(data[i:i + BLOCK])
    for c in conns:
        c.recv(1)
    dt = time.perf_counter() - t0
    for c in conns:
        c.close()
    srv.close()
    for k in kids:
        k.wait(60)
    return dt


def zmq_fanout(release, n: int, store_dir: str, keys: str | None = None) -> dict[str, float]:  # noqa: ANN001
    """``keys``: a `keys generate` directory: CURVE on every socket, releases signed by the
    publisher and checked by every subscriber."""
    from zmqmodels.clients.hub import HubClient

    sock = f"/tmp/zmqm-bench-{os.getpid()}"
    addr = f"ipc://{sock}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    secure = ["--curve-key", f"{keys}/private_keys/hub.key_secret", "--curve-allow",
              f"{keys}/public_keys"] if keys else []
    hub = subprocess.Popen([sys.executable, "-m", "zmqmodels", "hub", "--bind", addr, "--store",
                            store_dir, "--retain", "1", *secure], env=env, stderr=subprocess.DEVNULL)
    subs = [subprocess.Popen([sys.executable, __file__, "--role", "sub", "--hub", addr, "--node",
                              f"n{i}", *(["--keys", keys] if keys else [])], stdin=subprocess.PIPE,
                             env=env) for i in range(n)]
    opts = secure_opts(keys, "client")
    key = opts.pop("signing_key", None)
    client = HubClient(addr, timeout=30, **opts)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if len(client.status(timeout=1).nodes) >= n:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("subscribers did not come up")
            time.sleep(0.1)
        time.sleep(0.3)
        out: dict[str, float] = {}
        for run in ("cold", "warm"):  # a node's first release vs the next (buffers reused)
            t0 = time.perf_counter()
            done = client.publish(release, timeout=300, signing_key=key)
            t1 = time.perf_counter()
            ok, _ = client.wait_for("bench", done.seq, n, timeout=300, poll_s=0.005)
            t2 = time.perf_counter()
            if not ok:
                raise SystemExit("not every subscriber verified the release")
            out[f"publish_{run}_s"], out[f"fanout_{run}_s"] = t1 - t0, t2 - t1
            time.sleep(0.3)
        rss, hwm = rss_kib(hub.pid)
        return {**out, "hub_rss_mb": rss / 1024, "hub_hwm_mb": hwm / 1024}
    finally:
        for s in subs:
            s.stdin.close()  # type: ignore[union-attr]
        for s in subs:
            s.wait(30)
        hub.terminate()
        hub.wait(30)
        if os.path.exists(sock):
            os.unlink(sock)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role")
    ap.add_argument("--hub")
    ap.add_argument("--node")
    ap.add_argument("--port", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--sizes-mb", default="100,1000")
    ap.add_argument("--subs", default="1,4,8")
    ap.add_argument("--json")
    ap.add_argument("--keys", help="(sub role) a keys directory: CURVE and signatures")
    args = ap.parse_args()
    if args.role == "sub":
        return role_sub(args.hub, args.node, args.keys)
    if args.role == "tcp-recv":
        return role_tcp_recv(args.port, args.size)

    from tests.helpers import raw_release

    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    rows = []
    print(f"# bench_broadcast on {platform.node()}: {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, store on {shm or 'tmp'}", flush=True)
    for mb in [int(x) for x in args.sizes_mb.split(",")]:
        data = os.urandom(mb << 20)  # dense weights barely compress: auto picks no codec
        release = raw_release("bench", data, chunk_bytes=4 << 20)
        single = tcp_single_stream(memoryview(data))
        for n in [int(x) for x in args.subs.split(",")]:
            store = tempfile.mkdtemp(prefix="zmqm-bench-", dir=shm)
            try:
                z = zmq_fanout(release, n, store)
            finally:
                shutil.rmtree(store, ignore_errors=True)
            naive = tcp_naive(memoryview(data), n)
            agg = n * len(data) / z["fanout_warm_s"] / 1e9
            row = {"size_mb": mb, "subs": n, **z, "agg_gbps": agg, "tcp_gbps": single,
                   "pct_of_tcp": 100 * agg / single, "naive_s": naive,
                   "speedup_vs_naive": naive / z["fanout_warm_s"],
                   "speedup_vs_naive_cold": naive / z["fanout_cold_s"]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("\n| archive | subs | fan-out s, first / next release | aggregate GB/s (next) "
          "| (a) TCP 1-stream GB/s | % of (a) | (b) naive s | vs naive (first / next) "
          "| hub anon RSS MB (peak RSS) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size_mb']} MB | {r['subs']} | {r['fanout_cold_s']:.2f} / {r['fanout_warm_s']:.2f} "
              f"| {r['agg_gbps']:.2f} | {r['tcp_gbps']:.2f} | {r['pct_of_tcp']:.0f} % | {r['naive_s']:.2f} "
              f"| {r['speedup_vs_naive_cold']:.1f}x / {r['speedup_vs_naive']:.1f}x "
              f"| {r['hub_rss_mb']:.0f} ({r['hub_hwm_mb']:.0f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
