"""Releases coming in from upstream, sans I/O: the intake and repair rules, written once for
a node's follower (:mod:`.assembly`) and a relay (:mod:`.forward`); the C++ follower
(``cpp/src/follower.cpp``) mirrors this module.

An :class:`Intake` keeps, per model, the one release being received (an :class:`Incoming`)
and what was asked of upstream. Its callers decide what a release means to them (a node
decompresses each chunk into an archive buffer, a relay keeps the payload as sent and passes
it on); the intake decides when to ask upstream for what:

- **Limits and trust** (:meth:`Intake.admit`): a manifest over the limits or without a
  trusted signature is refused before anything is allocated for it.
- **Gap**: the broadcast comes in index order on one pipe, so a chunk that skips indices
  means those were dropped: they are fetched at once, and nothing the broadcast has yet to
  bring. A missed manifest (a chunk or a beat naming a newer seq) is asked for.
- **End-of-broadcast beat**: the sender beats a release only after all its chunks, on the
  same pipe; once that beat arrives whatever is still missing was lost (a dropped tail).
- **Stall**: a broadcast silent for 2 s and 8 times its mean chunk interval
  (:class:`Pace`) is fetched without that marker. A slow link is not a loss: fetching what
  is on its way would double the sender's traffic (the milestone-2 repair storm).
- **Corrupt at source**: chunks fetched (not broadcast) that fail their digest
  ``CORRUPT_FETCHES_MAX`` times mean the sender's own copy is bad: the caller gives up on it.
- **Re-ask and credit**: at most ``fetch_credit`` chunks in flight; a request unanswered for
  ``fetch_timeout_s`` is asked again, as is a manifest; an upstream silent for its TTL is
  asked for every model's newest release.

Actions out: :class:`Send` (a message for upstream's ROUTER).
"""

from __future__ import annotations

import abc
import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .. import defaults
from .. import protocol as P
from ..defaults import Limits
from ..errors import IntegrityError, ProtocolError
from ..release.manifest import Manifest
from ..release.signing import Trust

__all__ = ["Pace", "Incoming", "Send", "Taken", "Intake", "next_fetch"]


@dataclass
class Pace:
    """How a release's broadcast is arriving: when a gap means loss, when silence a stall."""

    started: float
    received: int = 0  # chunks taken in
    next_bcast: int = 0  # the index the in-order broadcast brings next
    stalled: bool = False  # silent for longer than the pace allows: fetch everything missing
    broadcast_manifest: bool = True  # its chunks follow it on the same pipe (not a fetched one)

    def broadcast(self, index: int) -> bool:
        """A broadcast chunk arrived: True if it skipped indices (dropped: fetch them now)."""
        gap = index > self.next_bcast
        self.next_bcast = max(self.next_bcast, index + 1)
        return gap

    def stalls(self, now: float, last_progress: float, idle_s: float) -> bool:
        """No chunk for 8 x ``idle_s`` (2 s) or 8 x the mean interval so far, whichever is
        longer (a fetched manifest's chunks are not coming by broadcast: ``idle_s``)."""
        if not self.broadcast_manifest:
            return now - last_progress > idle_s
        mean = (last_progress - self.started) / self.received if self.received else 0.0
        return now - last_progress > defaults.STALL_FACTOR * max(idle_s, mean)

    def fetch_below(self, chunk_count: int) -> int:
        return chunk_count if self.stalled else self.next_bcast


def next_fetch(missing: set[int], requested: dict[int, float], now: float, credit: int,
               timeout_s: float, below: int | None = None) -> list[int]:
    """Credit-bounded repair: forget requests unanswered for ``timeout_s``, then ask for the
    lowest missing chunks (under ``below``) not in flight, keeping at most ``credit`` in
    flight; marks them requested at ``now``."""
    for i, asked in list(requested.items()):
        if now - asked > timeout_s:
            del requested[i]
    room = credit - len(requested)
    if room <= 0:
        return []
    want = [i for i in sorted(missing) if i not in requested and (below is None or i < below)][:room]
    for i in want:
        requested[i] = now
    return want


