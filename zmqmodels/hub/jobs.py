"""The hub's store work, run off its I/O thread: control requests from peers (PUBLISH,
ROLLBACK, RESERVE, RELEASES, PIN; at most ``max_store_jobs`` at once, ``busy`` beyond, answered
when done) and the store actions of the hub's core (read an older release, record an
activation, roll a halted wave back), whose outcomes go back to the core. Called on the hub's
I/O thread; the work runs on the hub's worker thread (:meth:`IOThread.offload`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from .. import defaults
from .. import protocol as P
from ..core.hub import HubCore, Load, RollBack, StoreActive
from ..core.lease import WaveLease, renew
from ..defaults import Limits
from ..errors import StoreError, ZmqModelsError
from ..release.catalog import Catalog
from ..release.manifest import Manifest, Release
from ..transport.tuning import trim_heap
from .desk import ReleaseDesk

__all__ = ["StoreJobs", "JobsHost"]

log = logging.getLogger("zmqmodels.hub")


class JobsHost(Protocol):
    """What store jobs use of their hub (:class:`~zmqmodels.hub.hub.Hub`): all of it, named."""

    core: HubCore
    store: Catalog
    desk: ReleaseDesk
    hub_id: str
    limits: Limits

    def carry(self, actions: list[Any]) -> None: ...
    def reply(self, peer: Any, frames: list[Any]) -> None: ...
    def error(self, peer: Any, code: str, message: str, retryable: bool = False) -> None: ...
    def release(self, rel: Release, plan: P.WavePlan | None = None) -> None: ...
    def offload(self, work: Callable[[], Any], then: Callable[[Any], None],
                fail: Callable[[BaseException], None]) -> None: ...


class StoreJobs:
    def __init__(self, hub: JobsHost) -> None:
        """``hub``: the hub whose I/O thread calls this."""
        self.hub = hub
        self.jobs = 0  # store jobs under way (I/O thread's counter)

    def carry(self, action: Load | StoreActive | RollBack) -> None:
        """A store action of the hub's core; its outcome goes back to the core."""
        hub, core = self.hub, self.hub.core
        match action:
            case Load(name, seq):
                self.run(lambda: hub.store.read(name, seq), core.loaded,
                         lambda _code, msg: core.load_failed(name, seq, msg))
            case StoreActive(name, seq, peer):
                self.run(lambda: hub.store.activate(name, seq),
                         lambda active: core.stored_active(name, active, peer),
                         lambda _code, msg: core.store_active_failed(name, seq, peer, msg))
            case RollBack(name, before):
                self.run(lambda: hub.desk.rollback(name, str(before)),
                         lambda rel: core.rolled_back(name, rel, time.monotonic()),
                         lambda _code, msg: core.rollback_failed(name, before, msg))

    def handle(self, peer: bytes, msg: Any, payload: list[Any]) -> None:
        desk = self.hub.desk
        match msg:
            case P.Publish():
                self._publish(peer, msg, payload)
            case P.Rollback() if len(payload) in (0, 2):
                signed = (payload[0].bytes, payload[1].bytes) if payload else None
                self._job(peer, lambda: (desk.rollback(msg.name, msg.to, signed), 0.0), self._published)
            case P.Rollback():
                self.hub.error(peer, "bad_message", "ROLLBACK takes none or 2 payload frames")
            case P.Reserve():
                self._job(peer, lambda: desk.reserve(msg), self._reserved)
            case P.ReleasesRequest():
                self._job(peer, lambda: desk.listing(msg.name), self._releases)
            case P.Pin():
                self._job(peer, lambda: desk.pin(msg), lambda p, pinned: self.hub.reply(p, P.pack(pinned)))

    def _publish(self, peer: bytes, hdr: P.Publish, frames: list[Any]) -> None:
        # the manifest is decoded, the signature, every chunk and the archive sha256 checked
        # once, off the I/O thread: a large manifest never stalls fetches or heartbeats
        from ..core.waves import check_plan

        check_plan(hdr.plan)
        chunks = [f.buffer for f in frames[1:]]

        def store() -> tuple[Release, float]:
            t0 = time.perf_counter()
            rel = self.hub.desk.put(frames[0].buffer, chunks, hdr.signature, staged=hdr.plan is not None,
                                    reuse_label=hdr.reuse_label)
            if hdr.plan is not None:  # the lease before the first wave: no moment without one
                m = rel.manifest
                lease = WaveLease(m.name, m.seq, self.hub.store.active(m.name), hdr.plan, self.hub.hub_id,
                                  time.time() + defaults.WAVE_LEASE_S)
                self.hub.store.update(m.name, "WAVE", lambda raw: renew(raw, lease))
            return rel, time.perf_counter() - t0

        self._job(peer, store, lambda p, done: self._published(p, done, hdr.plan))

    def _published(self, peer: bytes, done: tuple[Release, float], plan: P.WavePlan | None = None) -> None:
        rel, store_s = done
        t0 = time.perf_counter()
        self.hub.release(rel, plan)
        m = rel.manifest
        self.hub.reply(peer, P.pack(P.Published(
            m.name, m.seq, m.label, m.archive_sha256, note=self.hub.desk.note(m.name),
            store_s=round(store_s, 6), broadcast_s=round(time.perf_counter() - t0, 6))))

    def _releases(self, peer: bytes, listing: tuple[list[Manifest], dict[str, list[int]]]) -> None:
        infos = self.hub.core.release_infos(*listing, time.monotonic())
        self.hub.reply(peer, P.pack(P.ReleasesReply(infos)))

    def _reserved(self, peer: bytes, result: tuple[str, int, Any]) -> None:
        name, seq, base = result
        self.hub.reply(peer, P.pack(P.Reserved(name, seq), base))

    def _job(self, peer: bytes, work: Callable[[], Any], then: Callable[[bytes, Any], None]) -> None:
        if self.jobs >= self.hub.limits.max_store_jobs:
            self.hub.error(peer, "busy", f"{self.jobs} releases are being stored; retry", retryable=True)
            return
        self.jobs += 1

        def ok(result: Any) -> list[Any]:
            self.jobs -= 1
            then(peer, result)
            return []

        def failed(code: str, message: str) -> list[Any]:
            self.jobs -= 1
            self.hub.error(peer, code, message)
            return []

        self.run(work, ok, failed)

    def run(self, work: Callable[[], Any], then: Callable[[Any], list[Any]],
            fail: Callable[[str, str], list[Any]]) -> None:
        """Run ``work`` off the I/O thread; back on it, carry out the actions of
        ``then(result)`` or ``fail(code, message)``."""
        def failed(exc: BaseException) -> None:
            if isinstance(exc, ZmqModelsError | StoreError):
                if isinstance(exc, StoreError):
                    log.error("store: %s", exc)
                self.hub.carry(fail(exc.code, str(exc)))
            else:
                log.error("store work failed", exc_info=exc)
                self.hub.carry(fail("internal", f"{type(exc).__name__}: {exc}"))

        def trimmed() -> Any:
            try:
                return work()
            finally:
                trim_heap()  # the PUBLISH frames are garbage now; hand their pages back

        self.hub.offload(trimmed, lambda result: self.hub.carry(then(result)), failed)
