"""Rebuilding a release on its base: the release the fleet serves (``core/fleet.py``,
``base_seq``) whose code it shares. The base's archive with the new tensor bytes written over
its own keeps every unchanged tensor's span, so the unchanged chunks are the base's compressed
chunks, the hub leaves them out of the broadcast and nodes apply the update into the module they
serve (docs/protocol.md §Weight updates). No torch here: bytes, zip entries and digests.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash

from .archive import TensorDesc, set_crcs
from .manifest import Release, compress_archive, span_digests

__all__ = ["Base", "aligned", "delta_line", "on_base", "rebase", "rebase_archive", "unlike"]


@dataclass
class Base:
    """A stored release this process updates: its verified archive and, once loaded, its
    scripted module holding the archive's weights (None: load it when first needed)."""

    release: Release
    archive: bytearray | None  # None until first needed (a base kept from a module's update)
    module: Any = None


def rebase(base: Base, release: Release) -> Release | str:
    """``release`` rebuilt on ``base``'s archive when both hold the same code (``code_sha256``)
    and tensors (names, dtypes, shapes): the base's archive with the new tensor bytes written
    over its own (:func:`rebase_archive`), so a tensor that did not change keeps its span
    whatever else differs between two saves (serialization ids, entry order or offsets), the
    base's chunking and codec, and the base's compressed chunks wherever a span is unchanged
    (the hub leaves those out and nodes apply the update into the module they serve). The
    manifest is ``release``'s otherwise (examples, expected outputs, batching, label), with
    ``weights_of`` the base's seq. A reason (str) when it cannot be rebased."""
    m = release.manifest
    why = unlike(base.release.manifest, m.name, m.code_sha256, m.tensors)
    done = why or rebase_archive(base, release.archive(), m.tensors)
    if isinstance(done, str):
        return done
    return on_base(base, *done, m, release.notes)


def rebase_archive(base: Base, archive: Any, tensors: list[TensorDesc]
                   ) -> tuple[bytearray, list[TensorDesc]] | str:
    """The base's archive with the bytes of ``archive``'s ``tensors`` written over its own
    (same code: :func:`unlike` said so) and their descriptors at the base's offsets; a reason
    (str) if ``archive`` holds tensor data no parameter or buffer holds (only a load would put
    it where it belongs)."""
    from .archive import storages, tensor_table

    if storages(archive) != {t.storage for t in tensor_table(archive)}:
        return "its archive holds tensor data no parameter or buffer holds"
    if base.archive is None:
        raise ValueError("rebase_archive needs the base's archive (Base.archive)")
    out = bytearray(base.archive)
    src, dst = memoryview(archive).cast("B"), memoryview(out)
    descs, changed = [], []
    for old, new in zip(base.release.manifest.tensors, tensors, strict=True):
        data = src[new.start:new.start + new.nbytes]
        if new.xxh3 != old.xxh3 or data != dst[old.start:old.start + old.nbytes]:
            dst[old.start:old.start + old.nbytes] = data
            changed.append((old.start, old.start + old.nbytes))
        descs.append(msgspec.structs.replace(old, xxh3=new.xxh3))
    del src, dst, data
    set_crcs(out, changed)
    return out, descs


def unlike(b: Any, name: str, code: str, tensors: list[TensorDesc]) -> str:
    """Why a release of ``name`` with code digest ``code`` and ``tensors`` cannot be rebuilt on
    base manifest ``b`` ("" if it can)."""
    if b.name != name:
        return f"the base is {b.name}, not {name}"
    if not b.code_sha256 or not code:
        return "no code digest (an archive this reader does not understand)"
    if b.code_sha256 != code:
        return f"its code differs from seq {b.seq}'s (code digest)"
    if [(t.name, t.dtype, t.shape) for t in b.tensors] != [(t.name, t.dtype, t.shape) for t in tensors]:
        return f"its tensors differ from seq {b.seq}'s"
    return ""


def on_base(base: Base, archive: bytearray, tensors: list[TensorDesc], manifest: Any,
            notes: tuple[str, ...] = ()) -> Release:
    """The release of ``archive`` (the base's code, new tensor bytes) with ``manifest``'s
    other fields (``weights_of``: the base's seq): chunks whose span is unchanged are the
    base's compressed chunks as they are; the others are compressed anew with the base's
    codec."""
    m, old = base.release.manifest, base.release.chunks
    raw = span_digests(archive, m.chunk_bytes)
    view = memoryview(archive)
    chunks: list[Any] = []
    for i, digest in enumerate(raw):
        if i < len(m.chunk_raw_xxh3) and m.chunk_raw_xxh3[i] == digest:
            chunks.append(old[i])
        else:
            chunks.extend(compress_archive(view[i * m.chunk_bytes:(i + 1) * m.chunk_bytes], m.codec,
                                           m.chunk_bytes))
    manifest = msgspec.structs.replace(
        manifest, seq=0, created_at=time.time(), archive_sha256=hashlib.sha256(view).hexdigest(),
        archive_bytes=len(archive), codec=m.codec, chunk_bytes=m.chunk_bytes, chunk_count=len(chunks),
        compressed_bytes=sum(len(c) for c in chunks), chunk_sizes=[len(c) for c in chunks],
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks], chunk_raw_xxh3=raw,
        tensors=tensors, signer="", code_sha256=m.code_sha256,
        metadata={**manifest.metadata, "weights_of": str(m.seq)})
    return Release(manifest.check(), chunks, notes=notes)


def aligned(b: Any, codec: Any, chunk_bytes: int, tensors: list[TensorDesc]) -> bool:
    """A release compressed with ``codec`` in ``chunk_bytes`` chunks whose ``tensors`` lie where
    base ``b``'s do (same offsets, chunking and codec):
    every chunk whose tensors did not change compresses to the base's bytes already (one
    blosc2 thread per chunk: deterministic), so the hub leaves it out and nodes apply it,
    without fetching the base to rebuild it."""
    return (b.codec, b.chunk_bytes) == (codec, chunk_bytes) and \
        [(t.start, t.nbytes) for t in b.tensors] == [(t.start, t.nbytes) for t in tensors]


def delta_line(b: Any, n: Any) -> str:
    """What a release ``n`` built on base ``b`` changes, in one line."""
    same = sum(1 for i in range(n.chunk_count) if n.same_span(b, i))
    changed = sum(1 for o, t in zip(b.tensors, n.tensors, strict=True) if o.xxh3 != t.xxh3)
    return (f"delta on seq {b.seq} ({b.label or '-'}), same code: {changed} of {len(n.tensors)} "
            f"tensor(s) changed, {n.chunk_count - same} of {n.chunk_count} chunk(s) to send")
