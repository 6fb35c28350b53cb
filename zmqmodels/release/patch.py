"""Chunks sent as a difference against the previous release (docs/protocol.md §Deltas).

A fine-tuning step changes every weight a little: the chunks all differ, yet each float keeps
its sign, exponent and upper mantissa bits. XOR against the same span of the previous release
zeroes those bits; bit-shuffled and zstd-compressed, a chunk of such a difference is a fraction
of the chunk itself. The sender makes one for each changed chunk where that pays
(:func:`make_patches`); a receiver holding the same base span applies it
(:func:`apply_patch`) and checks the result against the manifest's ``chunk_raw_xxh3``, and
anyone else takes the plain chunk through the repair path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import IntegrityError
from .manifest import Release, Shifted, decompress_chunk

__all__ = ["make_patches", "apply_patch", "PATCH_GAIN", "PATCH_GIVE_UP"]

PATCH_GAIN = 0.9  # a patch is sent only if it is smaller than this share of the plain chunk
PATCH_GIVE_UP = 2  # stop trying after this many changed chunks in a row where it did not pay


def make_patches(base: Release | None, new: Release) -> dict[int, tuple[int, bytes]]:
    """``{index: (base_xxh3, payload)}`` for each chunk of ``new`` that differs from ``base``'s
    span at the same place and whose XOR against it compresses below ``PATCH_GAIN`` of the
    chunk as sent. Empty without a comparable base (other chunking, no span digests)."""
    if base is None:
        return {}
    mb, m = base.manifest, new.manifest
    if not m.chunk_raw_xxh3 or not mb.chunk_raw_xxh3 or mb.chunk_bytes != m.chunk_bytes:
        return {}
    import blosc2

    out: dict[int, tuple[int, bytes]] = {}
    misses = 0
    old = memoryview(bytearray(m.chunk_bytes))
    cur = memoryview(bytearray(m.chunk_bytes))
    for i in range(min(mb.chunk_count, m.chunk_count)):
        start, length = m.chunk_span(i)
        if m.same_span(mb, i) or mb.chunk_span(i) != (start, length):
            continue  # the same bytes (reused, not sent) or a span of another length
        decompress_chunk(mb, i, base.chunks[i], Shifted(old, start))
        decompress_chunk(m, i, new.chunks[i], Shifted(cur, start))
        xor = np.bitwise_xor(np.frombuffer(old[:length], np.uint8), np.frombuffer(cur[:length], np.uint8))
        payload = blosc2.compress2(xor, codec=blosc2.Codec.ZSTD, clevel=1,
                                   filters=[blosc2.Filter.BITSHUFFLE], filters_meta=[0],
                                   typesize=max(1, m.codec.typesize), nthreads=2)
        if len(payload) < PATCH_GAIN * m.chunk_sizes[i]:
            out[i] = (mb.chunk_raw_xxh3[i], bytes(payload))
            misses = 0
        else:
            misses += 1
            if misses >= PATCH_GIVE_UP and not out:
                break  # new weights unrelated to the old ones: differences do not pay
    return out


def apply_patch(span: Any, payload: Any) -> None:
    """XOR the patch ``payload`` into ``span`` (a writable buffer, the base's bytes) in place.
    :class:`IntegrityError` if it is not a blosc2 chunk of exactly ``len(span)`` bytes (checked
    before decompressing). The caller checks the result's digest."""
    import blosc2

    try:
        nbytes, _, _ = blosc2.get_cbuffer_sizes(payload)
    except Exception as exc:
        raise IntegrityError(f"patch is not a blosc2 chunk ({exc})") from None
    if nbytes != len(span):
        raise IntegrityError(f"patch decompresses to {nbytes} bytes, the span has {len(span)}")
    try:
        xor = np.frombuffer(blosc2.decompress2(payload), np.uint8)
    except Exception as exc:
        raise IntegrityError(f"patch: blosc2 failed ({exc})") from None
    dst = np.frombuffer(span, np.uint8)
    np.bitwise_xor(dst, xor, out=dst)
