"""Builders shared by tests."""

from __future__ import annotations

import hashlib
import os
import time

import xxhash

from zmqmodels.release import CodecSpec, Manifest, Release, compress_archive, span_digests


def raw_release(name: str, archive: bytes, *, chunk_bytes: int = 1 << 20, label: str = "",
                codec: CodecSpec | None = None) -> Release:
    """A release of arbitrary bytes (for store and transport tests that never load it)."""
    codec = codec or CodecSpec()
    chunks = compress_archive(archive, codec, chunk_bytes)
    m = Manifest(
        name=name, label=label, created_at=time.time(),
        archive_sha256=hashlib.sha256(archive).hexdigest(), archive_bytes=len(archive),
        compressed_bytes=sum(len(c) for c in chunks), codec=codec, chunk_bytes=chunk_bytes,
        chunk_count=len(chunks), chunk_sizes=[len(c) for c in chunks],
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks],
        chunk_raw_xxh3=span_digests(archive, chunk_bytes), torch_version="n/a",
        compile_method="none",
    )
    return Release(m.check(), [bytes(c) for c in chunks])


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
