"""How long the CLI takes for what an operator runs by hand, against a baseline revision in the
same run: `status`, `infer`, `inspect`, and `publish` of a TorchScript file (compiles, proves
parity) and of a release `build` stored (sent as built).

    .venv/bin/python scripts/bench_cli.py [--baseline REV] [--runs 5]

One hub and one node (one worker) from this tree on loopback serve both trees' commands. The
baseline runs from a git worktree of REV with this tree's .venv. Each command runs `--runs`
times, once the node has reported and the CPU is idle; the table shows the median wall time
of the whole process (interpreter start to exit).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_idle(max_wait: float = 90.0, busy_below: float = 0.15) -> float:
    """Wait until the machine's CPUs are idle (busy share < ``busy_below`` over a second)."""
    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(f), f[3] + f[4]

    deadline = time.monotonic() + max_wait
    busy = 1.0
    while time.monotonic() < deadline:
        t0, i0 = sample()
        time.sleep(1.0)
        t1, i1 = sample()
        busy = 1 - (i1 - i0) / max(1, t1 - t0)
        if busy < busy_below:
            break
    return busy


def timed(cmd: list[str], tree: Path, runs: int) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    times, err = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "zmqmodels", *cmd], cwd=tree, env=env,
                             capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            err = (out.stderr.strip().splitlines() or ["?"])[-1]
            break
    return statistics.median(times), err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="", help="A git revision to compare with (a worktree).")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import torch

    from tests.models import LeNet
    from zmqmodels import Hub, Node
    from zmqmodels.release.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="zmqm-bench-cli-"))
    trees = {"this tree": ROOT}
    try:
        if args.baseline:
            base = tmp / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base),
                            args.baseline], check=True)
            trees = {f"baseline {args.baseline}": base, **trees}
        model = tmp / "lenet.pt"  # 0.25 MB of parameters; the CLI's cost is not in the bytes
        torch.jit.script(LeNet().eval()).save(str(model))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "zmqmodels", "build", str(model), "--name", "lenet",
                        "--example-input", "1x1x28x28", "--example-input", "4x1x28x28", "--store",
                        str(tmp / "built")], check=True, env=env, capture_output=True)
        built = next((tmp / "built" / "lenet").glob("*.zmr"))
        with Hub("tcp://127.0.0.1:0", Store(tmp / "hub")) as hub:
            node = Node(hub.address, ["lenet"], "tcp://127.0.0.1:0", workers=1, cache=tmp / "cache",
                        node_id="bench").start()
            try:
                subprocess.run([sys.executable, "-m", "zmqmodels", "publish", str(built), "--hub",
                                hub.address, "--wait-for", "1"], check=True, env=env, capture_output=True)
                busy = cpu_idle()
                rows = [
                    ("status", ["status", "--hub", hub.address]),
                    ("infer (1x1x28x28)", ["infer", "--server", node.address, "--model", "lenet",
                                           "--input", "1x1x28x28"]),
                    ("inspect lenet.pt", ["inspect", str(model)]),
                    ("publish lenet.pt (compile, parity)", ["publish", str(model), "--name", "lenet",
                                                            "--example-input", "1x1x28x28",
                                                            "--example-input", "4x1x28x28",
                                                            "--hub", hub.address]),
                    ("publish a built release", ["publish", str(built), "--hub", hub.address]),
                ]
                results = {label: [timed(cmd, tree, args.runs) for tree in trees.values()]
                            for label, cmd in rows}
            finally:
                node.close()
        print(f"# CLI wall time, median of {args.runs} (machine: {os.cpu_count()} CPUs, "
              f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}; "
              f"CPU {busy:.0%} busy before timing)")
        names = list(trees)
        print("| command | " + " | ".join(names) + (" | speed-up |" if len(names) == 2 else " |"))
        print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
        for label, res in results.items():
            cells = [f"{t:.2f} s" if not err else f"fails: {err[:60]}" for t, err in res]
            ratio = ""
            if len(res) == 2:
                ok = not res[0][1] and not res[1][1]
                ratio = f" | {res[0][0] / res[1][0]:.1f}×" if ok else " | -"
            print(f"| {label} | " + " | ".join(cells) + ratio + " |")
    finally:
        if args.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline")],
                           capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
