"""Worker supervision, sans I/O: when to spawn, which worker is dead, how long to back off.

The node's I/O thread tells it what it saw (a worker spawned, a message from it, what it is
doing, that its process exited) and calls :meth:`Supervisor.tick`, which returns
:class:`Spawn` and :class:`Kill` actions.

Two rules milestone 1 lacked:

- **A paused node is not a dead worker.** Silence is measured on the loop's own clock: when a
  tick comes late (the node was stopped, swapped out or starved; SIGSTOP/SIGCONT), the gap is
  forgiven for every worker, which gets a full TTL from the resumed tick.
- **A crash loop is an error**: a worker that exits before it is ready ``START_FAILURES``
  times in a row makes :meth:`Supervisor.start_error` say so (the node reports ``error``).
- **Starting is not hanging**: a worker is not heard from until it has imported torch and
  loaded its cache, which on a busy machine (eight nodes starting on two cores) takes far
  longer than the idle TTL; it gets ``start_timeout_s`` to say READY.
- **Back-off resets**: a worker that ran healthily for ``healthy_s`` restarts at once the next
  time it dies; a crash loop backs off exponentially up to ``max_backoff_s``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.messages import Word

__all__ = ["Activity", "Spawn", "Kill", "Supervisor", "WorkerHealth", "START_FAILURES"]

START_FAILURES = 3  # exits before READY in a row after which the node reports an error


class Activity(Word):
    STARTING = "starting"  # spawned, not READY yet (importing torch, loading the cache)
    IDLE = "idle"  # waiting for work: sends a beat every second
    BUSY = "busy"  # serving a request
    LOADING = "loading"  # loading a release


@dataclass(frozen=True)
class Spawn:
    wid: str


@dataclass(frozen=True)
class Kill:
    wid: str
    reason: str


@dataclass
class WorkerHealth:
    wid: str
    alive: bool = False  # a process exists (spawned and not yet seen to exit)
    activity: Activity = Activity.IDLE
    last_seen: float = 0.0
    started: float = 0.0
    restarts: int = 0  # consecutive unhealthy deaths (back-off exponent)
    restart_at: float = 0.0
    killing: bool = False
    was_ready: bool = False  # said READY since it was spawned
    early_exits: int = 0  # consecutive exits before READY
    last_code: int | None = None


class Supervisor:
    def __init__(self, workers: list[str], *, ttl_s: float, request_timeout_s: float,
                 load_timeout_s: float, start_timeout_s: float = 120.0, healthy_s: float = 30.0,
                 max_backoff_s: float = 5.0, first_backoff_s: float = 0.1, gap_s: float = 1.0) -> None:
        self.workers = {w: WorkerHealth(w) for w in workers}
        self._limits = {Activity.STARTING: start_timeout_s, Activity.IDLE: ttl_s,
                        Activity.BUSY: request_timeout_s, Activity.LOADING: load_timeout_s}
        self.healthy_s, self.max_backoff_s, self.first_backoff_s = healthy_s, max_backoff_s, first_backoff_s
        self.gap_s = gap_s  # a tick later than this after the last one is a pause of the node
        self._last_tick: float | None = None
        self.restarts_total = 0
        self.pauses_forgiven = 0

    def spawned(self, wid: str, now: float) -> None:
        h = self.workers[wid]
        h.alive, h.killing, h.activity, h.last_seen, h.started = True, False, Activity.STARTING, now, now
        h.was_ready = False

    def ready(self, wid: str, now: float) -> None:
        """The worker said READY: it can start."""
        h = self.workers[wid]
        h.was_ready, h.early_exits, h.last_seen, h.activity = True, 0, now, Activity.IDLE

    def start_error(self) -> str:
        """Why workers cannot start ("" while they can): one that exited before READY
        ``START_FAILURES`` times in a row."""
        h = next((h for h in self.workers.values() if h.early_exits >= START_FAILURES), None)
        if h is None:
            return ""
        return (f"worker {h.wid} exits before it is ready (exit code {h.last_code}, {h.early_exits} "
                "times in a row); see the node's log")

    def seen(self, wid: str, now: float, activity: Activity | None = None) -> None:
        h = self.workers[wid]
        h.last_seen = now
        if activity is not None:
            h.activity = activity

    def exited(self, wid: str, now: float, code: int | None = None) -> float:
        """The process is gone; returns when it will be spawned again."""
        h = self.workers[wid]
        h.alive, h.killing, h.last_code = False, False, code
        if not h.was_ready:
            h.early_exits += 1
        self.restarts_total += 1
        if now - h.started >= self.healthy_s:
            h.restarts = 0  # it had been healthy: not a crash loop
        h.restart_at = now + (0.0 if h.restarts == 0 else
                              min(self.max_backoff_s, self.first_backoff_s * 2 ** (h.restarts - 1)))
        h.restarts += 1
        return h.restart_at

    def tick(self, now: float) -> list[Spawn | Kill]:
        if self._last_tick is not None and now - self._last_tick > self.gap_s:
            gap = now - self._last_tick  # nothing of ours ran: forgive the silence
            self.pauses_forgiven += 1
            for h in self.workers.values():
                h.last_seen = max(h.last_seen, min(h.last_seen + gap, now))
        self._last_tick = now
        out: list[Spawn | Kill] = []
        for h in self.workers.values():
            if not h.alive:
                if now >= h.restart_at:
                    out.append(Spawn(h.wid))
                continue
            limit = self._limits[h.activity]
            if not h.killing and now - h.last_seen > limit:
                h.killing = True
                out.append(Kill(h.wid, f"silent for {now - h.last_seen:.1f}s while {h.activity.value} "
                                       f"(limit {limit:g}s)"))
        return out
