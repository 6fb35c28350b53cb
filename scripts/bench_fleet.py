#!/usr/bin/env python3
"""Fleet benchmark on a simulated network: flat vs relay trees, measured against arithmetic.

Builds (as root) one network namespace per host, each with one veth link to a bridge in a
"switch" namespace; every link is shaped with ``tc tbf`` at ``--rate`` both ways, so a host's
NIC, not loopback, bounds what it sends (this kernel has no netem: no added delay). All names
start with ``zf-``; every process and namespace is removed on exit, on an error and on Ctrl-C.

For each shape and N (receive-only subscribers: verify every chunk and the archive sha256,
no torch), a hub publishes one ``--size-mb`` release and the table gives the time until all N
hold it verified, the bytes the hub sent, and both figures predicted by arithmetic:

  flat         hub -> N
  two-level    hub -> 3 relays -> N/3 each
  three-level  hub -> 3 relays -> 3 relays each -> N/9 each

Predicted time: the busiest sender of any level sends ``fan-out x size`` at the link rate;
levels overlap (relays forward chunk by chunk), adding one chunk time per extra level.

``--local`` instead runs the 8-node local rollout (real nodes, real TorchScript model, K = 1
and 2 workers; publish -> all serving) against the seed's way measured in the same run: a
plain TCP server sending the archive to each node in turn, each node loading it from memory
with ``torch.jit.load`` and running its example.

Usage: sudo scripts/bench_fleet.py [--n 9,27] [--size-mb 100] [--rate 1gbit]
       scripts/bench_fleet.py --local [--nodes 8] [--size-mb 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PREFIX = "zf-"
CHUNK = 1 << 20
PORT = 5555


# -- roles (child processes, each in its namespace) ----------------------------------------------
def role_sub(hub: str, node: str) -> None:
    from zmqmodels.node.follower import Follower, FollowOptions

    f: Follower

    def done(m, archive) -> None:  # noqa: ANN001  (verified: chunk digests and archive sha256)
        f.report(m.name, "serving", seq=m.seq, label=m.label)

    f = Follower(hub, ["bench"], on_release=done, options=FollowOptions(node_id=node, tune_malloc=True))
    with contextlib.closing(f.start()):
        sys.stdin.read()


def role_relay(up: str, bind: str, rid: str) -> None:
    from zmqmodels.hub.relay import Relay

    store = tempfile.mkdtemp(prefix=f"zf-{rid}-", dir="/dev/shm")
    try:
        with Relay(up, bind, store, ["bench"], relay_id=rid):
            sys.stdin.read()
    finally:
        shutil.rmtree(store, ignore_errors=True)


def tx_bytes() -> int:
    """Bytes sent on this namespace's links (not loopback)."""
    total = 0
    with open("/proc/self/net/dev") as f:
        for line in f.readlines()[2:]:
            name, data = line.split(":", 1)
            if name.strip() != "lo":
                total += int(data.split()[8])
    return total


def cpu_sample() -> tuple[int, int]:
    """(all jiffies, idle jiffies) of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]


def cpu_idle(threshold: float = 0.15, settle_s: float = 1.0, timeout: float = 120) -> None:
    """Wait until the machine's CPU use over ``settle_s`` is below ``threshold``."""
    sample = cpu_sample
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t0, i0 = sample()
        time.sleep(settle_s)
        t1, i1 = sample()
        if 1 - (i1 - i0) / max(t1 - t0, 1) < threshold:
            return


def role_hub(bind: str, n: int, size: int, out: str) -> None:
    from tests.helpers import raw_release
    from zmqmodels.hub.hub import Hub
    from zmqmodels.release.store import Store

    # incompressible, codec none: the network carries every byte
    release = raw_release("bench", os.urandom(size), chunk_bytes=CHUNK, label="b")
    store = tempfile.mkdtemp(prefix="zf-hub-", dir="/dev/shm")
    try:
        with Hub(bind, Store(store), sndhwm=100_000) as hub:
            def nodes() -> int:
                return sum(1 for r in hub.status().nodes if r.model == "bench" and r.state != "lost")

            deadline = time.monotonic() + 120
            while nodes() < n and time.monotonic() < deadline:
                time.sleep(0.2)
            cpu_idle()
            sent0, t0, cpu0 = tx_bytes(), time.monotonic(), cpu_sample()
            seq = hub.publish(release).seq
            ok, _ = hub.wait_for("bench", seq, n, 300)
            elapsed = time.monotonic() - t0
            sent, cpu1 = tx_bytes() - sent0, cpu_sample()
        busy = 1 - (cpu1[1] - cpu0[1]) / max(1, cpu1[0] - cpu0[0])
        with open(out, "w") as f:
            json.dump({"ok": ok, "seconds": elapsed, "hub_tx": sent, "cpu_busy": busy}, f)
    finally:
        shutil.rmtree(store, ignore_errors=True)


