"""When to write a verified release to the cache again after its write failed, sans I/O."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WriteRetry"]

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