@dataclass
class Incoming(abc.ABC):
    """One release being received. Each receiver says what taking a chunk means
    (:meth:`accept`: a node decompresses it into its archive buffer, a relay keeps the payload
    as sent) and what letting the release go frees (:meth:`close`)."""

    manifest: Manifest
    raw: bytes  # the manifest as received (what its signature covers)
    signature: bytes
    started: float  # when its manifest was accepted
    missing: set[int] = field(init=False)
    requested: dict[int, float] = field(default_factory=dict)  # index -> when asked
    last_progress: float = field(init=False)
    repairing: bool = False
    corrupt_fetches: int = 0  # fetched (not broadcast) chunks that failed their digest
    fault: str = ""  # why the last chunk that failed was refused
    pace: Pace = field(init=False)
    # what this release cost the link: bytes_received, chunks_received/_fetched/_patched, and
    # bytes_duplicate (chunks that came when already held: a broadcast of a reused chunk)
    moved: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.missing = set(range(self.manifest.chunk_count))
        self.last_progress = self.started
        self.pace = Pace(self.started)

    @abc.abstractmethod
    def accept(self, index: int, payload: Any) -> None:
        """Take chunk ``index``; raise :class:`IntegrityError` if it fails its size or digest."""

    def accept_patch(self, index: int, payload: Any) -> None:
        """Take chunk ``index`` as a patch against the span held there; a receiver that holds
        no spans (a relay keeps chunks as sent) refuses it, and the chunk is fetched whole."""
        raise IntegrityError(f"chunk {index}: this receiver takes chunks whole, not patches")

    def close(self) -> None:  # noqa: B027 (an optional hook)
        """The release is let go (complete, superseded or abandoned); nothing by default."""


@dataclass(frozen=True)
class Send:
    """Send ``msg`` upstream (to the hub's or the upstream relay's ROUTER)."""

    msg: msgspec.Struct


class Taken(enum.Enum):
    """What became of a chunk (:meth:`Intake.chunk`)."""

    UNEXPECTED = "unexpected"  # no release of that seq is coming in
    DUPLICATE = "duplicate"
    TAKEN = "taken"
    COMPLETE = "complete"  # it was the last missing one: the release is whole (and detached)
    CORRUPT = "corrupt"  # failed its digest: asked for again
    CORRUPT_AT_SOURCE = "corrupt_at_source"  # fetched corrupt too often: detached, give up


