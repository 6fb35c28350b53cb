#!/usr/bin/env python3
"""The main job on loopback: a hub, three serving nodes, a client load, a rollout under load.

Publishes v1, starts clients, publishes v2 while they run, then prints the fleet table and
one line: how many nodes serve v2, how many requests failed, the worst latency in the swap.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = 3
CLIENTS = 3


def free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue
    raise SystemExit("no free port pair on 127.0.0.1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.dir = tempfile.mkdtemp(prefix="zmqmodels-demo-")
        self.env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}

    def start(self, *args: str, log: str) -> subprocess.Popen:
        out = open(os.path.join(self.dir, log), "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen([sys.executable, "-m", "zmqmodels", *args], env=self.env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(p)
        return p

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "zmqmodels", *args], env=self.env, check=True,
                       timeout=300)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--secure", action="store_true",
                    help="keys generate, then signed releases and CURVE on every socket")
    secure = ap.parse_args().secure
    sys.path.insert(0, ROOT)
    from zmqmodels import Client, Curve, HubClient

    fleet = Fleet()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        hub = f"tcp://127.0.0.1:{free_port_pair()}"
        keys = os.path.join(fleet.dir, "keys")
        pub, sec = os.path.join(keys, "public_keys"), os.path.join(keys, "private_keys")
        hub_opts: list[str] = []
        node_opts: list[str] = []
        client_opts: list[str] = []
        sign: list[str] = []
        client_hub = client_node = None
        if secure:
            fleet.cli("keys", "generate", "--out", keys)
            hub_opts = ["--curve-key", f"{sec}/hub.key_secret", "--curve-allow", pub,
                        "--curve-publisher", f"{pub}/client.key"]
            node_opts = ["--trust", f"{keys}/signing.pub", "--curve-key", f"{sec}/node.key_secret",
                         "--curve-server", f"{pub}/hub.key", "--curve-allow", f"{pub}/client.key"]
            client_opts = ["--curve-key", f"{sec}/client.key_secret", "--curve-server", f"{pub}/hub.key"]
            sign = ["--signing-key", f"{keys}/signing.key"]
            client_hub = Curve.load(f"{sec}/client.key_secret", f"{pub}/hub.key")
            client_node = Curve.load(f"{sec}/client.key_secret", f"{pub}/node.key")
        fleet.start("hub", "--bind", hub, "--store", os.path.join(fleet.dir, "store"), *hub_opts,
                    log="hub.log")
        nodes = [f"tcp://127.0.0.1:{free_port()}" for _ in range(NODES)]
        for i, addr in enumerate(nodes):
            fleet.start("serve", "--hub", hub, "--model", "demo", "--bind", addr, "--workers", "2",
                        "--cache", os.path.join(fleet.dir, f"cache{i}"), "--node-id", f"node{i}",
                        *node_opts, log=f"node{i}.log")
        print(f"hub {hub}; nodes {', '.join(nodes)}; logs in {fleet.dir}"
              + ("; signed releases, CURVE everywhere" if secure else ""), flush=True)
        status = HubClient(hub, timeout=2, curve=client_hub)
        deadline = time.monotonic() + 120
        while True:  # nodes report in once their subscriber is up
            try:
                if len(status.status().nodes) >= NODES:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("nodes did not come up in 120 s; see the logs")
            time.sleep(0.2)
        print("== publish v1", flush=True)
        fleet.cli("publish", "scripts/demo_model.py:v1", "--name", "demo", "--label", "v1",
                  "--hub", hub, "--wait-for", str(NODES), "--timeout", "120", *sign, *client_opts)
        if secure:
            print("== publish an unsigned release: every node refuses it, v1 keeps serving", flush=True)
            out = subprocess.run([sys.executable, "-m", "zmqmodels", "publish", "scripts/demo_model.py:v2",
                                  "--name", "demo", "--label", "unsigned", "--hub", hub, "--wait-for",
                                  str(NODES), "--timeout", "60", *client_opts], env=fleet.env, timeout=300,
                                 capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip(),
                  flush=True)
            if out.returncode != 1:
                raise SystemExit("the unsigned release was not refused")

        stop = threading.Event()
        swap = {"start": 0.0, "end": 0.0}
        lock = threading.Lock()
        stats = {"ok": 0, "failed": 0, "max_ms_swap": 0.0, "max_ms_steady": 0.0,
                 "by_label": {}}

        def load(addr: str) -> None:
            x = torch.randn(1, 784)
            with Client(addr, timeout=5, retries=3, curve=client_node) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        r = c.infer("demo", x)
                    except Exception:
                        with lock:
                            stats["failed"] += 1
                        continue
                    ms = (time.perf_counter() - t0) * 1000
                    with lock:
                        stats["ok"] += 1
                        stats["by_label"][r.label] = stats["by_label"].get(r.label, 0) + 1
                        in_swap = swap["start"] and t0 + ms / 1000 >= swap["start"] and (
                            not swap["end"] or t0 <= swap["end"])
                        key = "max_ms_swap" if in_swap else "max_ms_steady"
                        stats[key] = max(stats[key], ms)

        threads = [threading.Thread(target=load, args=(nodes[i % NODES],), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        def watch() -> None:
            """The swap window: from the hub holding v2 to every node serving it (compiling
            v2 in the publish command, on these same 2 cores, is not part of it)."""
            watcher = HubClient(hub, timeout=2, curve=client_hub)
            while not stop.is_set():
                st = watcher.status()
                now = time.perf_counter()
                if not swap["start"] and any(m.label == "v2" for m in st.models):
                    swap["start"] = now
                if swap["start"] and sum(n.label == "v2" and n.state == "serving"
                                         for n in st.nodes) >= NODES:
                    swap["end"] = now
                    return
                time.sleep(0.01)

        time.sleep(2.0)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        print("== publish v2 under load", flush=True)
        fleet.cli("publish", "scripts/demo_model.py:v2", "--name", "demo", "--label", "v2",
                  "--hub", hub, "--wait-for", str(NODES), "--timeout", "120", *sign, *client_opts)
        watcher.join(10)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(10)
        print("== fleet", flush=True)
        fleet.cli("status", "--hub", hub, *client_opts)
        st = status.status()
        on_v2 = sum(n.model == "demo" and n.label == "v2" and n.state == "serving" for n in st.nodes)
        print(f"\nv2 serving on {on_v2}/{NODES} nodes, {stats['failed']} failed requests "
              f"(of {stats['ok'] + stats['failed']}), max latency during swap "
              f"{stats['max_ms_swap']:.1f} ms (steady max {stats['max_ms_steady']:.1f} ms; the swap took "
              f"{(swap['end'] - swap['start']) * 1000:.0f} ms); "
              f"replies by version: {stats['by_label']}")
        if on_v2 != NODES or stats["failed"]:
            sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        fleet.close()


if __name__ == "__main__":
    main()
