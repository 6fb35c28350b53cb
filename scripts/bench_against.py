"""Run one benchmark script from this tree and from a baseline revision, in the same run, and
print their numbers side by side.

    .venv/bin/python scripts/bench_against.py --baseline REV [--rounds 1] -- \\
        scripts/bench_broadcast.py --sizes-mb 100 --subs 1,4

The baseline runs from a git worktree of REV with this tree's .venv (``PYTHONPATH`` points
each run, and the processes it starts, at its own tree). Runs alternate (this, baseline, this,
...) so a machine that slows down mid-run hurts both alike; the CPU must be idle before each.
The script must take ``--json PATH``; every number in its JSON is compared (the mean over the
rounds), and the table shows baseline, this tree and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_cli import cpu_idle  # noqa: E402


def numbers(obj: object, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON tree, keyed by its path (lists of rows keyed by their index)."""
    out: dict[str, float] = {}
    if isinstance(obj, bool):
        return out
    if isinstance(obj, int | float):
        return {prefix: float(obj)}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.update(numbers(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def run(tree: Path, script: list[str], out: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *script, "--json", str(out)], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, timeout=3600)
    return numbers(json.loads(out.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="A git revision to compare with (a worktree).")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--driver", choices=("own", "this"), default="own",
                    help="whose scripts/ run: each tree's own (default), or this tree's in both (copied "
                         "into the baseline's worktree: a baseline whose scripts lack what is measured)")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = ap.parse_args()
    script = [a for a in args.script if a != "--"]
    tmp = Path(tempfile.mkdtemp(prefix="zmqm-bench-against-"))
    base = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base), args.baseline],
                   check=True)
    if args.driver == "this":
        shutil.copytree(ROOT / "scripts", base / "scripts", dirs_exist_ok=True)
    got: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
    try:
        for r in range(args.rounds):
            for name, tree in (("this", ROOT), ("baseline", base)):
                busy = cpu_idle()
                print(f"# round {r + 1}, {name}: CPU busy {busy:.0%} before it", file=sys.stderr, flush=True)
                got[name].append(run(tree, script, tmp / f"{name}-{r}.json"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)

    def mean(name: str, key: str) -> float | None:
        vals = [g[key] for g in got[name] if key in g]
        return statistics.mean(vals) if vals else None

    print(f"# {' '.join(script)}: baseline {args.baseline} vs this tree, same run, {args.rounds} round(s), "
          f"on {platform.node()} ({os.cpu_count()} CPUs)")
    print("\n| number | baseline | this tree | this / baseline |\n|---|---|---|---|")
    for key in sorted({k for g in got["this"] + got["baseline"] for k in g}):
        b, t = mean("baseline", key), mean("this", key)
        ratio = f"{t / b:.2f}" if b and t is not None else "-"
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        print(f"| {key} | {fmt(b)} | {fmt(t)} | {ratio} |")


if __name__ == "__main__":
    main()
