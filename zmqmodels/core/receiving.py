"""One archive being received into one buffer (a node's side of the intake): chunks are
decompressed into their span, spans a held archive already has are copied from it (deltas),
and the archive's sha256 runs over the in-order prefix as chunks land."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import IntegrityError
from ..patch import apply_patch
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
    cpu_s: float = 0.0  # CPU the receiving thread spent on it (decompress, digests, copies)
    store_failures: int = 0  # failed cache writes of it (the host kept it to write again)
    # chunk -> XXH3-64 of the held archive's span copied there (other bytes than the manifest
    # says): a PATCH against exactly that span turns it into the new chunk (patch.py)
    prefilled: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.view = memoryview(self.buf)
        self.sha = hashlib.sha256()

    def reuse(self, base: Any) -> int:
        """Take every chunk whose span of ``base`` (an archive this node holds) has the digest
        the manifest gives (``chunk_raw_xxh3``) from there instead of the network: copied, so
        the archive sha256 still covers what is served. Other spans of ``base`` are copied too,
        as bases for patches (:attr:`prefilled`). Returns the bytes reused."""
        m, base = self.manifest, memoryview(base).cast("B")
        reused = 0
        for i, want in enumerate(m.chunk_raw_xxh3):
            start, length = m.chunk_span(i)
            if i in self.missing and start + length <= len(base):
                span = base[start:start + length]
                self.view[start:start + length] = span
                digest = xxhash.xxh3_64_intdigest(span)
                if digest == want:
                    self.missing.discard(i)
                    reused += length
                else:
                    self.prefilled[i] = digest
        base.release()
        self.hash_prefix()
        return reused

    def accept(self, index: int, payload: Any) -> None:
        decompress_chunk(self.manifest, index, payload, self.view)
        self.missing.discard(index)  # (the intake does so too) so the prefix can extend now
        self.hash_prefix()

    def can_patch(self, index: int, base_xxh3: int) -> bool:
        """Whether chunk ``index`` is missing and its span holds the base a patch was made against."""
        return index in self.missing and self.prefilled.get(index) == base_xxh3

    def accept_patch(self, index: int, payload: Any) -> None:
        """XOR the patch into the prefilled span; :class:`IntegrityError` unless the result has
        the manifest's digest (the span is then garbage until the chunk is fetched)."""
        m = self.manifest
        start, length = m.chunk_span(index)
        if self.prefilled.pop(index, None) is None:
            raise IntegrityError(f"patch of chunk {index}: no base span here")
        span = self.view[start:start + length]
        apply_patch(span, payload)
        if xxhash.xxh3_64_intdigest(span) != m.chunk_raw_xxh3[index]:
            raise IntegrityError(f"patch of chunk {index} of {m.name} seq {m.seq}: the result does not "
                                 "have the manifest's digest")
        self.missing.discard(index)
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
