"""Archive buffers a follower receives releases into, reused across releases."""

from __future__ import annotations

import mmap
import threading

__all__ = ["BufferPool"]

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class BufferPool:
    """Archive buffers per model, reused across releases: first-touch page faults, not copies,
    bound the receive rate (fresh pages: ~1.4 GB/s for 4 nodes on 2 cores; MAP_POPULATE ~4.8;
    a reused buffer ~23). Two per model: one assembling while the other is being delivered."""

    def __init__(self, per_model: int = 2) -> None:
        self._free: dict[str, list[mmap.mmap]] = {}
        self._lock = threading.Lock()
        self._per_model = per_model

    def take(self, name: str, size: int) -> mmap.mmap:
        with self._lock:
            free = self._free.get(name, [])
            for i, buf in enumerate(free):
                if size <= len(buf) <= 2 * size + (64 << 20):
                    return free.pop(i)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE
        return mmap.mmap(-1, max(size, 1), flags=flags)

    def give(self, name: str, buf: mmap.mmap) -> None:
        with self._lock:
            free = self._free.setdefault(name, [])
            free.append(buf)
            del free[: -self._per_model]