# -- the network ---------------------------------------------------------------------------------
def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Net:
    """A bridge in ``zf-sw`` and one namespace per host, each on a shaped veth link."""

    def __init__(self, rate: str) -> None:
        self.rate = rate
        self.hosts: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        cleanup()
        sh("ip", "netns", "add", f"{PREFIX}sw")
        sh("ip", "-n", f"{PREFIX}sw", "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", f"{PREFIX}sw", "link", "set", "br0", "up")

    def host(self) -> tuple[str, str]:
        """A new host: (namespace, its address)."""
        i = len(self.hosts)
        ns, a, b = f"{PREFIX}h{i}", f"zfa{i}", f"zfb{i}"
        addr = f"10.77.{i // 200}.{i % 200 + 1}"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        sh("ip", "link", "set", a, "netns", ns)
        sh("ip", "link", "set", b, "netns", f"{PREFIX}sw")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", a)
        for cmd in (["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", ns, "link", "set", a, "up"],
                    ["ip", "-n", f"{PREFIX}sw", "link", "set", b, "master", "br0"],
                    ["ip", "-n", f"{PREFIX}sw", "link", "set", b, "up"]):
            sh(*cmd)
        for where, dev in ((ns, a), (f"{PREFIX}sw", b)):  # shaped both ways
            sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
               "rate", self.rate, "burst", "256kb", "latency", "50ms")
        self.hosts.append(ns)
        return ns, addr

    def run(self, ns: str, *args: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), *args],
                             stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        cleanup()


def cleanup() -> None:
    """Delete every ``zf-`` namespace (their links go with them)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run_shape(levels: int, n: int, size: int, rate: str) -> dict[str, float]:
    net = Net(rate)
    out = tempfile.mktemp(prefix="zf-result-", dir="/dev/shm")
    try:
        hub_ns, hub_ip = net.host()
        hub_addr = f"tcp://{hub_ip}:{PORT}"
        hub = net.run(hub_ns, "--role", "hub", "--bind", hub_addr, "--n", str(n), "--size", str(size),
                      "--out", out)
        ups = [hub_addr]
        for level in range(levels - 1):  # each upstream gets 3 relays
            nxt = []
            for j, up in enumerate(ups):
                for k in range(3):
                    ns, ip = net.host()
                    addr = f"tcp://{ip}:{PORT}"
                    net.run(ns, "--role", "relay", "--hub", up, "--bind", addr, "--node", f"r{level}.{j}.{k}")
                    nxt.append(addr)
            ups = nxt
        for i in range(n):
            ns, _ = net.host()
            net.run(ns, "--role", "sub", "--hub", ups[i % len(ups)], "--node", f"s{i}")
        hub.wait(600)
        with open(out) as f:
            return json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out)
        net.close()


def rate_bps(rate: str) -> float:
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for u, mult in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * mult / 8
    return float(rate) / 8


def predicted(levels: int, n: int, size: int, rate: str) -> tuple[float, int]:
    fan = [3] * (levels - 1) + [max(1, n // 3 ** (levels - 1))]
    bps = rate_bps(rate) * 0.94  # TCP/IP and framing overhead on 1500-byte frames
    seconds = max(fan) * size / bps + (levels - 1) * CHUNK * max(fan) / bps
    return seconds, fan[0] * size


def net_main(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench_fleet.py builds network namespaces: run it as root")
    size = args.size_mb * 1_000_000
    rows = []
    try:
        for n in [int(x) for x in args.n.split(",")]:
            for levels, shape in ((1, "flat"), (2, "two-level"), (3, "three-level")):
                if n < 3 ** (levels - 1):
                    continue
                got = run_shape(levels, n, size, args.rate)
                p_s, p_tx = predicted(levels, n, size, args.rate)
                rows.append((shape, n, got, p_s, p_tx))
                print(f"{shape} N={n}: {got['seconds']:.2f}s (predicted {p_s:.2f}s), hub sent "
                      f"{got['hub_tx'] / 1e6:.0f} MB (predicted {p_tx / 1e6:.0f})", file=sys.stderr)
    finally:
        cleanup()
    print(f"\n{args.size_mb} MB release, every link {args.rate} each way (tc tbf), "
          f"{platform.node()}, {os.cpu_count()} CPUs\n")
    print("| shape | N | to all (s) | predicted (s) | hub sent (MB) | predicted (MB) | copies from the hub "
          "| CPU busy |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, n, got, p_s, p_tx in rows:
        ok = "" if got["ok"] else " (INCOMPLETE)"
        print(f"| {shape} | {n} | {got['seconds']:.2f}{ok} | {p_s:.2f} | {got['hub_tx'] / 1e6:.0f} | "
              f"{p_tx / 1e6:.0f} | {got['hub_tx'] / size:.1f} | {got['cpu_busy']:.0%} |")


# -- the 8-node local rollout vs the seed's serial TCP -------------------------------------------
def role_seed_node(port: int, ready: str) -> None:
    import io

    import torch

    from zmqmodels.release.manifest import decode_manifest, unpack_tensors

    s = socket.create_connection(("127.0.0.1", port))
    with open(ready, "w"):
        pass
    head = s.recv(16, socket.MSG_WAITALL)
    n, mlen = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
    raw = s.recv(mlen, socket.MSG_WAITALL)
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        got += s.recv_into(view[got:], n - got)
    torch.set_num_threads(1)
    c0 = time.process_time()  # torch's import left out, as for the nodes
    model = torch.jit.load(io.BytesIO(buf))  # from memory, as the seed's C++ client does
    m = decode_manifest(raw)
    with torch.no_grad():
        for ex in unpack_tensors(m.examples):
            model(*ex)
    s.sendall(b"ok" + int((time.process_time() - c0) * 1e6).to_bytes(8, "little"))
    s.close()


def seed_serial(archive: bytes, raw: bytes, n: int) -> tuple[float, float]:
    """The seed's way: one TCP server sends the archive to each node in turn. Returns the
    seconds until all loaded it and the mean CPU seconds a node spent (load + example)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="zf-seed-")
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "seed-node", "--port", str(port),
                               "--out", f"{tmp}/{i}"]) for i in range(n)]
    conns = [srv.accept()[0] for _ in range(n)]
    deadline = time.monotonic() + 120
    while not all(os.path.exists(f"{tmp}/{i}") for i in range(n)) and time.monotonic() < deadline:
        time.sleep(0.1)
    cpu_idle()
    t0 = time.monotonic()
    for c in conns:  # serially, as the seed's server loop does
        c.sendall(len(archive).to_bytes(8, "little") + len(raw).to_bytes(8, "little") + raw)
        c.sendall(archive)
    cpu = []
    for c in conns:
        got = c.recv(10, socket.MSG_WAITALL)
        assert got[:2] == b"ok"
        cpu.append(int.from_bytes(got[2:], "little") / 1e6)
    elapsed = time.monotonic() - t0
    for p in procs:
        p.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)
    return elapsed, sum(cpu) / len(cpu)


