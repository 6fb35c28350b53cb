"""One archive being received into one buffer (a node's side of the intake): chunks are
decompressed into their span, spans a held archive already has are copied from it (deltas;
only those: a patch's base span is read when the patch comes), and the archive's sha256 runs
over the in-order prefix as chunks land."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ..errors import IntegrityError
from ..release.manifest import decompress_chunk
from ..release.patch import apply_patch
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
    # chunk -> XXH3-64 of the held archive's span at that place (other bytes than the manifest
    # says): a PATCH against exactly that span turns it into the new chunk (patch.py)
    prefilled: dict[int, int] = field(default_factory=dict)
    # reopens the held archive (a context manager giving its bytes, or None): a patch's base
    # span is read from there when, and only if, a patch comes
    reopen: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.view = memoryview(self.buf)
        self.sha = hashlib.sha256()

    def reuse(self, base: Any, reopen: Callable[[], Any] | None = None) -> int:
        """Take every chunk whose span of ``base`` (an archive this node holds) has the digest
        the manifest gives (``chunk_raw_xxh3``) from there instead of the network: copied, so
        the archive sha256 still covers what is served. Each span is hashed where it lies and
        only reused spans are copied; the digests of the others are kept (:attr:`prefilled`) as
        bases for patches, whose spans ``reopen`` reads again if a patch comes. Returns the
        bytes reused."""
        m, base = self.manifest, memoryview(base).cast("B")
        reused = 0
        for i, want in enumerate(m.chunk_raw_xxh3):
            start, length = m.chunk_span(i)
            if i in self.missing and start + length <= len(base):
                span = base[start:start + length]
                digest = xxhash.xxh3_64_intdigest(span)
                if digest == want:
                    self.view[start:start + length] = span
                    self.missing.discard(i)
                    reused += length
                else:
                    self.prefilled[i] = digest
        base.release()
        self.reopen = reopen
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
        if self.prefilled.pop(index, None) is None or self.reopen is None:
            raise IntegrityError(f"patch of chunk {index}: no base span here")
        span = self.view[start:start + length]
        with self.reopen() as base:  # the held archive again (a changed one fails the digest below)
            held = memoryview(base).cast("B") if base is not None else None
            if held is None or len(held) < start + length:
                raise IntegrityError(f"patch of chunk {index}: the archive it was made against is gone")
            span[:] = held[start:start + length]
            held.release()
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
