"""What every release store does, whatever holds its bytes (a directory, an S3 bucket).

A store keeps, per model name, immutable releases (one per seq) and three small records:

* ``SEQ``: ``{"next": highest seq handed out, "latest": newest seq stored}``. Every seq is
  claimed by one atomic update of this record (:func:`claim`) *before* the release is written,
  so two writers (two hubs on one bucket, two processes on one directory) can never store two
  releases under one seq, and a release is visible only once it is whole.
* ``ACTIVE``: the newest seq activated fleet-wide (staged releases; it never goes down).
* ``PINS``: seqs an operator pinned; retention never prunes them.

The atomic update is the backend's: an exclusive ``flock`` for a directory, a conditional
write (``If-Match`` / ``If-None-Match``) for S3. Everything else (seq rules, labels, what
retention keeps) is here once, as plain functions the tests drive directly.
"""

from __future__ import annotations

import abc
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from .. import defaults
from ..errors import ReleaseError, StoreError
from .manifest import Manifest, Release, validate_name

__all__ = ["Catalog", "Retention", "SeqState", "Stored", "claim", "to_prune"]

log = logging.getLogger("zmqmodels.store")


@dataclass(frozen=True)
class SeqState:
    """The ``SEQ`` record of one model."""

    next: int = 0  # the highest seq handed out (reserved or stored)
    latest: int = 0  # the newest seq stored

    @classmethod
    def decode(cls, raw: bytes | None) -> SeqState:
        if not raw:
            return cls()
        text = raw.decode().strip()
        if text.isdigit():  # a directory store written before the record was JSON
            return cls(int(text), 0)
        try:
            d = json.loads(text)
            return cls(int(d["next"]), int(d["latest"]))
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"the SEQ record {text[:60]!r} is damaged") from None

    def encode(self) -> bytes:
        return json.dumps({"next": self.next, "latest": self.latest}).encode()


def claim(state: SeqState, seq: int, newest: int = 0) -> tuple[SeqState, int]:
    """Claim ``seq`` for a release about to be stored (0: the next free one); return the new
    record and the seq. ``newest``: the newest seq the backend lists (a directory written before
    ``latest`` was recorded). A seq not newer than the newest stored one is refused: nodes would
    drop it as old."""
    latest = max(state.latest, newest)
    if seq == 0:
        seq = max(state.next, latest) + 1
    elif seq <= latest:
        raise StoreError(f"seq {seq} is not newer than the stored seq {latest}: an old release cannot "
                         "be published again (roll back instead), or another publisher stored a newer "
                         "one first (reserve a new seq and publish again)")
    return SeqState(max(state.next, seq), seq), seq


@dataclass(frozen=True)
class Retention:
    """What a store keeps of each model: the newest ``count`` distinct contents and every
    release younger than ``max_age_s`` (0 turns either rule off; both 0: keep everything).
    The active release, staged ones not yet active and pinned ones are always kept."""

    count: int = defaults.RETAIN_PER_NAME
    max_age_s: float = 0.0

    def describe(self) -> str:
        parts = [f"the newest {self.count}"] if self.count > 0 else []
        if self.max_age_s > 0:
            parts.append(f"those younger than {self.max_age_s:g}s")
        return " and ".join(parts) or "everything"


def to_prune(manifests: Iterable[Manifest], retention: Retention, *, active: int, pins: Iterable[int],
             now: float) -> list[int]:
    """The seqs retention removes, oldest first. A rollback (old content under a new seq) does
    not push out the release it restored: count is over distinct archives."""
    if retention.count <= 0 and retention.max_age_s <= 0:
        return []
    pinned = set(pins)
    kept: list[str] = []
    out = []
    for m in sorted(manifests, key=lambda m: -m.seq):
        fresh = m.archive_sha256 in kept or (0 < retention.count and len(kept) < retention.count)
        if fresh and m.archive_sha256 not in kept:
            kept.append(m.archive_sha256)
        young = retention.max_age_s > 0 and now - m.created_at < retention.max_age_s
        held = m.seq == active or (m.staged and m.seq > active) or m.seq in pinned
        if not (fresh or young or held):
            out.append(m.seq)
    return sorted(out)


class Stored(NamedTuple):
    release: Release  # as stored (its seq assigned)
    pruned: list[int]  # seqs retention removed to make room


