"""The node front's side of its worker processes: what each worker says (ready, alive,
answers, applying new weights, loaded or refused a release) and what its death means, fed to
the broker and the supervisor (the cores) and to what the hub is told (:class:`HubReports`).
Runs on the front's I/O thread; ``carry(actions)`` is the front's, which owns the sockets."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from .. import protocol as P
from ..core.broker import Broker
from ..core.supervisor import Activity, Supervisor
from ..core.swap import Version
from .reports import HubReports
from .requests import replies

__all__ = ["WorkerMessages"]

log = logging.getLogger("zmqmodels.node")


class WorkerMessages:
    """See the module. ``send_reply(frames)`` answers a client on the front's ROUTER;
    ``metrics()`` is the node's metrics (None without ``--metrics``)."""

    def __init__(self, node_id: str, wids: Collection[str], broker: Broker, supervisor: Supervisor,
                 reports: HubReports, stats: Counter[str], carry: Callable[[list[Any]], None],
                 send_reply: Callable[[list[Any]], None], metrics: Callable[[], Any]) -> None:
        self.node_id, self._wids = node_id, set(wids)
        self.broker, self.supervisor, self.reports, self.stats = broker, supervisor, reports, stats
        self._carry, self._send_reply, self._metrics = carry, send_reply, metrics

    def on_message(self, frames: list[Any]) -> None:
        wid = frames[0].bytes.decode(errors="replace")
        if wid not in self._wids:
            self.stats["dropped_unknown_worker"] += 1
            return
        msg, payload = P.unpack(frames[1:])
        now = time.monotonic()
        match msg:
            case P.WorkerBeat():
                self.supervisor.seen(wid, now)
            case P.Done() | P.Answers():
                self._answered(wid, msg, payload, now)
            case P.WorkerReady(pid=pid, device=device, serving=serving, errors=errors):
                self.supervisor.ready(wid, now)
                log.info("worker %s ready (pid %d, %s): %s", wid, pid, device, serving)
                versions = {n: Version(h.seq, h.label) for n, h in serving.items()}
                damaged = {n: (e.seq, e.reason) for n, e in errors.items()}
                batch = {n: h.batch for n, h in serving.items()}
                self.reports.ready(serving)
                self._carry(self.broker.worker_ready(wid, versions, now, damaged, batch))
            case P.Applying(name=name, seq=seq):  # it answers requests meanwhile
                self.supervisor.seen(wid, now, Activity.IDLE)
                self._carry(self.broker.applying(wid, name, seq, now))
            case P.LoadResult():
                self._loaded(wid, msg, now)
            case _:
                self.stats["dropped_bad_worker_message"] += 1

    def died(self, wid: str, code: int | None, now: float) -> None:
        """Worker ``wid`` exited with ``code``: the supervisor restarts it, the broker answers
        what it held."""
        log.warning("worker %s exited (%s); restarting", wid, code)
        self.stats["worker_restarts"] += 1
        failing = self.supervisor.start_error()
        self.supervisor.exited(wid, now, code)
        if self.supervisor.start_error() and not failing:  # a crash loop: error, never idle
            log.error("node %s: %s", self.node_id, self.supervisor.start_error())
        self._carry(self.broker.worker_lost(wid, now))

    def _answered(self, wid: str, msg: P.Done | P.Answers, payload: list[Any], now: float) -> None:
        slot, metrics = self.broker.workers[wid], self._metrics()
        busy, seq = slot.busy, slot.busy_seq
        # the worker gets its next batch before its clients get their replies: it computes
        # while this thread sends them (with one worker, the difference is its idle time)
        self.supervisor.seen(wid, now, Activity.IDLE)
        self._carry(self.broker.done(wid, now))
        for i, r in enumerate(replies(msg, payload)):
            if not r.served:
                self.stats["expired"] += 1
                continue
            if i < len(busy):
                self.reports.ledger.answer(busy[i].model, seq, r.code)
                if metrics is not None:
                    metrics.answered(busy[i], r.code, now)
            self._send_reply([r.client, b"", *r.frames])
            self.stats["replies"] += 1

    def _loaded(self, wid: str, msg: P.LoadResult, now: float) -> None:
        self.supervisor.seen(wid, now, Activity.IDLE)
        if msg.ok:
            log.info("worker %s: %s seq %d swapped in (%s %.3fs, check %.3fs, %d MiB shared)", wid,
                     msg.name, msg.seq, msg.how, msg.load_s, msg.check_s, msg.shared_bytes >> 20)
            self.stats[f"swaps_by_{msg.how}"] += 1
            self.stats["cpu_workers_s"] += msg.cpu_s
            metrics = self._metrics()
            if metrics is not None:
                metrics.load.labels(msg.name).observe(msg.load_s + msg.check_s)
            self.reports.loaded(msg)
            if msg.batch_note:
                log.warning("worker %s: %s seq %d unbatched: %s", wid, msg.name, msg.seq, msg.batch_note)
        self._carry(self.broker.loaded(wid, msg.name, msg.seq, msg.label, msg.ok, msg.reason, now,
                                       corrupt=msg.corrupt, batch=msg.batch))
