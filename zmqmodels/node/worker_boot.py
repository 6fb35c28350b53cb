"""A worker process's entry point (``python -m zmqmodels.node.worker_boot``): arm the parent-death
signal first, then import torch and run :class:`~zmqmodels.node.worker.Worker`.

Importing torch takes seconds (tens on a busy machine); a node killed while its workers import
it must not leave them running until the import ends, so this module imports nothing but the
standard library before arming.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

__all__ = ["command", "die_with_parent", "main"]


def command(backend: str, wid: str, device: str, cache: str, threads: int, models: list[str],
            parent: int, map_cache: bool = False) -> list[str]:
    """The command line a node starts a worker with."""
    args = [sys.executable, "-m", "zmqmodels.node.worker_boot", "--backend", backend, "--id", wid,
            "--device", device, "--cache", cache, "--threads", str(threads), "--parent", str(parent)]
    if map_cache:
        args.append("--map-cache")
    for m in models:
        args += ["--model", m]
    return args


def die_with_parent(parent: int) -> None:
    """Be killed when the node's front process dies (even by kill -9): Linux's parent-death
    signal; then check the parent did not die before it was armed."""
    if not parent:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's heartbeat loop checks its parent too
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m zmqmodels.node.worker_boot")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--id", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parent", type=int, default=0, help="the node's pid: exit when it is gone")
    ap.add_argument("--map-cache", action="store_true",
                    help="map the weights from the verified cache file (one copy per node)")
    args = ap.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front stops us; Ctrl-C goes to it
    from .worker import run  # torch: only now

    run(args.backend, args.id, args.device, args.model, args.cache, args.threads, args.parent,
        args.map_cache)


if __name__ == "__main__":
    main()
