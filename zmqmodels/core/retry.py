"""When to write a verified release to the cache again after its write failed, and the
releases kept meanwhile, sans I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["WriteRetry", "Unstored"]

RETRY_MAX_S = 60.0  # the back-off's ceiling


@dataclass
class WriteRetry:
    """Back-off 1 s doubling to :data:`RETRY_MAX_S`, or at once when the disk has room for the
    release (:meth:`room`); once a try made because there was room fails too (room was not the
    trouble: EIO, a read-only file system), only the back-off decides."""

    retries: int = 0
    at: float = 0.0  # when the next try is due (0: none is)
    room_try: bool = False  # the try under way was made early, because the disk had room
    room_failed: bool = False  # such a try failed

    def failed(self, now: float) -> float:
        """A try failed at ``now``: the delay until the next one."""
        self.room_failed, self.room_try = self.room_failed or self.room_try, False
        delay = min(RETRY_MAX_S, 2.0 ** self.retries)
        self.retries += 1
        self.at = now + delay
        return delay

    @property
    def wants_room(self) -> bool:
        """Whether the disk's free space can still bring the next try forward."""
        return not self.room_failed

    def room(self, now: float) -> None:
        if not self.room_failed and self.at > now:
            self.at, self.room_try = now, True

    def take(self, now: float) -> bool:
        """True (once) when a try is due at ``now``."""
        if not self.at or now < self.at:
            return False
        self.at = 0.0
        return True


class Unstored:
    """Verified releases whose cache write failed, at most one per model (the newest), kept in
    memory (nothing is fetched again) and handed back when their :class:`WriteRetry` says;
    ``let_go(name, buf)`` returns a buffer let go (superseded) to its pool."""

    def __init__(self, let_go: Callable[[str, Any], None]) -> None:
        self._let_go = let_go
        self._kept: dict[str, tuple[Any, str]] = {}  # name -> (the assembly, its digest)
        self._retry: dict[str, WriteRetry] = {}

    def keep(self, asm: Any, digest: str, now: float) -> float:
        """``asm`` (verified, ``digest``) could not be written: keep it; the delay to the next try."""
        name = asm.manifest.name
        old = self._kept.get(name)
        if old is not None and old[0] is not asm:
            self._let_go(name, old[0].buf)
        self._kept[name] = (asm, digest)
        return self._retry_of(name).failed(now)

    def stored(self, name: str) -> None:
        """A write of ``name`` succeeded: its next failure starts the back-off afresh (a release
        still kept keeps its next try)."""
        if name in self._kept:
            self._retry_of(name).retries = 0
        else:
            self._retry.pop(name, None)

    def superseded(self, name: str, seq: int) -> None:
        """A newer release of ``name`` than ``seq`` is complete: a kept older one is moot."""
        old = self._kept.get(name)
        if old is not None and old[0].manifest.seq < seq:
            self._let_go(name, old[0].buf)
            del self._kept[name]
            self._retry.pop(name, None)

    def due(self, now: float) -> list[tuple[str, Any, str]]:
        """``(name, asm, digest)`` of each kept release whose try is due (handed back)."""
        out = [(name, *kept) for name, kept in self._kept.items() if self._retry_of(name).take(now)]
        for name, _, _ in out:
            del self._kept[name]
        return out

    def pending(self) -> dict[str, int]:
        """``name -> bytes`` of each kept release whose write waits for room (:meth:`room`)."""
        return {n: asm.manifest.archive_bytes for n, (asm, _) in self._kept.items()
                if self._retry_of(n).wants_room}

    def room(self, name: str, now: float) -> None:
        """The disk has room for the kept release of ``name`` (:meth:`WriteRetry.room`)."""
        if name in self._kept:
            self._retry_of(name).room(now)

    def _retry_of(self, name: str) -> WriteRetry:
        """The back-off of ``name``'s kept release (afresh if a write of ``name`` succeeded since
        it was kept: a kept release never lacks one)."""
        return self._retry.setdefault(name, WriteRetry())
