"""``serve --http/--grpc``: the gateway as a child process of the node (its own GIL, not a
thread of the node's front), reaching the node's front over ipc; restarted if it dies."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from ..errors import ZmqModelsError

__all__ = ["GatewayProcess"]

log = logging.getLogger("zmqmodels.gateway")
_UP = "Open Inference Protocol (KServe v2)"  # the line `zmqmodels gateway` prints once listening


class GatewayProcess:
    """``zmqmodels gateway --node NODE ARGS...``, its stderr passed through to ours."""

    def __init__(self, node: str, args: Sequence[str], start_timeout_s: float = 60.0) -> None:
        self.argv = [sys.executable, "-m", "zmqmodels", "gateway", "--node", node, *args]
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[str] | None = None
        self.restarts, self._backoff, self._next_try = 0, 1.0, 0.0
        self._up = threading.Event()
        self._last = ""

    def start(self) -> GatewayProcess:
        """Start it and wait until it listens; the one-line reason if it does not."""
        self._up.clear()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._relay, args=(self.proc,), name="zmqmodels-gateway-log",
                         daemon=True).start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._up.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ZmqModelsError(f"the gateway did not start: {self._last or 'no output'}")
        return self

    def _relay(self, proc: subprocess.Popen[str]) -> None:
        """Its lines go to our stderr once it is up (before, the last one is the reason
        :meth:`start` gives, said once)."""
        assert proc.stderr is not None
        held: list[str] = []
        for line in proc.stderr:
            self._last = line.strip().removeprefix("error: ").removeprefix("gateway failed to start: ")
            if not self._up.is_set():
                held.append(line)
                if not line.startswith(_UP):
                    continue
                line = "".join(held)
                self._up.set()
            sys.stderr.write(line)
            sys.stderr.flush()

    def check(self, now: float | None = None) -> None:
        """Restart it if it has exited (backing off 1 s, doubling to 30 s, while it keeps failing)."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic() if now is None else now
        if now < self._next_try:
            return
        log.warning("the gateway exited (%s: %s); restarting it", self.proc.returncode, self._last)
        self.restarts += 1
        try:
            self.start()
            self._backoff = 1.0
        except ZmqModelsError as exc:
            log.error("%s", exc)
            self._next_try, self._backoff = now + self._backoff, min(30.0, self._backoff * 2)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
