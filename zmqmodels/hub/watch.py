"""Hubs that stand in for each other: each hub on a shared store (an S3 bucket) reads there,
every ``store_poll_s``, what the others stored and activated, and serves it as its own; and
holds a lease on each rollout in waves it drives (:mod:`zmqmodels.core.lease`), taking over
(and halting) another hub's whose lease ran out.

The hub that stores a release broadcasts it (once: not every hub, which would multiply the
fleet's bytes by the number of hubs). The others hold it as their newest within a poll, beat it
and answer fetches of it, so a node that follows several hubs and missed the broadcast (its hub
died mid-broadcast) fetches what it lacks from whichever hub answers. The scan runs on the
hub's store thread, never its I/O thread; what it finds is handed to the hub's core
(:meth:`~zmqmodels.core.hub.HubCore.adopted`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import defaults
from ..core.hub import HubCore
from ..core.lease import Taken, TakeOver, WaveLease, decode, orphaned, renew
from ..core.waves import RUNNING
from ..errors import ZmqModelsError
from ..release.catalog import Catalog
from ..release.manifest import Release

__all__ = ["StoreWatch", "Found"]

log = logging.getLogger("zmqmodels.hub")


@dataclass(frozen=True)
class Found:
    """What the store holds of one model that this hub did not know."""

    name: str
    latest: Release | None = None  # a newer release than the hub holds (None: no newer one)
    active: int = 0
    stored: dict[int, bool] = field(default_factory=dict)  # every stored seq, and staged or not
    orphan: WaveLease | None = None  # a rollout in waves this hub took over (to halt)
    reason: str = ""
    lost_to: str = ""  # the hub that holds the lease of this hub's rollout now


class WatchHost(Protocol):
    core: HubCore
    store: Catalog
    hub_id: str

    def carry(self, actions: list[Any]) -> None: ...
    def offload(self, work: Any, then: Any, fail: Any) -> None: ...


class StoreWatch:
    def __init__(self, hub: WatchHost, poll_s: float) -> None:
        self.hub, self.poll_s = hub, poll_s
        self._next = 0.0
        self._busy = False
        self.error = ""  # the last scan's failure ("" = it worked)

    def tick(self, now: float) -> None:
        """I/O thread: start a scan when one is due and none is running."""
        if self.poll_s <= 0 or self._busy or now < self._next:
            return
        self._next, self._busy = now + self.poll_s, True
        core = self.hub.core
        known = {n: (r.manifest.seq, core.active.get(n, 0)) for n, r in core.latest.items()}
        until = time.time() + defaults.WAVE_LEASE_S
        leases = [WaveLease(w.name, w.seq, w.before, w.plan, self.hub.hub_id, until, w.state, w.reason)
                  for w in core.waves.values()]
        self.hub.offload(lambda: self._scan(known) + self._leases(leases), self._found, self._failed)

    def _leases(self, mine: list[WaveLease]) -> list[Found]:
        """Store thread: renew the leases of this hub's rollouts in waves (or record how they
        ended); take over the running rollouts of other hubs whose leases ran out."""
        store, out, now = self.hub.store, [], time.time()
        for lease in mine:
            held = decode(store.record(lease.name, "WAVE"))
            if lease.state != RUNNING and held is not None and (held.seq, held.state) == (
                    lease.seq, lease.state):
                continue  # its end is recorded already
            try:
                store.update(lease.name, "WAVE", lambda raw, lease=lease: renew(raw, lease))
            except Taken as exc:
                out.append(Found(lease.name, lost_to=exc.lease.holder))
        driven = {lease.name for lease in mine if lease.state == RUNNING}
        for name in store.names():
            if name in driven or orphaned(store.record(name, "WAVE"), self.hub.hub_id, now) is None:
                continue
            take = TakeOver(self.hub.hub_id, now)
            store.update(name, "WAVE", take)
            if take.taken is not None:
                out.append(Found(name, orphan=take.taken, reason=take.reason))
        return out

    def _scan(self, known: dict[str, tuple[int, int]]) -> list[Found]:
        """Store thread: the models whose newest or active seq moved past what the hub knew."""
        store, out = self.hub.store, []
        for name in store.names():
            seqs = store.seqs(name)
            if not seqs:
                continue
            seq, active = known.get(name, (0, 0))
            newest, now_active = seqs[-1], store.active(name)
            if newest <= seq and now_active <= active:
                continue
            latest = store.read(name, newest) if newest > seq else None
            out.append(Found(name, latest, now_active, {m.seq: m.staged for m in store.manifests(name)}))
        return out

    def _found(self, found: list[Found]) -> None:
        self._busy, self.error = False, ""
        core, now = self.hub.core, time.monotonic()
        for f in found:
            if f.orphan is not None:
                o = f.orphan
                self.hub.carry(core.take_over(o.name, o.seq, o.before, o.plan, f.reason, now))
                continue
            if f.lost_to:
                self.hub.carry(core.lease_lost(f.name, f.lost_to))
                continue
            held = core.latest.get(f.name)
            if f.latest is not None and (held is None or held.manifest.seq < f.latest.manifest.seq):
                m = f.latest.manifest
                log.info("store: %s seq %d (%s) was stored by another hub: serving it", m.name, m.seq,
                         m.label or "-")
            self.hub.carry(core.adopted(f.name, f.latest, f.active, f.stored))

    def _failed(self, exc: BaseException) -> None:
        self._busy = False
        why = str(exc) if isinstance(exc, ZmqModelsError) else f"{type(exc).__name__}: {exc}"
        if why != self.error:
            log.warning("store: cannot read what other hubs stored: %s", why)
        self.error = why
