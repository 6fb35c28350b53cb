"""The follower's second thread: check each complete archive's sha256, write it to the cache
(signed bytes and all) and hand it to the host's ``on_release(manifest, archive)``, newest
first; a staged release is held (the core decided whether it is already active and said so in
its :class:`~zmqmodels.core.assembly.Deliver`) until the hub activates it.

It owns no socket and no core state: what it learns goes back to the follower's I/O thread
through :class:`Follows` (the follower), which posts it to the core.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from ..core.assembly import Assembly, Deliver, Unstage
from ..errors import StoreError, ZmqModelsError
from ..protocol import ModelState
from ..release.cache import Cache
from ..release.manifest import Manifest
from ..transport.buffers import BufferPool
from ..transport.tuning import lower_thread_priority

__all__ = ["Delivery", "Follows", "ReleaseCallback"]

log = logging.getLogger("zmqmodels.follower")
ReleaseCallback = Callable[[Manifest, Any], None]  # archive: a buffer of manifest.archive_bytes


class Follows(Protocol):
    """What the delivery thread tells its follower (each posted to the follower's I/O thread)."""

    def report(self, name: str, state: ModelState | str, *, seq: int | None = None,
               label: str | None = None, reason: str = "") -> None: ...
    def stage(self, name: str, seq: int, *, how: str = "", why: str = "", fmt: str = "",
              **seconds: float) -> None: ...
    def reject(self, m: Manifest, reason: str) -> None: ...
    def store_failed(self, asm: Assembly, digest: str, exc: StoreError) -> None: ...
    def stored(self, name: str) -> None: ...
    def hold(self, m: Manifest, buf: Any) -> None: ...
    def served(self, name: str, seq: int) -> None: ...


class Delivery:
    """One thread, one mailbox of at most one item per model (the newest): see the module."""

    def __init__(self, follows: Follows, *, node_id: str, cache: Cache | None, pool: BufferPool,
                 on_release: ReleaseCallback, accept: Callable[[Manifest], bool] | None,
                 stats: Counter[str], nice: int = 0) -> None:
        self._follows, self.node_id, self.cache, self._pool = follows, node_id, cache, pool
        self._on_release, self._accept, self.stats, self._nice = on_release, accept, stats, nice
        self._mailbox: dict[str, Deliver | Unstage] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zmqmodels-sub-deliver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def mail(self, name: str, item: Deliver | Unstage) -> None:
        """Hand ``item`` (an assembled release, or a held one now activated) to the delivery
        thread; it replaces an older undelivered one of the same model, whose buffer goes
        back to the pool. An activated release never replaces a newer assembled one."""
        seq = item.manifest.seq if isinstance(item, Unstage) else item.asm.manifest.seq
        with self._cond:
            older = self._mailbox.get(name)
            older_seq = (older.manifest.seq if isinstance(older, Unstage) else older.asm.manifest.seq
                         ) if older is not None else 0
            if older_seq > seq:
                new, older = item, None  # the item itself is let go
            else:
                self._mailbox[name] = item
                self._cond.notify()
                new = older
        if new is not None:
            buf = new.buf if isinstance(new, Unstage) else new.asm.buf
            if buf is not None:
                self._pool.give(name, buf)

    def _run(self) -> None:
        lower_thread_priority(self._nice)
        # blosc2's import costs ~0.4 CPU-s: made now, while the node starts, never on the path
        # of its first release (a chunk arriving first waits on the import lock, no more)
        import blosc2  # noqa: F401
        while not self._stop.is_set():
            with self._cond:
                while not self._mailbox and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                name = next(iter(self._mailbox))
                item = self._mailbox.pop(name)
            if isinstance(item, Unstage):
                self._deliver_held(item)
                continue
            m, buf = item.asm.manifest, item.asm.buf
            archive = memoryview(buf)[: m.archive_bytes]
            kept = False
            try:
                kept = self._deliver_one(item.asm, archive, item.digest, item.active)
            finally:
                try:
                    archive.release()
                except BufferError:  # the consumer kept a view, against the contract: don't reuse
                    continue
                if not kept:
                    self._pool.give(m.name, buf)

    def _deliver_one(self, asm: Assembly, archive: memoryview, digest: str, activated: bool) -> bool:
        """Check, cache and hand on one release; True if its buffer is kept (held, no cache).
        ``activated``: staged and already activated here (the core's word, in its action)."""
        m, follows = asm.manifest, self._follows
        if digest != m.archive_sha256:
            self.stats["archive_corrupt"] += 1
            self.stats["rejected_digest"] += 1
            follows.reject(m, "archive sha256 mismatch")
            return False
        self.stats["verified"] += 1
        if not m.staged and not asm.store_failures:  # a retried write stays `error` until it works
            follows.report(m.name, ModelState.VERIFIED, seq=m.seq, label=m.label)
        try:
            if self._accept is not None and self._accept(m) is False:
                raise ZmqModelsError("declined by swap_when")
            if self.cache is not None and not self._write(asm, archive, digest):
                return True  # the kept bytes are written again on RetryStore
            self.stats["cpu_receive_s"] += asm.cpu_s
            follows.stage(m.name, m.seq, receive_cpu=asm.cpu_s)
            active = m.staged and activated  # fetched as the active one
            if active and self.cache is not None:
                self.cache.activate(m.name, m.seq)
            if m.staged and not active:  # held until the hub activates it here
                follows.hold(m, None if self.cache is not None else asm.buf)  # no cache: buf is the copy
                log.info("%s: %s seq %d staged (served once activated)", self.node_id, m.name, m.seq)
                return self.cache is None  # without a cache its buffer is the held copy
            self._on_release(m, archive)
            follows.served(m.name, m.seq)
        except Exception as exc:
            if not isinstance(exc, ZmqModelsError):
                log.exception("%s: consumer failed on %s seq %d", self.node_id, m.name, m.seq)
            follows.reject(m, f"{type(exc).__name__}: {exc}")
        return False

    def _write(self, asm: Assembly, archive: memoryview, digest: str) -> bool:
        """Cache ``asm`` (signed bytes and all) before anything loads it; False if the write
        failed (the follower keeps the bytes and writes them again)."""
        assert self.cache is not None
        m = asm.manifest
        t0, c0 = time.monotonic(), time.thread_time()
        try:
            self.cache.put(m, archive, asm.raw, asm.signature)
        except StoreError as exc:
            self._follows.store_failed(asm, digest, exc)
            return False
        cpu = time.thread_time() - c0
        self.stats["cpu_cache_write_s"] += cpu
        self._follows.stage(m.name, m.seq, cache_write=time.monotonic() - t0, cache_write_cpu=cpu)
        self._follows.stored(m.name)
        return True

    def _deliver_held(self, held: Unstage) -> None:
        """A staged release was activated: record it in the cache and hand it on."""
        m = held.manifest
        log.info("%s: %s seq %d activated", self.node_id, m.name, m.seq)
        try:
            if self.cache is None:
                view = memoryview(held.buf)[: m.archive_bytes]
                try:
                    self._on_release(m, view)
                finally:
                    view.release()
                    self._pool.give(m.name, held.buf)
                return
            self.cache.activate(m.name, m.seq)
            path = self.cache.path(m.name, m.seq)
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    self._on_release(m, view)
                finally:
                    view.release()
        except Exception as exc:
            if not isinstance(exc, ZmqModelsError | OSError):
                log.exception("%s: consumer failed on %s seq %d", self.node_id, m.name, m.seq)
            self._follows.reject(m, f"{type(exc).__name__}: {exc}")
