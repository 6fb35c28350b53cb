"""The node's local cache: the last validated release of each model, ready to load by path.

Layout: ``DIR/<name>/<seq:012d>.pt`` (the TorchScript archive) beside ``<seq:012d>.manifest``
(its msgpack manifest). Both are written atomically, the manifest last, so a manifest names
a whole archive. On restart the archive's sha256 is checked again before anything loads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .errors import IntegrityError, ReleaseError, StoreError
from .release import Manifest, decode_manifest, encode_manifest, validate_name
from .store import atomic_write

__all__ = ["Cache"]


class Cache:
    def __init__(self, root: str | os.PathLike[str], *, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create cache {self.root}: {exc.strerror or exc}") from exc

    def path(self, name: str, seq: int) -> Path:
        return self.root / validate_name(name) / f"{seq:012d}.pt"

    def put(self, manifest: Manifest, archive: Any) -> Path:
        """Write a verified archive and its manifest; return the archive's path."""
        d = self.root / validate_name(manifest.name)
        d.mkdir(exist_ok=True)
        path = self.path(manifest.name, manifest.seq)
        atomic_write(path, archive)
        atomic_write(path.with_suffix(".manifest"), encode_manifest(manifest))
        for old in self.seqs(manifest.name)[: -self.keep]:
            self.path(manifest.name, old).unlink(missing_ok=True)
            self.path(manifest.name, old).with_suffix(".manifest").unlink(missing_ok=True)
        return path

    def discard(self, name: str, seq: int) -> None:
        """Forget a release that failed to load, so no restarted worker picks it up."""
        self.path(name, seq).with_suffix(".manifest").unlink(missing_ok=True)
        self.path(name, seq).unlink(missing_ok=True)

    def seqs(self, name: str) -> list[int]:
        d = self.root / validate_name(name)
        if not d.is_dir():
            return []
        return sorted(int(p.stem) for p in d.glob("*.manifest") if p.stem.isdigit())

    def latest(self, name: str, *, verify: bool = True,
               exclude: Collection[int] = ()) -> tuple[Manifest, Path] | None:
        """The newest cached release of ``name`` (not in ``exclude``) whose manifest reads and,
        with ``verify``, whose archive matches its sha256. A damaged entry is discarded, so
        whoever looks next (a worker that trusts this check) cannot pick it up."""
        for seq in reversed(self.seqs(name)):
            if seq in exclude:
                continue
            path = self.path(name, seq)
            try:
                m = decode_manifest(path.with_suffix(".manifest").read_bytes())
                if verify:
                    self.verify(m, path)
                return m, path
            except (OSError, ReleaseError, IntegrityError):
                self.discard(name, seq)  # fall back to the one before it
        return None

    @staticmethod
    def verify(m: Manifest, path: Path) -> None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
        if h.hexdigest() != m.archive_sha256:
            raise IntegrityError(f"cached {path} does not match its manifest")
