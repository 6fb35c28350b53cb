"""The node's local cache: the last validated release of each model, ready to load by path.

Layout: ``DIR/<name>/<seq:012d>.pt`` (the TorchScript archive) beside ``<seq:012d>.manifest``
(its msgpack manifest, byte for byte as received) and ``<seq:012d>.sig`` (its signature, when
signed). All are written atomically, the manifest last, so a manifest names a whole archive.
On restart the signature and the archive's sha256 are checked again before anything loads it.
A release published *staged* is cached like any other but served only once activated, which
an empty ``<seq:012d>.active`` marker records (so a restarted node serves what it served).

Before a worker loads an archive it calls :meth:`Cache.check`: the archive's (inode, mtime,
size) against the stamp written when the verified bytes were stored (``.stamp``), and a full
sha256 when they differ; a file changed since it was verified is never loaded. One node uses
a cache directory at a time (:meth:`Cache.lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from ..errors import IntegrityError, ReleaseError, StoreError
from .manifest import Manifest, decode_manifest, encode_manifest, validate_name
from .signing import Trust
from .store import atomic_write

__all__ = ["Cache"]

log = logging.getLogger("zmqmodels.cache")


class Cache:
    def __init__(self, root: str | os.PathLike[str], *, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep
        self._signatures: dict[tuple[str, int], tuple[list[Any], Any]] = {}
        self._lock_file: IO[str] | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create cache {self.root}: {exc.strerror or exc}") from exc

    def path(self, name: str, seq: int) -> Path:
        return self.root / validate_name(name) / f"{seq:012d}.pt"

    def put(self, manifest: Manifest, archive: Any, raw: Any = None, signature: bytes = b"") -> Path:
        """Write a verified archive, its signature and its manifest (``raw``: the bytes as
        received; None re-encodes ``manifest``); return the archive's path."""
        d = self.root / validate_name(manifest.name)
        try:
            d.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot write cache {d}: {exc.strerror or exc}") from exc
        path = self.path(manifest.name, manifest.seq)
        atomic_write(path, archive)
        if signature:
            atomic_write(path.with_suffix(".sig"), signature)
        else:
            path.with_suffix(".sig").unlink(missing_ok=True)
        atomic_write(path.with_suffix(".manifest"), encode_manifest(manifest) if raw is None else raw)
        self._stamp(path)
        serving = self.newest_active(manifest.name)
        for old in self.seqs(manifest.name)[: -self.keep]:
            if old != serving:  # staged releases never push out the one being served
                self.discard(manifest.name, old)
        return path

    def free_bytes(self) -> int:
        """Bytes free to this process on the cache's file system (0 if it cannot be asked)."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def signature(self, name: str, seq: int) -> tuple[list[Any], Any]:
        """``(inputs, outputs)`` of cached release ``seq``'s manifest (``([], None)`` if it
        cannot be read); remembered, as a release's manifest never changes."""
        key = (name, seq)
        sig = self._signatures.get(key)
        if sig is None:
            try:
                m = decode_manifest(self.path(name, seq).with_suffix(".manifest").read_bytes())
                sig = self._signatures[key] = (m.inputs, m.outputs)
            except (OSError, ReleaseError):
                return [], None
            while len(self._signatures) > 64:
                del self._signatures[next(iter(self._signatures))]
        return sig

    def activate(self, name: str, seq: int) -> None:
        """Staged release ``seq`` is to be served (kept across restarts)."""
        atomic_write(self.path(name, seq).with_suffix(".active"), b"")

    def is_active(self, m: Manifest) -> bool:
        return not m.staged or self.path(m.name, m.seq).with_suffix(".active").exists()

    def newest_active(self, name: str) -> int:
        """The newest cached seq of ``name`` that may be served (manifests read, not verified)."""
        for seq in reversed(self.seqs(name)):
            try:
                raw = self.path(name, seq).with_suffix(".manifest").read_bytes()
                if self.is_active(decode_manifest(raw)):
                    return seq
            except (OSError, ReleaseError):
                continue
        return 0

    def discard(self, name: str, seq: int) -> None:
        """Forget a release that failed to load, so no restarted worker picks it up."""
        self.path(name, seq).with_suffix(".stamp").unlink(missing_ok=True)
        self.path(name, seq).with_suffix(".manifest").unlink(missing_ok=True)
        self.path(name, seq).with_suffix(".sig").unlink(missing_ok=True)
        self.path(name, seq).with_suffix(".active").unlink(missing_ok=True)
        self.path(name, seq).unlink(missing_ok=True)

    @contextlib.contextmanager
    def newest_archive(self, name: str) -> Iterator[memoryview | None]:
        """The newest cached archive of ``name``, mapped read-only (None: none, or unreadable),
        for a delta to reuse spans of. Not checked here: every span taken is checked against
        the new manifest's digest, so a damaged file costs a fetch, never a wrong byte."""
        seqs = self.seqs(name)
        try:
            f = open(self.path(name, seqs[-1]), "rb") if seqs else None  # noqa: SIM115 (closed below)
        except OSError:
            f = None
        if f is None or os.fstat(f.fileno()).st_size == 0:
            if f is not None:
                f.close()
            yield None
            return
        with f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                yield view
            finally:
                view.release()

    def seqs(self, name: str) -> list[int]:
        d = self.root / validate_name(name)
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.glob("*.manifest") if p.stem.isdigit())

    def latest(self, name: str, *, verify: bool = True, exclude: Collection[int] = (),
               trust: Trust | None = None, staged: bool = False) -> tuple[Manifest, Path] | None:
        """The newest cached release of ``name`` (not in ``exclude``) whose manifest reads and,
        with ``verify``, whose signature ``trust`` accepts and whose archive matches its
        sha256. A damaged or untrusted entry is discarded, so whoever looks next (a worker
        that relies on this check) cannot pick it up. Staged releases not activated are
        skipped unless ``staged``."""
        for seq in reversed(self.seqs(name)):
            if seq in exclude:
                continue
            path = self.path(name, seq)
            try:
                raw = path.with_suffix(".manifest").read_bytes()
                m = decode_manifest(raw)
                if not staged and not self.is_active(m):
                    continue
                if verify:
                    sig = path.with_suffix(".sig")
                    (trust or Trust()).verify(m, raw, sig.read_bytes() if sig.exists() else b"")
                    self.verify(m, path)
                    self._stamp(path)  # hashed now: workers need not hash it again
                return m, path
            except (OSError, ReleaseError) as exc:
                log.warning("cache: discarding %s seq %d: %s", name, seq, exc)
                self.discard(name, seq)  # fall back to the one before it
        return None

    def startup(self, name: str, *, trust: Trust | None = None
                ) -> tuple[tuple[Manifest, Path] | None, Manifest | None]:
        """What a node starting on this cache serves of ``name`` and what it holds: the newest
        verified entry; if that one is staged and not activated, it is held (served once the
        hub activates it) and the newest activated one below it is served. The one rule every
        starter follows (the node, the embedded subscriber, the C++ node's ``Cache::startup``)."""
        top = self.latest(name, trust=trust, staged=True)
        if top is None or self.is_active(top[0]):
            return top, None
        return self.latest(name, trust=trust, exclude={top[0].seq}), top[0]

    def servable(self, name: str, exclude: Collection[int] = ()) -> Iterator[tuple[Manifest, Path]]:
        """The entries of ``name`` that may be served (staged ones once activated), newest
        first, without hashing them (a worker checks each against its stamp as it loads it); an
        entry whose manifest does not read is discarded."""
        for seq in reversed(self.seqs(name)):
            if seq in exclude:
                continue
            path = self.path(name, seq)
            try:
                m = decode_manifest(path.with_suffix(".manifest").read_bytes())
            except (OSError, ReleaseError) as exc:
                log.warning("cache: discarding %s seq %d: %s", name, seq, exc)
                self.discard(name, seq)
                continue
            if self.is_active(m):
                yield m, path

    def lock(self) -> None:
        """Hold this directory for this process (released when it exits): a second node given
        the same ``--cache`` is refused with one line instead of sharing it silently."""
        import fcntl

        f = open(self.root / ".lock", "a+")  # noqa: SIM115 (held open for the process's life)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise StoreError(f"cache {self.root} is in use by {holder}: "
                             "give each node its own --cache") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        f = self._lock_file
        if f is not None:
            f.close()
            self._lock_file = None

    def check(self, m: Manifest, path: Path) -> None:
        """Make sure ``path`` still holds the verified archive of ``m`` before it is loaded:
        cheap when the file is as it was stored, a full sha256 otherwise (then re-stamped).
        Raises :class:`IntegrityError` (and discards the entry) if it does not match."""
        try:
            st = path.stat()
            stamp = path.with_suffix(".stamp").read_text().split()
        except OSError:
            stamp = []
            st = None
        if st is not None and stamp == [str(st.st_ino), str(st.st_mtime_ns), str(st.st_size)]:
            return
        try:
            self.verify(m, path)
        except (OSError, IntegrityError) as exc:
            self.discard(m.name, m.seq)
            raise IntegrityError(f"cached {m.name} seq {m.seq} is damaged ({exc}); discarded") from None
        self._stamp(path)

    def _stamp(self, path: Path) -> None:
        st = path.stat()
        try:
            atomic_write(path.with_suffix(".stamp"), f"{st.st_ino} {st.st_mtime_ns} {st.st_size}".encode())
        except StoreError:
            pass  # no stamp: the next check hashes the whole archive instead

    @staticmethod
    def verify(m: Manifest, path: Path) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        if h.hexdigest() != m.archive_sha256:
            raise IntegrityError(f"cached {path} does not match its manifest")
