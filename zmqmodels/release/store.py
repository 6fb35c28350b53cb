"""Durable releases on disk.

Layout: ``ROOT/<name>/<seq:012d>.zmr``, one file per release (integers little-endian)::

    b"ZMQMREL2" | u64 manifest length | u64 signature length | manifest | signature | chunks

(``ZMQMREL1`` files, without the signature fields, still read as unsigned.) The manifest is
kept byte for byte as signed or received.

Writes go to a temp file in the same directory, are fsynced, renamed into place and the
directory fsynced, so a crash leaves either a whole release or none. ``seq`` is assigned
under an exclusive lock from ``ROOT/<name>/SEQ`` (which survives retention and restarts),
so it is strictly increasing per name even across processes. A signed release carries its
seq already (:meth:`Store.reserve` hands one out); it is stored only if newer than every
stored release of its name.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from .. import defaults
from ..errors import ReleaseError, StoreError
from .manifest import Manifest, Release, decode_manifest, validate_name

__all__ = ["Store", "MAGIC", "atomic_write", "read_release_file", "write_release_file"]

MAGIC = b"ZMQMREL2"
_HEADER = struct.Struct("<8sQQ")
_HEADER_V1 = struct.Struct("<8sQ")
_MAX_SIGNATURE = 1024


def atomic_write(path: Path, *parts: Any) -> None:
    """Write ``parts`` to ``path`` so that a crash leaves the old file or the whole new one:
    a temp file in the same directory, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_release_file(path: Path, release: Release) -> None:
    """Atomically write ``release`` to ``path``."""
    manifest, sig = release.manifest_bytes, release.signature
    atomic_write(path, _HEADER.pack(MAGIC, len(manifest), len(sig)), manifest, sig, *release.chunks)


