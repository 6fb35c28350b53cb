"""What a node tells its hub about each model, through its follower: its state when it changes,
each release's stages (roll, load or apply, check, CPU) and how it was taken in, rejections
and refetches. The front's I/O thread calls it; the decisions are the ledger's
(:class:`~zmqmodels.core.ledger.Ledger`), the wording of the log is here."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence

from .. import protocol as P
from ..core.broker import Broker
from ..core.ledger import Ledger
from ..core.supervisor import Supervisor
from ..protocol import ModelState
from ..release.cache import Cache
from .follower import Follower

__all__ = ["HubReports"]

log = logging.getLogger("zmqmodels.node")


class HubReports:
    """See the module. ``follower`` is None until the node has a hub (and for a node without)."""

    def __init__(self, models: Sequence[str], broker: Broker, supervisor: Supervisor, cache: Cache,
                 stats: Counter[str]) -> None:
        self.ledger = Ledger(models)  # what the hub is told: states, roll stages, error counts
        self.follower: Follower | None = None
        self._broker, self._supervisor, self._cache, self._stats = broker, supervisor, cache, stats

    def counts(self, name: str) -> tuple[int, int]:
        """``(requests, errors)`` answered for ``name`` by the seq last reported."""
        return self.ledger.counted.get(name, (0, 0))

    def ready(self, serving: Mapping[str, P.Held]) -> None:
        """A worker came up holding ``serving``: one it read from the cache because it started
        after the release came is a load, and says so."""
        for name, held in serving.items():
            if self.follower is not None and self.ledger.is_rolling(name, held.seq):
                self.follower.stage(name, held.seq, how="load", fmt=held.format,
                                    why="the worker started after it came: read from this node's cache")

    def loaded(self, msg: P.LoadResult) -> None:
        """A worker took ``msg.seq`` in (loaded or applied): its stages, summed over workers."""
        if self.follower is not None and self.ledger.is_rolling(msg.name, msg.seq):
            cpu = self.ledger.worker_cpu(msg.name, msg.seq, msg.cpu_s)
            self.follower.stage(msg.name, msg.seq, **{msg.how: msg.load_s}, check=msg.check_s,
                                workers_cpu=cpu, how=msg.how, why=msg.why, fmt=msg.format)

    def rejected(self, name: str, seq: int, reason: str) -> None:
        """``seq`` failed its load or check: never again here (its cache entry goes), and why."""
        log.warning("%s seq %d rejected: %s", name, seq, reason)
        self._stats["rejected_load_or_check"] += 1
        self.ledger.rejected(name, seq)
        self._cache.discard(name, seq)  # a restarted worker must not pick it up
        if self.follower is not None:
            self.follower.report(name, ModelState.REJECTED, seq=seq, reason=reason)

    def refetch(self, name: str, seq: int, reason: str) -> None:
        """This node's copy of ``seq`` is damaged: say so and fetch it again."""
        log.warning("%s seq %d: %s; fetching it again", name, seq, reason)
        self._stats["cache_refetch"] += 1
        if self.follower is not None:
            self.follower.report(name, ModelState.ERROR, seq=seq, reason=f"{reason}; fetching it again")
            self.follower.refetch(name, seq)
        self.ledger.forget(name)

    def changed(self, name: str) -> None:
        """Tell the hub this node's state for ``name`` if it changed (and the roll stage when a
        release came to serve everywhere here)."""
        if self.follower is None:
            return
        state, seq, label = self._broker.report(name)
        tell = self.ledger.view(name, state, seq, label, self._supervisor.start_error(), time.monotonic())
        if tell is None:
            return
        if tell.roll_s is not None:
            self.follower.stage(name, seq, roll=tell.roll_s)
        if tell.changed:
            self.follower.report(name, tell.state, seq=seq, label=label, reason=tell.reason)
