"""The hub's store side: what a publish, rollback, reserve or listing does to the store.

Runs on the hub's store executor (or the caller's thread for the in-process API), never on
its I/O thread: decoding a large manifest, hashing every chunk and writing a release must not
stall fetches or heartbeats. It also keeps the store's numbering ahead of what the fleet holds
(:meth:`ReleaseDesk.raise_floor`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .. import protocol as P
from ..defaults import Limits
from ..errors import ReleaseError, SignatureError, ZmqModelsError
from ..release.catalog import Catalog
from ..release.manifest import Manifest, Release, decode_manifest, rollback_manifest
from ..release.patch import make_patches
from ..release.signing import SigningKey, Trust

__all__ = ["ReleaseDesk"]

log = logging.getLogger("zmqmodels.hub")


class ReleaseDesk:
    """``held(name)`` is the highest seq of ``name`` the hub's nodes have reported."""

    def __init__(self, store: Catalog, limits: Limits, trust: Trust, signing_key: SigningKey | None,
                 held: Callable[[str], int]) -> None:
        self.store, self.limits, self.trust, self.signing_key = store, limits, trust, signing_key
        self._held = held
        self._notes: dict[str, str] = {}  # name -> what the next PUBLISHED reply should say
        self._lock = threading.Lock()

    def note(self, name: str) -> str:
        """What the publisher of ``name`` should be told (once), e.g. a raised seq floor."""
        with self._lock:
            return self._notes.pop(name, "")

    def raise_floor(self, name: str) -> None:
        """Nodes already hold a seq above this store's newest (a store restored from backup, a
        new hub): move the store past it, or nodes would drop what it publishes as old."""
        held = self._held(name)
        if not held:
            return
        floor = self.store.raise_floor(name, held)
        if floor < held:
            note = (f"the store's newest {name} seq was {floor} but nodes hold seq {held}: "
                    f"numbering continues after {held}")
            log.warning("%s", note)
            with self._lock:
                self._notes[name] = note

    def _said_pruned(self, name: str, pruned: list[int]) -> None:
        """The publisher hears what retention removed to make room (the store logged it)."""
        if not pruned:
            return
        said = (f"retention pruned {name} seq {', '.join(map(str, pruned))} (keeps "
                f"{self.store.retention.describe()}, the active, staged and pinned ones; "
                "`zmqmodels pin` keeps one)")
        with self._lock:
            self._notes[name] = "; ".join(filter(None, (self._notes.get(name, ""), said)))

    def holdings(self) -> Iterator[tuple[Release, int, dict[int, bool]]]:
        """Per stored model: its newest release, the seq active fleet-wide, and each stored seq
        with whether it was published staged (what the hub's core starts from)."""
        for name in self.store.names():
            latest = self.store.latest(name)
            if latest is not None:
                yield latest, self.store.active(name), {m.seq: m.staged for m in self.store.manifests(name)}

    def seal(self, release: Release) -> Release:
        """Sign an unsigned release with the hub's key, as the next seq (the in-process API)."""
        if release.signature or self.signing_key is None:
            return release
        self.raise_floor(release.manifest.name)
        return self.signing_key.seal(release, self.store.reserve(release.manifest.name))

    def put(self, raw: Any, chunks: Sequence[Any], signature: bytes, *, staged: bool = False,
            reuse_label: bool = False) -> Release:
        """Decode (once, here), check and store a release; return it as stored (mapped).
        ``staged``: it is to be rolled out in waves, so it must have been published staged.
        A label already on a stored release of the model is refused unless ``reuse_label``
        (``rollback --to LABEL`` would otherwise find only the newest of them)."""
        m = decode_manifest(raw, self.limits)
        self.trust.verify(m, raw, signature)  # before anything is hashed or written

        if staged and not m.staged:
            raise ReleaseError(f"{m.name}: a rollout in waves needs a release built staged "
                               "(zmqmodels.release.manifest.stage_release, before it is signed)")
        if not m.seq:
            self.raise_floor(m.name)
        if len(chunks) != m.chunk_count:
            raise ReleaseError(f"{len(chunks)} chunks, manifest says {m.chunk_count}")
        checked = Release(m, chunks, raw, signature)
        checked.verify()  # every chunk and the archive sha256, streamed
        before = self.store.latest(m.name)
        put = self.store.put(checked, reuse_label=reuse_label)
        self._said_pruned(m.name, put.pruned)
        stored = self.store.served(put.release)
        try:
            patches = make_patches(before, stored)
        except ZmqModelsError as exc:  # the previous release's file: the plain chunks go out
            log.warning("%s seq %d: no patches against seq %d: %s", m.name, m.seq, before.manifest.seq, exc)
            patches = {}
        return dataclasses.replace(stored, patches=patches)

    def rollback(self, name: str, to: str, signed: tuple[Any, bytes] | None = None) -> Release:
        """Store ``name``'s release ``to`` (a label or seq) again under a new seq. ``signed``:
        ``(manifest bytes, signature)`` made by the publisher for this rollback."""
        if signed is None:
            self.raise_floor(name)
        old = self.store.find(name, to)
        if signed is not None:
            raw, signature = signed
            m = decode_manifest(raw, self.limits)
            if _content(m) != _content(old.manifest):
                raise ReleaseError(f"the signed rollback manifest does not describe {name} {to!r}")
            self.trust.verify(m, raw, signature)
            again = Release(m, old.chunks, raw, signature)
        else:
            again = Release(rollback_manifest(old.manifest), old.chunks)
            if self.signing_key is not None:
                again = self.signing_key.seal(again, self.store.reserve(name))
            elif self.trust.required:
                raise SignatureError("this hub takes signed releases only: roll back with a signing key")
        put = self.store.put(again)
        self._said_pruned(name, put.pruned)
        return self.store.served(put.release)

    def reserve(self, req: P.Reserve) -> tuple[str, int, Any]:
        self.raise_floor(req.name)
        base = self.store.find(req.name, req.base).manifest_bytes if req.base else b""
        return req.name, self.store.reserve(req.name), base

    def listing(self, name: str) -> tuple[list[Manifest], dict[str, list[int]]]:
        """Every stored release of ``name`` (of every model if empty), oldest first, and the
        pinned seqs of each model."""
        names = [name] if name else self.store.names()
        if name and not self.store.seqs(name):
            raise ReleaseError(f"the hub stores no release of {name!r}")
        return [m for n in names for m in self.store.manifests(n)], {n: self.store.pins(n) for n in names}

    def pin(self, req: P.Pin) -> P.Pinned:
        seq = self.store.pin(req.name, req.to, on=req.on)
        return P.Pinned(req.name, seq, self.store.pins(req.name))


def _content(m: Manifest) -> tuple[Any, ...]:
    """What must match for a manifest to describe stored chunks."""
    return (m.name, m.archive_sha256, m.archive_bytes, m.compressed_bytes, m.codec, m.chunk_bytes,
            m.chunk_sizes, m.chunk_xxh3)