def read_release_file(path: Path, limits: object = None) -> Release:
    """Read a release file (memory-mapped; chunks are views of the mapping)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _HEADER.size:
                raise ReleaseError(f"{path}: too short to be a release")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if data[:8] == MAGIC:
        _, mlen, slen = _HEADER.unpack_from(data, 0)
        pos = _HEADER.size
    elif data[:8] == b"ZMQMREL1":
        (_, mlen), slen, pos = _HEADER_V1.unpack_from(data, 0), 0, _HEADER_V1.size
    else:
        raise ReleaseError(f"{path}: not a zmqmodels release")
    if slen > _MAX_SIGNATURE or pos + mlen + slen > size:
        raise ReleaseError(f"{path}: header sizes exceed the file")
    view = memoryview(data)
    raw = view[pos:pos + mlen]
    m = decode_manifest(raw, limits)
    signature = bytes(view[pos + mlen:pos + mlen + slen])
    pos += mlen + slen
    if pos + m.compressed_bytes != size:
        raise ReleaseError(f"{path}: holds {size - pos} chunk bytes, manifest says {m.compressed_bytes}")
    chunks = []
    for n in m.chunk_sizes:
        chunks.append(view[pos:pos + n])
        pos += n
    return Release(m, chunks, raw, signature)


class Store:
    """A directory of releases. Safe to share between processes."""

    def __init__(self, root: str | os.PathLike[str], *, retain: int = defaults.RETAIN_PER_NAME) -> None:
        self.root = Path(root)
        self.retain = retain
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store {self.root}: {exc.strerror or exc}") from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store {self.root} is not writable")

    def writable(self) -> str:
        """"" if a 4 KiB file can be written and removed in the store now, else why not (a
        full or read-only filesystem): what a readiness probe asks."""
        probe = self.root / ".ready-probe"
        try:
            with open(probe, "wb") as f:
                f.write(bytes(4096))
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as exc:
            probe.unlink(missing_ok=True)
            return f"store {self.root} is not writable: {exc.strerror or exc}"
        return ""

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def seqs(self, name: str) -> list[int]:
        """Stored seqs of ``name``, oldest first (temp files of interrupted writes are skipped)."""
        d = self.root / validate_name(name)
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.glob("*.zmr") if p.stem.isdigit())

    def path(self, name: str, seq: int) -> Path:
        return self.root / validate_name(name) / f"{seq:012d}.zmr"

    def manifests(self, name: str) -> list[Manifest]:
        return [self.read(name, s).manifest for s in self.seqs(name)]

    def latest(self, name: str) -> Release | None:
        seqs = self.seqs(name)
        return self.read(name, seqs[-1]) if seqs else None

    def read(self, name: str, seq: int) -> Release:
        path = self.path(name, seq)
        if not path.exists():
            raise StoreError(f"no release {name} seq {seq} in {self.root}")
        return read_release_file(path)

    def find(self, name: str, label_or_seq: str) -> Release:
        """The newest release of ``name`` whose label is ``label_or_seq``, or whose seq it is."""
        for seq in reversed(self.seqs(name)):
            r = self.read(name, seq)
            if r.manifest.label == label_or_seq or str(seq) == label_or_seq:
                return r
        raise StoreError(f"no stored release of {name} with label or seq {label_or_seq!r}")

    def reserve(self, name: str) -> int:
        """Hand out the next seq of ``name`` for a release that will be signed before it is put."""
        with self._locked(validate_name(name)) as d:
            last, newest = self._seq_state(d, name)
            seq = max(last, newest) + 1
            atomic_write(d / "SEQ", str(seq).encode())
        return seq

    def raise_floor(self, name: str, seq: int) -> int:
        """Make the next seq of ``name`` greater than ``seq`` (nodes already hold ``seq``: a store
        restored from an old backup, or a new hub); return the floor it had (== ``seq``: none
        was needed)."""
        with self._locked(validate_name(name)) as d:
            last, newest = self._seq_state(d, name)
            floor = max(last, newest)
            if floor < seq:
                atomic_write(d / "SEQ", str(seq).encode())
        return floor

    def active(self, name: str) -> int:
        """The newest seq of ``name`` active fleet-wide: the newest release not published
        staged, or a staged one activated for every node since (:meth:`activate`)."""
        marked = 0
        try:
            marked = int((self.root / validate_name(name) / "ACTIVE").read_text() or 0)
        except (OSError, ValueError):
            pass
        for seq in reversed(self.seqs(name)):
            if seq <= marked:
                break
            try:
                if not self.read(name, seq).manifest.staged:
                    return seq
            except (StoreError, ReleaseError):
                continue
        return marked

    def activate(self, name: str, seq: int) -> int:
        """Record that staged release ``seq`` of ``name`` is now active fleet-wide; return the
        active seq, which never goes down (a rollback publishes old content as a new seq)."""
        with self._locked(validate_name(name)) as d:
            try:
                marked = int((d / "ACTIVE").read_text() or 0)
            except (OSError, ValueError):
                marked = 0
            if seq > marked:
                atomic_write(d / "ACTIVE", str(seq).encode())
        return max(seq, self.active(name))

    def clean_temp(self) -> list[Path]:
        """Remove the temp files of writes a crash interrupted; return them."""
        gone = [p for p in self.root.glob("*/.tmp-*") if p.is_file()]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone

    def _seq_state(self, d: Path, name: str) -> tuple[int, int]:
        """(highest seq handed out, per the SEQ file; newest seq stored), read under the lock."""
        seq_file = d / "SEQ"
        try:
            last = int(seq_file.read_text() or 0) if seq_file.exists() else 0
        except ValueError:
            raise StoreError(f"{seq_file} is damaged") from None
        return last, max(self.seqs(name), default=0)

    def put(self, release: Release, *, reuse_label: bool = True) -> Release:
        """Store ``release``; return it as stored. A release with ``seq`` 0 (unsigned) gets the
        next seq of its name; one with a seq (signed: the seq is part of what is signed) is
        stored as it is, byte for byte, if that seq is newer than every stored one. Unless
        ``reuse_label``, a label already on a stored release of the name is refused
        (``rollback --to LABEL`` would find only the newest)."""
        name = validate_name(release.manifest.name)
        with self._locked(name) as d:
            last, newest = self._seq_state(d, name)
            seq = release.manifest.seq
            if seq == 0:
                if release.signature:
                    raise StoreError(f"a signed release of {name} must carry its seq (reserve one)")
                seq = max(last, newest) + 1
                stored = Release(msgspec.structs.replace(release.manifest, seq=seq), release.chunks)
            elif seq <= newest:
                raise StoreError(f"{name} seq {seq} is not newer than the stored seq {newest}: "
                                 "an old release cannot be published again (roll back instead)")
            else:
                stored = release
            label = release.manifest.label
            same = [m.seq for m in self.manifests(name) if m.label == label] if label and not reuse_label \
                else []
            if same:
                raise ReleaseError(f"label {label!r} is already on {name} seq {same[-1]}: give another "
                                   "label, or reuse it on purpose (--reuse-label)")
            atomic_write(d / "SEQ", str(max(seq, last)).encode())
            write_release_file(self.path(name, seq), stored)
            self._prune(name)
        return stored

    def _prune(self, name: str) -> None:
        """Keep every release whose content is among the newest ``retain`` distinct archives:
        a rollback (old content under a new seq) does not push out the release it restored."""
        if self.retain <= 0:
            return
        kept: list[str] = []
        for seq in reversed(self.seqs(name)):
            try:
                sha = self.read(name, seq).manifest.archive_sha256
            except (StoreError, ReleaseError):
                continue
            if sha in kept:
                continue
            if len(kept) < self.retain:
                kept.append(sha)
            else:
                self.path(name, seq).unlink(missing_ok=True)

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        d = self.root / name
        try:
            d.mkdir(exist_ok=True)
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield d
        finally:
            os.close(fd)
