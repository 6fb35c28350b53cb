"""Serving releases downstream, sans I/O: the one set of rules the hub and every relay answer
fetches and beat by (docs/protocol.md §Fetch, §Heartbeat).

- FETCH_MANIFEST of ``seq`` (0: the newest) -> the manifest and its signature, or ERROR
  ``not_found``.
- FETCH_CHUNKS -> one CHUNK per index asked, in order; more than ``fetch_credit`` indexes is
  ERROR ``too_large``; a seq not held, seq 0, or an index out of range is ERROR ``not_found``
  (with the indexes, so the asker frees their credit). A relay still receiving the release
  answers the chunks it has and each other one when it arrives (:attr:`Answer.pending`).
- Deltas: a release whose manifest gives ``chunk_raw_xxh3`` is broadcast without the chunks
  the sender's previous release of the model had byte for byte (:func:`same_chunks`);
  receivers reuse theirs or fetch them.
- Beats: the sender's own beat (with the relays it came through), then one per model naming
  the newest release it holds **whole** (never one still being sent: a beat naming a release
  tells downstream every chunk of it was sent before) and the fleet-wide active seq.

Actions out: :class:`Reply` (frames for one peer) and :class:`Broadcast` (frames for the PUB
socket under a model's topic, "" for the sender's own beat).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import protocol as P
from ..defaults import Limits
from ..release.manifest import Manifest

__all__ = ["Servable", "Reply", "Broadcast", "Answer", "ReleaseServer", "same_chunks"]


class Servable(Protocol):
    """A release as the server answers from it: a hub's stored :class:`~zmqmodels.release.manifest.Release`
    or a relay's :class:`~zmqmodels.core.forward.Carried` (``chunks[i]`` None: not here yet)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def manifest_bytes(self) -> Any: ...

    @property
    def signature(self) -> bytes: ...

    @property
    def chunks(self) -> Sequence[Any]: ...


@dataclass(frozen=True)
class Reply:
    peer: bytes
    frames: list[Any]


@dataclass(frozen=True)
class Broadcast:
    name: str  # the topic's model ("" = the sender's own beat)
    frames: list[Any]


@dataclass
class Answer:
    """What a fetch gets now (``replies``), and the indexes of chunks not here yet."""

    replies: list[Reply] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)


class ReleaseServer:
    """``who`` names the sender in error messages ("hub", "relay")."""

    def __init__(self, who: str, limits: Limits | None = None, stats: Counter[str] | None = None) -> None:
        self.who = who
        self.limits = limits or Limits()
        self.stats: Counter[str] = stats if stats is not None else Counter()

    def manifest(self, peer: bytes, req: P.FetchManifest, rel: Servable | None) -> list[Reply]:
        """Answer FETCH_MANIFEST with ``rel``, the release the owner found for it (None: none)."""
        if rel is None:
            what = f"seq {req.seq}" if req.seq else "release"
            return [self.error(peer, "not_found", f"{self.who} has no {what} of {req.name!r}", req)]
        self.stats["fetch_manifest"] += 1
        return [Reply(peer, P.pack(P.ManifestFrames(), rel.manifest_bytes, rel.signature))]

    def over_credit(self, peer: bytes, req: P.FetchChunks) -> list[Reply]:
        """ERROR ``too_large`` if ``req`` asks for more chunks than the credit (checked before
        the owner looks for the release)."""
        n = len(req.indices)
        if n <= self.limits.fetch_credit:
            return []
        return [self.error(peer, "too_large", f"{n} chunks asked, credit is {self.limits.fetch_credit}", req)]

    def chunks(self, peer: bytes, req: P.FetchChunks, rel: Servable | None) -> Answer:
        """Answer FETCH_CHUNKS with ``rel`` (None: not held)."""
        refused = self.over_credit(peer, req)
        if refused:
            return Answer(refused)
        if rel is None or req.seq == 0 or any(i >= rel.manifest.chunk_count for i in req.indices):
            out_of_range = rel is not None and req.seq != 0
            why = "chunk index out of range" if out_of_range else f"{self.who} no longer has"
            code = "bad_message" if out_of_range else "not_found"
            return Answer([self.error(peer, code, f"{why} {req.name!r} seq {req.seq}", req)])
        answer = Answer()
        for i in req.indices:
            payload = rel.chunks[i]
            if payload is None:
                answer.pending.append(i)
            else:
                answer.replies.append(Reply(peer, P.pack(P.ChunkHeader(req.name, req.seq, i), payload)))
        self.stats["fetch_chunks"] += len(req.indices)
        return answer

    def error(self, peer: bytes, code: str, message: str,
              req: P.FetchManifest | P.FetchChunks | None = None, *, retryable: bool = False) -> Reply:
        self.stats[f"error_{code}"] += 1
        name, seq = (req.name, req.seq) if req is not None else ("", 0)
        indices = list(req.indices) if isinstance(req, P.FetchChunks) else []
        return Reply(peer, P.pack(P.ErrorReply(code, message[:1000], name, seq, retryable, indices=indices)))

    @staticmethod
    def beats(sender: str, whole: Mapping[str, Manifest], active: Mapping[str, int],
              path: Sequence[str] = ()) -> list[Broadcast]:
        """The sender's beat, then one per model it holds whole (sorted by name)."""
        out = [Broadcast("", P.pack(P.Heartbeat(hub=sender, path=list(path))))]
        for name, m in sorted(whole.items()):
            out.append(Broadcast(name, P.pack(P.Heartbeat(hub=sender, name=name, seq=m.seq,
                                                          sha256=m.archive_sha256, label=m.label,
                                                          active=active.get(name, 0)))))
        return out


def same_chunks(base: Manifest, m: Manifest) -> frozenset[int]:
    """The chunks of ``m`` that ``base`` has byte for byte (same span, same compressed bytes):
    a release that says receivers may reuse spans (``chunk_raw_xxh3``) need not send those."""
    if not m.chunk_raw_xxh3 or base.chunk_bytes != m.chunk_bytes or base.codec != m.codec:
        return frozenset()
    n = min(base.chunk_count, m.chunk_count)
    return frozenset(i for i in range(n) if base.chunk_xxh3[i] == m.chunk_xxh3[i]
                     and base.chunk_sizes[i] == m.chunk_sizes[i]
                     and (not base.chunk_raw_xxh3 or m.same_span(base, i)))
