"""The node's load-balancing broker, sans I/O: who serves each request and when a worker loads.

A plain class: the node's I/O thread feeds it events (a request arrived, a worker finished,
loaded, came up or died, a new target, the clock) with the current time, and carries out the
actions it returns (:class:`Dispatch`, :class:`Load`, :class:`Refuse`, :class:`Expire`,
:class:`Rejected`, :class:`Changed`). No sockets, threads or processes: every branch is
reachable from a unit test.

Each event ends in one :meth:`Broker._step`, which **schedules loads before it dispatches**:
once a model has a newer target, the next stale worker that becomes free is taken for the
load, not handed the next queued request, so a load is issued within one request's service
time under any load (a saturated node still rolls). Then queued requests go, oldest first,
to the least recently used free worker that may answer them (:meth:`Swaps.eligible`).

With ``max_batch`` > 1 a dispatch carries every queued request that may share the oldest
one's forward (:mod:`.batching`: same model, pinned seq and shape but for the leading
dimension; the worker must hold a release proven batchable) up to ``max_batch`` rows, and
may be held back briefly while :class:`~.batching.Evidence` says more are coming.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Hashable

from ..protocol.messages import ModelState
from .batching import Evidence
from .swap import SwapPolicy, Swaps, Target, Version
from .verdicts import model_report, older_in_flight, verdict
from .work import Action, Changed, Dispatch, Expire, Load, Refetch, Refuse, Rejected, Request, WorkerSlot

__all__ = ["Broker"]


class Broker:
    """``path_for(name, seq)`` is where the cache keeps a release (a worker that came up on an
    older release is loaded from there when another holds a newer one)."""

    def __init__(self, models: list[str], workers: list[str], *,
                 path_for: Callable[[str, int], str], policy: SwapPolicy = SwapPolicy.AVAILABILITY,
                 queue_max: int = 1024, queue_timeout_s: float = 10.0, max_batch: int = 1,
                 batch_delay_s: float = 0.0) -> None:
        self.models = list(models)
        self.swaps = Swaps(self.models, policy)
        self.workers = {w: WorkerSlot(w) for w in workers}
        self.pending: collections.deque[Request] = collections.deque()
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_s
        self._path_for = path_for
        self.loading: str | None = None  # the worker loading now (one at a time)
        self._unsettled = True  # a worker may be stale: schedule loads (else skip that scan)
        self.max_batch = max(1, max_batch)
        self.evidence = Evidence(batch_delay_s if self.max_batch > 1 else 0.0)
        self.wake_at = math.inf  # a held batch goes then (the shell calls tick)
        self._held_since: dict[tuple[str, Hashable], float] = {}

    # -- events ------------------------------------------------------------------------------
    def request(self, req: Request, now: float) -> list[Action]:
        if req.model not in self.swaps.floor:
            return [Refuse(req, "unknown_model", f"this node serves {self.models}, not {req.model!r}")]
        if len(self.pending) >= self.queue_max:
            return [Refuse(req, "unavailable", f"queue full ({self.queue_max})")]
        self.evidence.arrived(req.model, now)
        if not self.pending and not self._unsettled and self.max_batch == 1:  # straight to a free worker
            w = self._pick(req, [w for w in self.workers.values() if w.free])
            if w is not None:
                return [self._assign(w, (req,), now)]
        refusal = verdict(req, self.workers, self.swaps, self.loading)
        if refusal is not None:
            return [refusal]
        self.pending.append(req)
        return self._step(now)

    def done(self, wid: str, now: float) -> list[Action]:
        w = self.workers[wid]
        if not w.busy:
            return []
        if self.max_batch > 1:
            self.evidence.served(w.busy[0].model, now - w.busy_since)
        w.busy, w.busy_seq, w.free_since = (), 0, now
        if not self.pending and not self._unsettled:
            return []
        return self._step(now)

    def worker_ready(self, wid: str, serving: dict[str, Version], now: float,
                     damaged: dict[str, tuple[int, str]] | None = None,
                     batch: dict[str, int] | None = None) -> list[Action]:
        """``damaged``: cached releases the worker found unusable (name -> (seq, reason));
        ``batch``: per model, the most rows the worker joins in one forward."""
        w = self.workers[wid]
        out: list[Action] = [self._refetch(n, seq, why) for n, (seq, why) in (damaged or {}).items()
                             if n in self.swaps.floor]
        w.ready, w.busy, w.loading, w.applying, w.free_since = True, (), None, False, now
        self._unsettled = True
        w.serving = {n: v for n, v in serving.items() if n in self.swaps.floor}
        w.batch = {n: b for n, b in (batch or {}).items() if n in w.serving}
        for name, v in w.serving.items():
            self.swaps.loaded(name, v.seq, v.label)
        return [*out, *(Changed(n) for n in self.models), *self._step(now)]

    def worker_lost(self, wid: str, now: float) -> list[Action]:
        w = self.workers[wid]
        self._unsettled = True
        out: list[Action] = []
        for req in w.busy:
            out.append(Refuse(req, "worker_lost", f"worker {wid} died serving this request"))
        if w.loading is not None:
            t = w.loading
            out += self._reject(t.name, t.seq, f"worker {wid} died loading it")
        if self.loading == wid:
            self.loading = None
        self.workers[wid] = WorkerSlot(wid)
        for name in self.models:
            self._settle_floor(name)
        return [*out, *(Changed(n) for n in self.models), *self._step(now)]

    def applying(self, wid: str, name: str, seq: int, now: float) -> list[Action]:
        """The loading worker ``wid`` takes ``seq`` by writing its weights into a spare module
        and answers requests with what it serves meanwhile: it may be given them again."""
        w = self.workers[wid]
        if w.loading is None or (w.loading.name, w.loading.seq) != (name, seq):
            return []  # not the load it was given (a late message): nothing changes
        w.applying = True
        return self._step(now)

    def loaded(self, wid: str, name: str, seq: int, label: str, ok: bool, reason: str,
               now: float, *, corrupt: bool = False, batch: int = 1) -> list[Action]:
        w = self.workers[wid]
        w.loading, w.applying, w.free_since = None, False, now
        self._unsettled = True
        if self.loading == wid:
            self.loading = None
        out: list[Action] = []
        if ok:
            w.serving[name] = Version(seq, label)
            w.batch[name] = batch
            self.swaps.loaded(name, seq, label)
        elif corrupt:
            out.append(self._refetch(name, seq, reason))
        else:
            out += self._reject(name, seq, reason)
        return [*out, Changed(name), *self._step(now)]

    def target(self, target: Target, now: float) -> list[Action]:
        if target.name not in self.swaps.floor:
            return []
        if self.swaps.missing.get(target.name) == target.seq:  # fetched again: loadable
            del self.swaps.missing[target.name]
            self._unsettled = True
            if not self.swaps.offer(target):
                return [Changed(target.name), *self._step(now)]
        elif not self.swaps.offer(target):
            return []
        self._unsettled = True
        return [Changed(target.name), *self._step(now)]

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        keep: collections.deque[Request] = collections.deque()
        for req in self.pending:
            if now >= req.expires:
                out.append(Expire(req))
            elif now >= req.deadline:
                out.append(Refuse(req, "unavailable", f"no worker free within {self.queue_timeout_s:g}s"))
            else:
                refusal = verdict(req, self.workers, self.swaps, self.loading)
                if refusal is None:
                    keep.append(req)
                else:
                    out.append(refusal)
        self.pending = keep
        return [*out, *self._step(now)]

    # -- what the shell reads ----------------------------------------------------------------
    def busy(self) -> bool:
        """Requests are queued or in a worker's hands."""
        return bool(self.pending) or any(w.busy for w in self.workers.values())

    def rolling(self, name: str) -> Target | None:
        """The target still being rolled through the workers, if any."""
        return self.swaps.targets.get(name)

    def report(self, name: str) -> tuple[ModelState, int, str]:
        """``(state, seq, label)`` of ``name`` as the hub should see it."""
        return model_report(name, self.workers, self.swaps)

    # -- the decision ------------------------------------------------------------------------
    def _refetch(self, name: str, seq: int, reason: str) -> Refetch:
        self.swaps.missing[name] = seq  # no load of it until it is in the cache again
        t = self.swaps.targets.get(name)
        if t is not None and t.seq == seq:
            del self.swaps.targets[name]
        self._unsettled = True
        return Refetch(name, seq, reason)

    def _reject(self, name: str, seq: int, reason: str) -> list[Action]:
        """The first worker to refuse ``seq`` says why; another worker's later failure on it
        (its cache entry was discarded on that refusal) is a consequence, not a new reason."""
        if seq in self.swaps.rejected[name]:
            return []
        self.swaps.reject(name, seq)
        return [Rejected(name, seq, reason)]

    def _settle_floor(self, name: str) -> None:
        """After a worker died: if no live worker holds the floor and none can get it (every
        worker is up, and no target at or above it), fall back to the newest version held. A
        worker still coming up loads the newest cached release, so we wait for it."""
        floor = self.swaps.floor[name]
        held = [w.serving[name] for w in self.workers.values() if name in w.serving]
        if any(v.seq >= floor for v in held) or any(not w.ready for w in self.workers.values()):
            return
        t = self.swaps.targets.get(name)
        if t is None or t.seq < floor:
            self.swaps.lower_floor(name, max(held, default=None))

    def _step(self, now: float) -> list[Action]:
        out: list[Action] = []
        self._schedule_loads(out)
        self._dispatch(out, now)
        return out

    def _schedule_loads(self, out: list[Action]) -> None:
        if not self._unsettled:
            return
        settled = self.loading is None and all(w.ready for w in self.workers.values())
        for name in self.models:
            goal = self.swaps.goal(name)
            if not goal or self.swaps.missing.get(name) == goal:
                continue  # nothing to roll, or its cache file is being fetched again
            stale = [w for w in self.workers.values()
                     if w.ready and self.swaps.stale(name, w.serving.get(name))]
            settled = settled and not stale
            if not stale:
                if self.swaps.targets.pop(name, None) is not None:
                    out.append(Changed(name))  # every ready worker holds it
                continue
            if self.loading is not None:
                continue  # one load at a time; the rest keep serving
            w = next((s for s in sorted(stale, key=lambda s: s.free_since) if s.free), None)
            if w is None:
                continue  # the next of them to finish its request is taken (this runs first)
            t = self.swaps.targets.get(name)
            if t is None or t.seq != goal:  # goal is the floor: another worker holds it already
                t = self.swaps.floor_target(name, self._path_for(name, goal))
            w.loading, self.loading = t, w.wid
            out.append(Load(w.wid, t, self.swaps.policy is SwapPolicy.UNLOAD_FIRST))
            out.append(Changed(name))
            settled = False
        self._unsettled = not settled

    def _dispatch(self, out: list[Action], now: float) -> None:
        self.wake_at = math.inf
        held: set[tuple[str, Hashable]] = set()
        free = [w for w in self.workers.values() if w.free] if self.pending else []
        if not free:
            self._held_since.clear()  # nothing is held back while no worker is free
            return
        keep: collections.deque[Request] = collections.deque()
        while self.pending and free:
            req = self.pending.popleft()
            group = (req.model, (req.seq, req.key))
            w = None if group in held else self._pick(req, free)
            if w is None:
                keep.append(req)
                continue
            batch = self._gather(req, w)
            count, rows = len(batch), sum(r.rows for r in batch)
            cap = self._cap(w, req.model) if req.key is not None else 1  # never joined: never held
            until = self.evidence.hold_until(req.model, count, rows, cap, req.received, now, w.free_since)
            if until is not None:  # more are coming: keep them queued, in order
                self.wake_at = min(self.wake_at, until)
                self._held_since.setdefault(group, now)
                held.add(group)
                keep.extend(batch)
                continue
            free.remove(w)
            out.append(self._assign(w, batch, now, now - self._held_since.pop(group, now)))
        keep.extend(self.pending)
        self.pending = keep
        # a group no longer held (its requests went, expired or were refused) leaves nothing behind
        self._held_since = {g: t for g, t in self._held_since.items() if g in held}

    def _cap(self, w: WorkerSlot, model: str) -> int:
        return min(self.max_batch, w.batch.get(model, 1))

    def _gather(self, first: Request, w: WorkerSlot) -> tuple[Request, ...]:
        """``first`` and the queued requests that may share its forward on ``w`` (taken out of
        :attr:`pending`), oldest first, up to the batch cap in rows."""
        cap = self._cap(w, first.model)
        if first.key is None or cap <= 1 or first.rows >= cap or not self.pending:
            return (first,)
        batch, rows = [first], first.rows
        version = w.serving.get(first.model)
        older = older_in_flight(first.model, self.workers, self.swaps) if not first.seq else False
        rest: collections.deque[Request] = collections.deque()
        for r in self.pending:
            if (rows + r.rows <= cap and r.model == first.model and r.key == first.key
                    and r.seq == first.seq and self.swaps.eligible(r.model, version, r.seq, older)):
                batch.append(r)
                rows += r.rows
            else:
                rest.append(r)
        self.pending = rest
        return tuple(batch)

    def _pick(self, req: Request, free: list[WorkerSlot]) -> WorkerSlot | None:
        """The least recently used of ``free`` that may answer ``req``."""
        older = older_in_flight(req.model, self.workers, self.swaps) if not req.seq else False
        best: WorkerSlot | None = None
        for w in free:
            if self.swaps.eligible(req.model, w.serving.get(req.model), req.seq, older) and (
                    best is None or w.free_since < best.free_since):
                best = w
        return best

    def _assign(self, w: WorkerSlot, batch: tuple[Request, ...], now: float, waited: float = 0.0) -> Dispatch:
        w.busy, w.busy_seq, w.busy_since = batch, w.serving[batch[0].model].seq, now
        if self.max_batch > 1:
            self.evidence.dispatched(batch[0].model, len(batch), now)
        return Dispatch(w.wid, batch, waited)
