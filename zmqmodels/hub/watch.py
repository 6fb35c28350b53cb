"""Hubs that stand in for each other: each hub on a shared store (an S3 bucket) reads there,
every ``store_poll_s``, what the others stored and activated, and serves it as its own.

The hub that stores a release broadcasts it (once: not every hub, which would multiply the
fleet's bytes by the number of hubs). The others hold it as their newest within a poll, beat it
and answer fetches of it, so a node that follows several hubs and missed the broadcast (its hub
died mid-broadcast) fetches what it lacks from whichever hub answers. The scan runs on the
hub's store thread, never its I/O thread; what it finds is handed to the hub's core
(:meth:`~zmqmodels.core.hub.HubCore.adopted`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.hub import HubCore
from ..errors import ZmqModelsError
from ..release.catalog import Catalog
from ..release.manifest import Release

__all__ = ["StoreWatch", "Found"]

log = logging.getLogger("zmqmodels.hub")


@dataclass(frozen=True)
class Found:
    """What the store holds of one model that this hub did not know."""

    name: str
    latest: Release | None  # a newer release than the hub holds (None: no newer one)
    active: int
    stored: dict[int, bool]  # every stored seq and whether it was published staged


class WatchHost(Protocol):
    core: HubCore
    store: Catalog

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
        self.hub.offload(lambda: self._scan(known), self._found, self._failed)

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
        for f in found:
            if f.latest is not None:
                m = f.latest.manifest
                log.info("store: %s seq %d (%s) was stored by another hub: serving it", m.name, m.seq,
                         m.label or "-")
            self.hub.carry(self.hub.core.adopted(f.name, f.latest, f.active, f.stored))

    def _failed(self, exc: BaseException) -> None:
        self._busy = False
        why = str(exc) if isinstance(exc, ZmqModelsError) else f"{type(exc).__name__}: {exc}"
        if why != self.error:
            log.warning("store: cannot read what other hubs stored: %s", why)
        self.error = why
