"""One archive being received into one buffer (a node's side of the intake): chunks are
decompressed into their span, spans a held archive already has are copied from it (deltas),
and the archive's sha256 runs over the in-order prefix as chunks land."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from ..release import decompress_chunk
from .intake import Incoming

__all__ = ["Assembly"]


@dataclass
class Assembly(Incoming):
    """One release being received into ``buf``, decompressed chunk by chunk."""

    buf: Any = None  # a writable buffer of at least manifest.archive_bytes
    give: Callable[[str, Any], None] | None = None  # hands ``buf`` back when let go unfinished
    hashed: int = 0  # chunks [0, hashed) are in the running sha256
    receive_s: float = 0.0  # manifest -> last chunk in and hashed
    store_failures: int = 0  # failed cache writes of it (the host kept it to write again)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.view = memoryview(self.buf)
        self.sha = hashlib.sha256()

    def reuse(self, base: Any) -> int:
        """Take every chunk whose span of ``base`` (an archive this node holds) has the digest
        the manifest gives (``chunk_raw_xxh3``) from there instead of the network: copied, so
        the archive sha256 still covers what is served. Returns the bytes reused."""
        m, base = self.manifest, memoryview(base).cast("B")
        reused = 0
        for i, want in enumerate(m.chunk_raw_xxh3):
            start, length = m.chunk_span(i)
            if i in self.missing and start + length <= len(base):
                span = base[start:start + length]
                if xxhash.xxh3_64_intdigest(span) == want:
                    self.view[start:start + length] = span
                    self.missing.discard(i)
                    reused += length
        base.release()
        self.hash_prefix()
        return reused

    def accept(self, index: int, payload: Any) -> None:
        decompress_chunk(self.manifest, index, payload, self.view)
        self.missing.discard(index)  # (the intake does so too) so the prefix can extend now
        self.hash_prefix()

    def close(self) -> None:
        """Abandoned or superseded: the buffer goes back to the pool."""
        self.view.release()
        if self.give is not None:
            self.give(self.manifest.name, self.buf)

    def hash_prefix(self) -> None:
        """Extend the archive sha256 over every chunk that now completes the in-order prefix,
        so the digest is ready when the last chunk lands (not ~0.6 s/GB after it)."""
        m = self.manifest
        while self.hashed < m.chunk_count and self.hashed not in self.missing:
            start, length = m.chunk_span(self.hashed)
            self.sha.update(self.view[start:start + length])
            self.hashed += 1