_CPU_STAGES = ("receive_cpu", "cache_write_cpu", "share_cpu", "workers_cpu")  # share: the old way


def _node_cpu(stages: list[dict[str, float]]) -> float | None:
    """Mean CPU seconds a node spent taking the release (None: the code under test measures none)."""
    per = [sum(s[k] for k in _CPU_STAGES if k in s) for s in stages if any(k in s for k in _CPU_STAGES)]
    return sum(per) / len(per) if per else None


def local_rollout(release, update, n: int, workers: int) -> dict[str, float | None]:  # noqa: ANN001
    """Publish ``release`` to ``n`` fresh nodes of ``workers`` workers (-> every node serving),
    then ``update`` (the same code, its last layer changed, built the ordinary way)."""
    from zmqmodels.hub.hub import Hub
    from zmqmodels.release.store import Store

    tmp = tempfile.mkdtemp(prefix="zf-local-", dir="/dev/shm")
    out: dict[str, float | None] = {}
    try:
        with Hub("tcp://127.0.0.1:0", Store(f"{tmp}/hub")) as hub:
            procs = [subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub.address,
                                       "--model", release.manifest.name, "--bind", "tcp://127.0.0.1:0",
                                       "--workers", str(workers), "--cache", f"{tmp}/c{i}", "--node-id",
                                       f"n{i}"], stderr=subprocess.DEVNULL, cwd=ROOT)
                     for i in range(n)]
            try:
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    rows = [r for r in hub.status().nodes if r.state == "idle"]
                    if len(rows) >= n:
                        break
                    time.sleep(0.2)
                for what, r in (("first", release), ("update", update)):
                    cpu_idle()
                    t0 = time.monotonic()
                    m = hub.publish(r)
                    ok, st = hub.wait_for(m.name, m.seq, n, 300)
                    out[f"{what}_s"] = time.monotonic() - t0
                    if not ok:
                        raise SystemExit(f"local rollout failed: {st}")
                    time.sleep(1.0)  # the last reports (roll, CPU) after serving
                    stages = [x.stages for x in hub.status().nodes if x.stages_seq == m.seq]
                    out[f"{what}_node_cpu_s"] = _node_cpu(stages)
                    names = ("receive", "cache_write", "share", "load", "apply", "check", "roll")
                    slowest = {k: max(s.get(k, 0.0) for s in stages) for k in names
                               if any(k in s for s in stages)}
                    print(f"  K={workers} {what}: slowest node's stages {json.dumps(slowest)}, "
                          f"CPU per node {out[f'{what}_node_cpu_s']}", file=sys.stderr)
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait(30)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_main(args: argparse.Namespace) -> None:
    import torch

    try:
        from zmqmodels.model.build import build_release
    except ImportError:  # a baseline from before build.py held it (bench_against.py --driver this)
        from zmqmodels.release.manifest import build_release  # type: ignore[attr-defined,no-redef]
    from zmqmodels.model.compile import compile_model

    torch.manual_seed(0)
    width = 1024
    layers = max(1, args.size_mb * 1_000_000 // (width * width * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    example = [torch.randn(2, width)]
    release = build_release(compile_model(model, example), "bench", "v", codec="lz4")
    with torch.no_grad():
        model[-1].weight.add_(1e-3)  # a fine-tune of the last layer: same code, new weights
    update = build_release(compile_model(model, example), "bench", "v2", codec="lz4")
    archive = release.archive()
    print(f"model: {layers} x Linear({width}, {width}), archive {len(archive) / 1e6:.0f} MB", file=sys.stderr)
    rows = []
    for _ in range(args.repeat):
        seed, seed_cpu = seed_serial(archive, bytes(release.manifest_bytes), args.nodes)
        k1 = local_rollout(release, update, args.nodes, 1)
        k2 = local_rollout(release, update, args.nodes, 2)
        rows.append({"seed_s": seed, "seed_cpu_s": seed_cpu, "k1": k1, "k2": k2})
        print(f"  seed {seed:.2f}s ({seed_cpu:.2f} CPU-s a node), K=1 {k1}, K=2 {k2}", file=sys.stderr)

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a is not None and b else "-"

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"\n{args.nodes} local nodes, {len(archive) / 1e6:.0f} MB model, {platform.node()}, "
          f"{os.cpu_count()} CPUs (publish -> every node serving; the seed: serial TCP, load from memory; "
          f"update: the same code, last layer changed, built and published the ordinary way)\n")
    print("| run | seed (s) | K=1 first (s) | /seed | K=2 first (s) | /seed | K=1 update (s) | /seed "
          "| K=2 update (s) | /seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        k1, k2, seed = r["k1"], r["k2"], r["seed_s"]
        print(f"| {i} | {seed:.2f} | {sec(k1['first_s'])} | {ratio(k1['first_s'], seed)} "
              f"| {sec(k2['first_s'])} | {ratio(k2['first_s'], seed)} | {sec(k1['update_s'])} "
              f"| {ratio(k1['update_s'], seed)} "
              f"| {sec(k2['update_s'])} | {ratio(k2['update_s'], seed)} |")
    print("\nCPU seconds a node spent taking the first release, against the seed's client "
          "(torch.jit.load from memory + its example; torch's import left out of both)\n")
    print("| run | seed client | K=1 node | /seed | K=2 node | /seed | K=1 update | K=2 update |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        k1, k2, c = r["k1"], r["k2"], r["seed_cpu_s"]
        print(f"| {i} | {c:.2f} | {sec(k1['first_node_cpu_s'])} | {ratio(k1['first_node_cpu_s'], c)} "
              f"| {sec(k2['first_node_cpu_s'])} | {ratio(k2['first_node_cpu_s'], c)} "
              f"| {sec(k1['update_node_cpu_s'])} | {sec(k2['update_node_cpu_s'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role")
    ap.add_argument("--hub")
    ap.add_argument("--bind")
    ap.add_argument("--node")
    ap.add_argument("--out")
    ap.add_argument("--port", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--n", default="9,27")
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--local", action="store_true")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="write the --local numbers here (for bench_against.py)")
    args = ap.parse_args()
    if args.role == "sub":
        role_sub(args.hub, args.node)
    elif args.role == "relay":
        role_relay(args.hub, args.bind, args.node)
    elif args.role == "hub":
        role_hub(args.bind, int(args.n), args.size, args.out)
    elif args.role == "seed-node":
        role_seed_node(args.port, args.out)
    elif args.local:
        local_main(args)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        net_main(args)


if __name__ == "__main__":
    main()
