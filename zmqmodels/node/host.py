"""What a node's host gives it: devices, a directory for its ipc endpoints, and worker
processes (started, watched, stopped). Process and file work only; no decisions."""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ZmqModelsError

__all__ = ["check_devices", "make_run_dir", "remove_dead_run_dirs", "RUN_DIR_PREFIX", "STARTING_GRACE_S",
           "WorkerProcesses", "WorkerSite"]

log = logging.getLogger("zmqmodels.node")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_devices(devices: Sequence[str]) -> None:
    """Refuse, with one line, a device this machine cannot give a worker: an unknown name, CUDA
    where there is none, or an index past the last GPU. (The front is torch-free: CUDA is asked
    of a short-lived ``python -c "import torch"``, only when a CUDA device is named.)"""
    for d in devices:
        if not _DEVICE.match(d):
            raise ZmqModelsError(f"unknown device {d!r}: use cpu, cuda or cuda:N")
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120)
    try:
        count = int(probe.stdout.strip() or "0")
    except ValueError:
        count = 0
    if count == 0:
        why = probe.stderr.strip().splitlines()[-1] if probe.returncode else "torch.cuda.device_count() is 0"
        raise ZmqModelsError(f"device {cuda[0]!r}: no CUDA device on this machine ({why})")
    for d in cuda:
        index = int(d.partition(":")[2] or 0)
        if index >= count:
            raise ZmqModelsError(f"device {d!r}: this machine has {count} CUDA device(s), "
                                 f"cuda:0..cuda:{count - 1}")


RUN_DIR_PREFIX = "zmqm-node-"
_STARTING_PREFIX = ".zmqm-starting-"  # a run dir being made: locked, then renamed into view
STARTING_GRACE_S = 60.0  # a half-made run dir this old, unlocked, was left by a dead node


@dataclass(frozen=True)
class WorkerSite:
    """Where a node's workers run and how they reach its front: each worker's device, a run
    directory held for the node's life (its ipc endpoints), the backend's address, and whether
    CPU workers map their weights from the verified cache file (one copy per node, the page
    cache's, not one per worker; GPU workers copy theirs to the device)."""

    devices: dict[str, str]
    dir: str
    dir_lock: Any
    backend: str
    map_cache: bool

    @classmethod
    def make(cls, wids: Sequence[str], devices: Sequence[str]) -> WorkerSite:
        """``devices``: one for every worker, or one each."""
        per = dict(zip(wids, list(devices) * (len(wids) if len(devices) == 1 else 1), strict=True))
        run_dir, lock = make_run_dir()
        cpu_only = all(d.startswith("cpu") for d in per.values())
        return cls(per, run_dir, lock, f"ipc://{run_dir}/workers", cpu_only)


def make_run_dir(tmp: str = "/tmp") -> tuple[str, Any]:
    """A short directory for the node's ipc endpoints, held by a lock for the process's life;
    first remove the ones whose node is gone (a node killed with -9 cannot remove its own).

    The dir is made under a private name, its lock taken, and only then renamed to the name
    cleaners look at: a visible run dir's lock is always held while its node lives, so a
    cleaner that takes a lock knows the owner is gone (many nodes starting at once used to
    take each other's new, not-yet-locked dir for a dead one)."""
    import fcntl

    remove_dead_run_dirs(tmp)
    staging = tempfile.mkdtemp(prefix=_STARTING_PREFIX, dir=tmp)
    f = open(os.path.join(staging, ".lock"), "wb")  # noqa: SIM115 (closed in close())
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can see it yet: cannot fail
    while True:
        final = os.path.join(tmp, RUN_DIR_PREFIX + secrets.token_hex(6))
        try:
            os.rename(staging, final)  # never onto a live dir: it holds a .lock, so is not empty
            return final, f
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                f.close()
                shutil.rmtree(staging, ignore_errors=True)
                raise


def remove_dead_run_dirs(tmp: str = "/tmp", now: float | None = None) -> list[str]:
    """Remove the run dirs under ``tmp`` whose node is gone: a visible one whose lock can be
    taken, and a half-made one (its node died before renaming it) older than
    :data:`STARTING_GRACE_S`. Returns what was removed."""
    import fcntl

    now = time.time() if now is None else now
    gone = []
    for old in [*Path(tmp).glob(RUN_DIR_PREFIX + "*"), *Path(tmp).glob(_STARTING_PREFIX + "*")]:
        try:
            if old.name.startswith(_STARTING_PREFIX) and now - old.stat().st_mtime < STARTING_GRACE_S:
                continue  # being made right now (its lock may not be taken yet)
            with open(old / ".lock", "rb") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while its node lives
                shutil.rmtree(old, ignore_errors=True)
                gone.append(str(old))
                log.debug("removed %s, left by a node that is gone", old)
        except OSError:
            continue  # in use, not ours, or no lock file (not a node's)
    return gone


class WorkerProcesses:
    """The node's worker processes by id (None: not running)."""

    def __init__(self, wids: Sequence[str]) -> None:
        self.procs: dict[str, subprocess.Popen[bytes] | None] = dict.fromkeys(wids)

    def __contains__(self, wid: str) -> bool:
        return wid in self.procs

    def __len__(self) -> int:
        return len(self.procs)

    def spawn(self, wid: str, args: list[str]) -> None:
        self.procs[wid] = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def exited(self) -> list[tuple[str, int | None]]:
        """The workers that exited since the last call, with their exit codes."""
        out = []
        for wid, proc in self.procs.items():
            if proc is not None and proc.poll() is not None:
                out.append((wid, proc.returncode))
                self.procs[wid] = None
        return out

    def kill(self, wid: str) -> None:
        proc = self.procs[wid]
        if proc is not None:
            proc.kill()

    def pids(self) -> dict[str, int]:
        return {w: p.pid for w, p in self.procs.items() if p is not None and p.poll() is None}

    def stop(self, timeout_s: float = 5.0) -> None:
        """TERM every worker, then KILL what is still there after ``timeout_s``."""
        procs = [p for p in self.procs.values() if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout_s)
