"""Test harness: subscriber processes with line-by-line JSON events and deadlines."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Proc:
    """A child process whose stdout JSON lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        full_env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **(env or {})}
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=full_env, cwd=ROOT)
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        assert self.p.stdout
        for line in self.p.stdout:
            try:
                self.events.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def _read_err(self) -> None:
        assert self.p.stderr
        for line in self.p.stderr:
            self.stderr.append(line)

    def wait_event(self, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        for e in self.seen:
            if all(e.get(k) == v for k, v in match.items()):
                return e
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {match} within {timeout}s; saw {self.seen[-5:]}; "
                                     f"stderr: {''.join(self.stderr[-20:])}")
            try:
                e = self.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.p.poll() is not None and self.events.empty():
                    raise AssertionError(f"process exited {self.p.returncode}: "
                                         f"{''.join(self.stderr[-20:])}") from None
                continue
            self.seen.append(e)
            if all(e.get(k) == v for k, v in match.items()):
                return e

    def stop(self, timeout: float = 10.0) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout)
        for t in self._readers:  # EOF once the child is gone
            t.join(timeout)
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


def subscriber(hub: str, *models: str, **opts: Any) -> Proc:
    args = [sys.executable, "-m", "tests.sub_proc", "--hub", hub]
    for m in models:
        args += ["--model", m]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return Proc(args)