class Catalog(abc.ABC):
    """The rules every store shares; a backend supplies listing, reading, writing and
    :meth:`_update` (an atomic read-modify-write of one small record)."""

    retention: Retention
    url: str  # what the store is called in messages and logs

    # -- the backend's part ---------------------------------------------------------------
    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every model name with a release stored."""

    @abc.abstractmethod
    def seqs(self, name: str) -> list[int]:
        """Stored seqs of ``name``, oldest first."""

    @abc.abstractmethod
    def manifest(self, name: str, seq: int) -> Manifest:
        """The manifest of stored release ``seq`` of ``name``."""

    @abc.abstractmethod
    def read(self, name: str, seq: int) -> Release:
        """Stored release ``seq`` of ``name``, chunks and all."""

    @abc.abstractmethod
    def location(self, name: str, seq: int) -> str:
        """Where release ``seq`` of ``name`` lies (a path, an s3:// URL), for messages."""

    @abc.abstractmethod
    def writable(self) -> str:
        """"" if the store can be written now, else why not (what a readiness probe asks)."""

    def clean_temp(self) -> list[str]:
        return []

    def served(self, stored: Release) -> Release:
        """What to serve a just-stored release from (a directory: its file's mapping, so the
        publish's buffers can go; elsewhere: the release as it is)."""
        return stored

    @abc.abstractmethod
    def _update(self, name: str, record: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Atomically replace record ``record`` of ``name`` by ``change(old)`` (None: leave it as
        it is); return the record as it is then."""

    @abc.abstractmethod
    def _record(self, name: str, record: str) -> bytes | None:
        """Record ``record`` of ``name`` as it is now (None: never written)."""

    @abc.abstractmethod
    def _write(self, release: Release, prepared: Any = None) -> None:
        """Store a release whose seq was claimed (nothing else can write that seq);
        ``prepared`` is what :meth:`_prepare` returned."""

    @abc.abstractmethod
    def _delete(self, name: str, seq: int) -> None:
        """Remove stored release ``seq`` of ``name`` (retention)."""

    @contextmanager
    def _putting(self, name: str) -> Iterator[None]:
        """Held around a whole put (a directory serializes them; S3 needs nothing)."""
        yield

    def _newest_listed(self, name: str) -> int:
        return 0

    # -- shared ------------------------------------------------------------------------------
    def manifests(self, name: str) -> list[Manifest]:
        out = []
        for seq in self.seqs(name):
            try:
                out.append(self.manifest(name, seq))
            except StoreError:  # pruned between the listing and the read
                continue
        return out

    def latest(self, name: str) -> Release | None:
        seqs = self.seqs(name)
        return self.read(name, seqs[-1]) if seqs else None

    def find_seq(self, name: str, label_or_seq: str) -> int:
        """The newest seq of ``name`` whose label is ``label_or_seq``, or that seq."""
        for m in reversed(self.manifests(name)):
            if m.label == label_or_seq or str(m.seq) == label_or_seq:
                return m.seq
        raise StoreError(f"no stored release of {name} with label or seq {label_or_seq!r}")

    def find(self, name: str, label_or_seq: str) -> Release:
        return self.read(name, self.find_seq(name, label_or_seq))

    def reserve(self, name: str) -> int:
        """Hand out the next seq of ``name`` for a release that will be signed before it is put."""
        newest = self._newest_listed(validate_name(name))

        def bump(raw: bytes | None) -> bytes:
            s = SeqState.decode(raw)
            return SeqState(max(s.next, s.latest, newest) + 1, s.latest).encode()
        return SeqState.decode(self._update(name, "SEQ", bump)).next

    def raise_floor(self, name: str, seq: int) -> int:
        """Make the next seq of ``name`` greater than ``seq`` (nodes already hold ``seq``: a store
        restored from an old backup, or a new hub); return the floor it had."""
        newest = self._newest_listed(validate_name(name))
        had: list[int] = []

        def lift(raw: bytes | None) -> bytes:
            s = SeqState.decode(raw)
            had.append(max(s.next, s.latest, newest))
            return SeqState(max(s.next, seq), s.latest).encode()
        self._update(name, "SEQ", lift)
        return had[-1]

    def active(self, name: str) -> int:
        """The newest seq of ``name`` active fleet-wide: the newest release not published
        staged, or a staged one activated for every node since (:meth:`activate`)."""
        marked = _int(self._record(validate_name(name), "ACTIVE"))
        for m in reversed(self.manifests(name)):
            if m.seq <= marked:
                break
            if not m.staged:
                return m.seq
        return marked

    def record(self, name: str, record: str) -> bytes | None:
        """A small record of ``name`` (``WAVE``: :mod:`zmqmodels.core.lease`) as it is now."""
        return self._record(validate_name(name), record)

    def update(self, name: str, record: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        """Atomically replace record ``record`` of ``name`` by ``change(old)`` (None: leave it);
        of writers racing, each sees the others' writes (a directory: a lock; S3: If-Match)."""
        return self._update(validate_name(name), record, change)

    def activate(self, name: str, seq: int) -> int:
        """Record that staged release ``seq`` of ``name`` is now active fleet-wide; return the
        active seq, which never goes down (a rollback publishes old content as a new seq)."""
        self._update(validate_name(name), "ACTIVE", lambda raw: str(max(seq, _int(raw))).encode())
        return max(seq, self.active(name))

    def pins(self, name: str) -> list[int]:
        raw = self._record(validate_name(name), "PINS")
        try:
            return sorted(int(s) for s in json.loads(raw)) if raw else []
        except (ValueError, TypeError):
            raise StoreError(f"the PINS record of {name} is damaged") from None

    def pin(self, name: str, label_or_seq: str, *, on: bool = True) -> int:
        """Pin (or unpin) a stored release of ``name``: retention never prunes a pinned one.
        Return its seq."""
        seq = self.find_seq(name, label_or_seq)

        def change(raw: bytes | None) -> bytes:
            now = set(json.loads(raw)) if raw else set()
            now = now | {seq} if on else now - {seq}
            return json.dumps(sorted(now)).encode()
        self._update(name, "PINS", change)
        log.info("store %s: %s seq %d %s", self.url, name, seq, "pinned" if on else "unpinned")
        return seq

    def unpin(self, name: str, label_or_seq: str) -> int:
        return self.pin(name, label_or_seq, on=False)

    def put(self, release: Release, *, reuse_label: bool = True) -> Stored:
        """Store ``release``; return it as stored and what retention pruned. A release with seq
        0 (unsigned) gets the next seq of its name; one with a seq (signed: the seq is part of
        what is signed) is stored byte for byte if that seq is newer than every stored one.
        Unless ``reuse_label``, a label already on a stored release of the name is refused
        (``rollback --to LABEL`` would find only the newest)."""
        m = release.manifest
        name = validate_name(m.name)
        if m.seq == 0 and release.signature:
            raise StoreError(f"a signed release of {name} must carry its seq (reserve one)")
        with self._putting(name):
            newest = self._newest_listed(name)
            claim(SeqState.decode(self._record(name, "SEQ")), m.seq, newest)  # an old seq: say so first
            if m.label and not reuse_label:
                same = [o.seq for o in self.manifests(name) if o.label == m.label]
                if same:
                    raise ReleaseError(f"label {m.label!r} is already on {name} seq {same[-1]}: give "
                                       "another label, or reuse it on purpose (--reuse-label)")
            prepared = self._prepare(release)
            got: list[int] = []

            def take(raw: bytes | None) -> bytes:
                state, seq = claim(SeqState.decode(raw), m.seq, newest)
                got.append(seq)
                return state.encode()
            self._update(name, "SEQ", take)
            seq = got[-1]
            stored = release if m.seq else Release(msgspec.structs.replace(m, seq=seq), release.chunks)
            self._write(stored, prepared)
            pruned = self.prune(name)
        return Stored(stored, pruned)

    def _prepare(self, release: Release) -> Any:
        """Before a seq is claimed: upload what does not depend on it (S3: the chunks)."""
        return None

    def prune(self, name: str, now: float | None = None) -> list[int]:
        """Apply the retention policy to ``name``; log and return what it removed."""
        manifests = self.manifests(name)
        gone = to_prune(manifests, self.retention, active=self.active(name), pins=self.pins(name),
                        now=time.time() if now is None else now)
        for seq in gone:
            self._delete(name, seq)
        if gone:
            log.info("store %s: pruned %s seq %s (keeping %s, the active, staged and pinned ones)",
                     self.url, name, ", ".join(map(str, gone)), self.retention.describe())
        return gone


def _int(raw: Any) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0
