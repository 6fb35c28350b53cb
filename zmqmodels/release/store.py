"""Durable releases on disk.

Layout: ``ROOT/<name>/<seq:012d>.zmr``, one file per release (integers little-endian)::

    b"ZMQMREL2" | u64 manifest length | u64 signature length | manifest | signature | chunks

(``ZMQMREL1`` files, without the signature fields, still read as unsigned.) The manifest is
kept byte for byte as signed or received.

Writes go to a temp file in the same directory, are fsynced, renamed into place and the
directory fsynced, so a crash leaves either a whole release or none. ``seq`` is assigned
under an exclusive lock (``flock``) from the records in ``ROOT/<name>/`` (``SEQ``, ``ACTIVE``,
``PINS``: :mod:`zmqmodels.release.catalog`), so it is strictly increasing per name even
across processes on one machine. Several machines share a store in S3
(:mod:`zmqmodels.release.s3`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import defaults
from ..errors import ReleaseError, StoreError
from .catalog import Catalog, Retention
from .manifest import Manifest, Release, decode_manifest, validate_name

__all__ = ["Store", "open_store", "MAGIC", "atomic_write", "read_release_file", "write_release_file"]

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


class Store(Catalog):
    """A directory of releases. Safe to share between processes on one machine."""

    def __init__(self, root: str | os.PathLike[str], *, retain: int = defaults.RETAIN_PER_NAME,
                 retention: Retention | None = None) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.retention = retention or Retention(retain)
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

    def location(self, name: str, seq: int) -> str:
        return str(self.path(name, seq))

    def manifest(self, name: str, seq: int) -> Manifest:
        return self.read(name, seq).manifest

    def read(self, name: str, seq: int) -> Release:
        path = self.path(name, seq)
        if not path.exists():
            raise StoreError(f"no release {name} seq {seq} in {self.root}")
        return read_release_file(path)

    def served(self, stored: Release) -> Release:
        return self.read(stored.manifest.name, stored.manifest.seq)

    def clean_temp(self) -> list[str]:
        """Remove the temp files of writes a crash interrupted; return them."""
        gone = [p for p in self.root.glob("*/.tmp-*") if p.is_file()]
        for p in gone:
            p.unlink(missing_ok=True)
        return [str(p) for p in gone]

    def _newest_listed(self, name: str) -> int:
        return max(self.seqs(name), default=0)

    def _record(self, name: str, record: str) -> bytes | None:
        try:
            return (self.root / name / record).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.root / name / record}: {exc.strerror or exc}") from exc

    def _update(self, name: str, record: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        with self._locked(validate_name(name)) as d:
            old = self._record(name, record)
            new = change(old)
            if new is None:
                return old
            atomic_write(d / record, new)
        return new

    def _write(self, release: Release, prepared: Any = None) -> None:
        write_release_file(self.path(release.manifest.name, release.manifest.seq), release)

    def _delete(self, name: str, seq: int) -> None:
        self.path(name, seq).unlink(missing_ok=True)

    @contextmanager
    def _putting(self, name: str) -> Iterator[None]:
        with self._locked(name):
            yield

    @contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """An exclusive lock on ``name``'s directory; re-entrant within one thread (a put holds
        it while it updates the SEQ record)."""
        d = self.root / name
        held = getattr(self._held, "names", None)
        if held is None:
            held = self._held.names = set()
        key = (str(self.root), name)
        if key in held:
            yield d
            return
        try:
            d.mkdir(exist_ok=True)
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write to store {self.root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held.add(key)
            yield d
        finally:
            held.discard(key)
            os.close(fd)

    _held = threading.local()


def open_store(spec: str | os.PathLike[str], *, retention: Retention | None = None) -> Catalog:
    """``s3://BUCKET/PREFIX``: an :class:`~zmqmodels.release.s3.S3Store`; anything else: a
    directory (:class:`Store`)."""
    if str(spec).startswith("s3://"):
        from .s3 import S3Store

        return S3Store(str(spec), retention=retention)
    return Store(spec, retention=retention)