class Intake:
    """Per model name: the release coming in (``coming``) and what was asked upstream."""

    def __init__(self, *, limits: Limits | None = None, trust: Trust | None = None,
                 stats: Counter[str] | None = None, repair_idle_s: float = defaults.REPAIR_IDLE_S,
                 hub_ttl_s: float = defaults.HUB_TTL_S,
                 fetch_timeout_s: float = defaults.FETCH_TIMEOUT_S) -> None:
        self.limits = limits or Limits()
        self.trust = trust or Trust()
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.repair_idle_s, self.hub_ttl_s, self.fetch_timeout_s = repair_idle_s, hub_ttl_s, fetch_timeout_s
        self.coming: dict[str, Incoming] = {}
        self._asked: dict[str, tuple[int, float]] = {}  # name -> (seq asked for, when)
        self.hub_seen = 0.0  # when upstream was last heard from (0: never)
        self._reasked = 0.0  # when its silence last made us ask again

    # -- manifests ---------------------------------------------------------------------------
    def admit(self, m: Manifest, raw: bytes, signature: bytes) -> None:
        """Check ``m`` before anything is allocated for it: :class:`LimitError` or
        :class:`SignatureError` if it must be refused."""
        m.check(self.limits)
        self.trust.verify(m, raw, signature)

    def begin(self, inc: Incoming, *, fetched: bool) -> None:
        """Receive ``inc`` (admitted), replacing whatever of its model was coming in."""
        self.drop(inc.manifest.name)
        inc.pace.broadcast_manifest = not fetched
        self.coming[inc.manifest.name] = inc

    def drop(self, name: str) -> Incoming | None:
        inc = self.coming.pop(name, None)
        if inc is not None:
            inc.close()
        return inc

    def coming_seq(self, name: str) -> int:
        inc = self.coming.get(name)
        return inc.manifest.seq if inc is not None else 0

    # -- asking upstream ---------------------------------------------------------------------
    def ask(self, name: str, seq: int, now: float, *, exact: bool = False) -> list[Send]:
        """Ask for the manifest of ``seq`` (0: the newest), unless that (or, unless ``exact``,
        a newer one) was asked for less than ``fetch_timeout_s`` ago."""
        asked = self._asked.get(name)
        if asked is not None and (asked[0] == seq if exact else asked[0] >= seq) \
                and now - asked[1] < self.fetch_timeout_s:
            return []
        self._asked[name] = (seq, now)
        self.stats["fetch_manifest"] += 1
        return [Send(P.FetchManifest(name, seq))]

    def answered(self, name: str) -> None:
        """Upstream answered a manifest fetch of ``name`` (a manifest or an error)."""
        self._asked.pop(name, None)

    def pump(self, inc: Incoming, now: float) -> list[Send]:
        """Keep up to ``fetch_credit`` missing chunks requested; re-ask ones that timed out."""
        want = next_fetch(inc.missing, inc.requested, now, self.limits.fetch_credit, self.fetch_timeout_s,
                          inc.pace.fetch_below(inc.manifest.chunk_count))
        if not want:
            return []
        self.stats["fetch_chunks"] += len(want)
        return [Send(P.FetchChunks(inc.manifest.name, inc.manifest.seq, want))]

    # -- events ------------------------------------------------------------------------------
    def chunk(self, hdr: P.ChunkHeader | P.PatchHeader, payload: Any, now: float, *,
              fetched: bool) -> tuple[Taken, list[Send]]:
        inc = self.coming.get(hdr.name)
        if inc is None or inc.manifest.seq != hdr.seq:
            self.stats["chunk_unexpected"] += 1
            return Taken.UNEXPECTED, []
        i = hdr.index
        if i >= inc.manifest.chunk_count:
            raise ProtocolError(f"chunk {i} of {hdr.name} seq {hdr.seq} out of range")
        if not fetched and inc.pace.broadcast(i):
            inc.repairing = True  # the broadcast skipped chunks: they were dropped
            self.stats["broadcast_gaps"] += 1
        inc.requested.pop(i, None)
        if i not in inc.missing:
            self.stats["chunk_duplicate"] += 1
            inc.moved["bytes_duplicate"] += len(payload)
            taken = Taken.DUPLICATE
        else:
            try:
                if isinstance(hdr, P.PatchHeader):
                    inc.accept_patch(i, payload)
                else:
                    inc.accept(i, payload)
            except IntegrityError as exc:
                inc.fault = str(exc)
                self.stats["chunk_corrupt"] += 1
                inc.corrupt_fetches += fetched
                if inc.corrupt_fetches >= defaults.CORRUPT_FETCHES_MAX:
                    del self.coming[hdr.name]  # the caller gives up on it (and closes it)
                    self.stats["corrupt_at_source"] += 1
                    return Taken.CORRUPT_AT_SOURCE, []
                inc.repairing = True
                taken = Taken.CORRUPT
            else:
                inc.missing.discard(i)
                inc.last_progress = now
                inc.pace.received += 1
                self.stats["bytes_received"] += len(payload)
                self.stats["chunks_fetched" if fetched else "chunks_broadcast"] += 1
                self.stats["chunks_patched"] += isinstance(hdr, P.PatchHeader)
                inc.moved.update(bytes_received=len(payload), chunks_received=1, chunks_fetched=int(fetched),
                                 chunks_patched=int(isinstance(hdr, P.PatchHeader)))
                if not inc.missing:
                    del self.coming[hdr.name]
                    self.stats["complete"] += 1
                    return Taken.COMPLETE, []
                taken = Taken.TAKEN
        return taken, (self.pump(inc, now) if inc.repairing else [])

    def beat(self, name: str, seq: int, now: float) -> list[Send]:
        """Upstream beat ``seq`` of ``name``: it sent every chunk of that release before."""
        inc = self.coming.get(name)
        if inc is not None and seq == inc.manifest.seq and not inc.pace.stalled and inc.missing:
            inc.pace.stalled = inc.repairing = True  # what is still missing was lost
            self.stats["repairs"] += 1
            return self.pump(inc, now)
        return []

    def error(self, err: P.ErrorReply) -> Incoming | None:
        """Upstream answered a fetch with an error: stop waiting for that answer. A release it
        no longer has is abandoned (a newer one is on its way): returned, detached."""
        self.answered(err.name)
        inc = self.coming.get(err.name)
        if inc is None or err.seq != inc.manifest.seq:
            return None
        if err.code == "not_found":
            self.stats["abandoned"] += 1
            del self.coming[err.name]
            return inc
        for i in err.indices:  # not coming: free their credit, ask again on the next tick
            inc.requested.pop(i, None)
        return None

    def tick(self, now: float, names: Iterable[str]) -> list[Send]:
        """Stalls, timed-out requests, and an upstream silent for its TTL (ask ``names``)."""
        out: list[Send] = []
        for inc in list(self.coming.values()):
            if not inc.pace.stalled and inc.pace.stalls(now, inc.last_progress, self.repair_idle_s):
                inc.pace.stalled = inc.repairing = True  # the broadcast stopped short: fetch the rest
                self.stats["repairs"] += 1
            if inc.repairing:
                out += self.pump(inc, now)
        if self.hub_seen and now - max(self.hub_seen, self._reasked) > self.hub_ttl_s:
            self._reasked = now  # once per TTL of silence; hub_seen stays the last message
            self.stats["hub_silent"] += 1
            for name in names:
                out += self.ask(name, 0, now)
        return out
