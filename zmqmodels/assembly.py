"""A subscriber's follow-and-repair state, sans I/O: what it holds, what it still lacks, what
to ask the hub for.

An :class:`Assembler` is fed what arrives (a manifest, a chunk, a heartbeat, an error reply)
and the clock, and returns actions: :class:`Send` (a message for the hub's ROUTER) and
:class:`Deliver` (a complete archive whose sha256 the delivery thread checks). Chunks are
verified (XXH3 of the payload) and decompressed straight into one preallocated buffer per
release; the archive's sha256 is extended over the in-order prefix as chunks land.

Rules (docs/protocol.md §Subscriber):

- Clone semantics: a release whose seq is not newer than the one held (or assembling) is
  dropped; a seq that was rejected here is never fetched again.
- A gap - a missed manifest, lost or corrupt chunks, a heartbeat announcing a newer seq, a
  hub silent for longer than its TTL - is repaired by asking for exactly what is missing, at
  most ``fetch_credit`` chunks in flight. The broadcast comes in index order on one pipe, so a
  chunk that skips indices means those were dropped: they are fetched at once, and nothing
  the broadcast has yet to bring. The sender's heartbeat naming the release follows all its
  chunks on that pipe, so once it arrives whatever is still missing was lost (a dropped tail)
  and is fetched. A slow link or a large fan-out is not a loss: fetching what is on its way
  would double the hub's traffic. Only a broadcast silent for 2 s and 8 times its mean chunk
  interval (:class:`Pace`) is fetched without that marker.
- A manifest over the limits or without a trusted signature is refused before anything is
  allocated for it, reported once per distinct manifest, and does not mark its seq rejected
  (a forged manifest must not block the genuine release of that seq); heartbeats naming that
  same release (seq and sha256) no longer trigger a fetch.
- Chunks fetched from the hub that fail their digest ``CORRUPT_FETCHES_MAX`` times: the hub's
  own copy is bad; the release is rejected rather than fetched forever.
- A *staged* release is received, verified and cached like any other, then held (reported
  as ``staged``, the state stays what is served) until it is activated: an ACTIVATE naming
  this node (or every node) for its seq, or a heartbeat whose ``active`` reaches it. Then
  :class:`Unstage` hands it on.
- A node that serves nothing as new as the fleet's ``active`` seq, while what it holds is
  newer (staged, not activated: a node that joined after a staged publish), fetches the
  active release itself, so it converges on what the fleet serves instead of serving nothing.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from . import defaults
from . import protocol as P
from .defaults import Limits
from .errors import IntegrityError, LimitError, ProtocolError, SignatureError, ZmqModelsError
from .protocol import ModelState
from .release import Manifest, decompress_chunk
from .signing import Trust

__all__ = ["Assembly", "Pace", "Follow", "Send", "Deliver", "Unstage", "RetryStore", "Assembler",
           "next_fetch"]


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
        longer (a fetched manifest's chunks are not coming by broadcast: ``idle_s``). The
        sender's heartbeat usually says so sooner (:meth:`Assembler.on_beat`)."""
        if not self.broadcast_manifest:
            return now - last_progress > idle_s
        mean = (last_progress - self.started) / self.received if self.received else 0.0
        return now - last_progress > max(8 * idle_s, 8 * mean)

    def fetch_below(self, chunk_count: int) -> int:
        return chunk_count if self.stalled else self.next_bcast


@dataclass
class Assembly:
    """One release being received into ``buf``."""

    manifest: Manifest
    raw: bytes  # the manifest as received (what its signature covers)
    signature: bytes
    buf: Any  # a writable buffer of at least manifest.archive_bytes
    missing: set[int]
    requested: dict[int, float] = field(default_factory=dict)  # index -> when asked
    last_progress: float = 0.0
    repairing: bool = False
    corrupt_fetches: int = 0  # fetched (not broadcast) chunks that failed their digest
    hashed: int = 0  # chunks [0, hashed) are in the running sha256
    started: float = 0.0  # when its manifest was accepted
    receive_s: float = 0.0  # manifest -> last chunk in and hashed
    store_failures: int = 0  # failed cache writes of it (the host kept it to write again)

    def __post_init__(self) -> None:
        self.view = memoryview(self.buf)
        self.sha = hashlib.sha256()
        self.pace = Pace(self.started)

    def hash_prefix(self) -> None:
        """Extend the archive sha256 over every chunk that now completes the in-order prefix,
        so the digest is ready when the last chunk lands (not ~0.6 s/GB after it)."""
        m = self.manifest
        while self.hashed < m.chunk_count and self.hashed not in self.missing:
            start, length = m.chunk_span(self.hashed)
            self.sha.update(self.view[start:start + length])
            self.hashed += 1


@dataclass
class Follow:
    """What one model's subscriber holds and reports."""

    name: str
    done_seq: int = 0  # newest seq assembled (being verified, verified or rejected)
    rejected: set[int] = field(default_factory=set)
    refused: int = -1  # XXH3 of the last manifest refused (signature, limits): quiets repeats
    refused_release: tuple[int, str] = (0, "")  # (seq, archive sha256) of that manifest
    asm: Assembly | None = None
    asked_seq: int = -1
    asked_at: float = 0.0
    retry_at: float = 0.0  # when to write ``retry_seq`` to the cache again (a write that failed)
    retry_seq: int = 0
    retries: int = 0
    state: ModelState = ModelState.IDLE
    seq: int = 0
    label: str = ""
    reason: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # of release ``stages_seq``
    stages_seq: int = 0
    staged: int = 0  # a verified, cached staged release held until activated (0: none)
    active: int = 0  # staged releases up to this seq are activated for this node
    want: int = 0  # an older seq to fetch all the same: the active one, behind a held staged one
    requests: int = 0  # what the host answered (Report.requests / errors)
    errors: int = 0


def next_fetch(missing: set[int], requested: dict[int, float], now: float, credit: int,
               timeout_s: float, below: int | None = None) -> list[int]:
    """Credit-bounded repair, shared by nodes and relays: forget requests unanswered for
    ``timeout_s``, then ask for the lowest missing chunks (under ``below``) not in flight,
    keeping at most ``credit`` in flight; marks them requested at ``now``."""
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


@dataclass(frozen=True)
class Send:
    """Send ``msg`` to the hub (over the DEALER)."""

    msg: msgspec.Struct


@dataclass(frozen=True)
class Deliver:
    """``asm`` is complete: check ``digest`` against its manifest and hand it on."""

    name: str
    asm: Assembly
    digest: str


@dataclass(frozen=True)
class Unstage:
    """The held staged release ``seq`` of ``name`` is activated: hand it on now."""

    name: str
    seq: int


@dataclass(frozen=True)
class RetryStore:
    """Writing ``seq`` of ``name`` to the cache failed earlier: write it again now, from the
    verified bytes the host kept (it is not fetched again)."""

    name: str
    seq: int


Action = Send | Deliver | Unstage | RetryStore


class Assembler:
    """``take(name, size)`` and ``give(name, buf)`` lend archive buffers (reused across
    releases: first-touch page faults, not copies, bound the receive rate)."""

    def __init__(self, models: Sequence[str], *, node_id: str, host: str, pid: int, device: str,
                 take: Callable[[str, int], Any], give: Callable[[str, Any], None],
                 limits: Limits | None = None, trust: Trust | None = None,
                 known: dict[str, int] | None = None,
                 staged: dict[str, int] | None = None, labels: Sequence[str] = (),
                 repair_idle_s: float = defaults.REPAIR_IDLE_S,
                 hub_ttl_s: float = defaults.HUB_TTL_S,
                 fetch_timeout_s: float = defaults.FETCH_TIMEOUT_S) -> None:
        self.models = {n: Follow(n) for n in models}
        for name, seq in (known or {}).items():
            if name in self.models:
                self.models[name].done_seq = self.models[name].seq = seq
        for name, seq in (staged or {}).items():  # held in the cache across a restart
            if name in self.models:
                st = self.models[name]
                st.staged, st.done_seq = seq, max(st.done_seq, seq)
        self.labels = list(labels)
        self.node_id, self.host, self.pid, self.device = node_id, host, pid, device
        self._take, self._give = take, give
        self.limits = limits or Limits()
        self.trust = trust or Trust()
        self.repair_idle_s, self.hub_ttl_s, self.fetch_timeout_s = repair_idle_s, hub_ttl_s, fetch_timeout_s
        self.hub_seen = 0.0  # when the hub was last heard from (0: never)
        self._reasked = 0.0  # when silence last made us ask again
        self._now = 0.0  # the time of the event being handled
        self.stats: Counter[str] = Counter()

    # -- events ------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Late joiner: ask for every model's snapshot at once, do not wait for a broadcast."""
        return [a for st in self.models.values() for a in self._ask_manifest(st, 0, now)]

    def heard(self, now: float) -> None:
        self.hub_seen = now

    def follow(self, name: str) -> Follow:
        st = self.models.get(name)
        if st is None:
            raise ProtocolError(f"not subscribed to {name!r}")
        return st

    def on_manifest(self, m: Manifest, raw: bytes, signature: bytes, now: float, *,
                    fetched: bool = False) -> list[Action]:
        self._now = now
        st = self.follow(m.name)
        if fetched:
            st.asked_seq = -1
        wanted = m.seq == st.want and st.asm is None
        if not wanted and (m.seq <= st.done_seq or m.seq in st.rejected
                           or (st.asm and st.asm.manifest.seq >= m.seq)):
            self.stats["stale_manifest"] += 1  # replays of older releases end here
            return []
        try:  # before anything is allocated for it
            m.check(self.limits)
            self.trust.verify(m, raw, signature)
        except (LimitError, SignatureError) as exc:
            return self._refuse(st, m, raw, exc)
        self._drop(st)
        if st.retry_seq and st.retry_seq < m.seq:
            st.retry_at, st.retry_seq, st.retries = 0.0, 0, 0  # superseded: its write is moot
        st.asm = Assembly(m, raw, signature, self._take(m.name, m.archive_bytes),
                          set(range(m.chunk_count)), last_progress=now, started=now)
        st.asm.pace.broadcast_manifest = not fetched
        self.stats["manifests"] += 1
        out: list[Action] = []
        if not m.staged:  # a staged release does not change what this node says it serves
            st.state, st.seq, st.label, st.reason = ModelState.RECEIVING, m.seq, m.label, ""
            out.append(Send(self._report(st)))
        if not st.asm.missing:
            out += self._complete(st)
        return out

    def on_chunk(self, hdr: P.ChunkHeader, payload: Any, now: float, *, fetched: bool) -> list[Action]:
        self._now = now
        st = self.follow(hdr.name)
        asm = st.asm
        if asm is None or asm.manifest.seq != hdr.seq:
            self.stats["chunk_unexpected"] += 1
            if hdr.seq > st.done_seq and hdr.seq not in st.rejected and (
                    asm is None or hdr.seq > asm.manifest.seq):
                return self._ask_manifest(st, hdr.seq, now)  # missed the manifest: ask for it
            return []
        i = hdr.index
        if i >= asm.manifest.chunk_count:
            raise ProtocolError(f"chunk {i} of {hdr.name} seq {hdr.seq} out of range")
        if not fetched and asm.pace.broadcast(i):
            asm.repairing = True  # the broadcast skipped chunks: they were dropped
            self.stats["broadcast_gaps"] += 1
        asm.requested.pop(i, None)
        if i not in asm.missing:
            self.stats["chunk_duplicate"] += 1
        else:
            try:
                decompress_chunk(asm.manifest, i, payload, asm.view)
            except IntegrityError as exc:
                self.stats["chunk_corrupt"] += 1
                asm.corrupt_fetches += fetched
                if asm.corrupt_fetches >= defaults.CORRUPT_FETCHES_MAX:
                    # the hub's own copy is bad (or a path rewrites it): stop asking
                    self._drop(st)
                    st.rejected.add(hdr.seq)
                    self.stats["rejected_corrupt_at_source"] += 1
                    return self._rejection(st, asm.manifest, f"{exc}, from the hub "
                                           f"{asm.corrupt_fetches} times: corrupt at its source")
                asm.repairing = True
            else:
                asm.missing.discard(i)
                asm.last_progress = now
                asm.pace.received += 1
                self.stats["bytes_received"] += len(payload)
                self.stats["chunks_fetched" if fetched else "chunks_broadcast"] += 1
                asm.hash_prefix()
        if not asm.missing:
            return self._complete(st)
        return self._pump(st, now) if asm.repairing else []

    def on_beat(self, beat: P.Heartbeat, now: float) -> list[Action]:
        st = self.models.get(beat.name)
        if st is None:
            return []
        if (beat.seq, beat.sha256) == st.refused_release:
            return []  # the release this node refused: beats naming it do not ask again
        out: list[Action] = []
        if beat.active > st.active:
            st.active = beat.active
            out += self._unstage(st)
        if (st.seq < st.active < st.done_seq and st.staged > st.active and st.active not in st.rejected
                and st.asm is None):
            st.want = st.active  # serves older than the fleet, holds newer: take the active one
            asked = self._ask_manifest(st, st.active, now, older=True)
            self.stats["fetch_active"] += len(asked)
            out += asked
        asm = st.asm
        if asm is not None and beat.seq == asm.manifest.seq and not asm.pace.stalled and asm.missing:
            # the sender beats only after broadcasting every chunk of it: what is missing was lost
            asm.pace.stalled = asm.repairing = True
            self.stats["repairs"] += 1
            out += self._pump(st, now)
        if beat.seq > st.done_seq and beat.seq not in st.rejected and (
                st.asm is None or st.asm.manifest.seq < beat.seq):
            out += self._ask_manifest(st, beat.seq, now)
        return out

    def on_activate(self, msg: P.Activate) -> list[Action]:
        """ACTIVATE from the hub: if it names this node (or every node), serve ``msg.seq``."""
        st = self.models.get(msg.name)
        if st is None or (msg.nodes and self.node_id not in msg.nodes) or msg.seq <= st.active:
            return []
        st.active = msg.seq
        self.stats["activations"] += 1
        return self._unstage(st)

    def held(self, name: str, seq: int) -> list[Action]:
        """Staged release ``seq`` is verified and cached: hold it until it is activated."""
        st = self.follow(name)
        if seq <= st.seq and st.state == ModelState.SERVING:
            return []
        st.staged = max(st.staged, seq)
        return [*self._unstage(st), Send(self._report(st))]

    def count(self, name: str, requests: int, errors: int) -> None:
        """What the host has answered for ``name`` so far (reported to the hub)."""
        st = self.follow(name)
        st.requests, st.errors = requests, errors

    def on_error(self, err: P.ErrorReply, now: float) -> list[Action]:
        """The hub answered a fetch with an error: stop waiting for that answer; a release the
        hub no longer has is abandoned (a newer one is on its way)."""
        self.stats[f"hub_error_{err.code}"] += 1
        st = self.models.get(err.name)
        if st is None:
            return []
        st.asked_seq = -1
        if st.asm is not None and err.seq == st.asm.manifest.seq:
            if err.code == "not_found":
                self.stats["abandoned"] += 1
                self._drop(st)
            else:
                for i in err.indices:  # not coming: free their credit, ask again on the next tick
                    st.asm.requested.pop(i, None)
        return []

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for st in self.models.values():
            if st.retry_at and now >= st.retry_at:
                st.retry_at = 0.0
                self.stats["store_retries"] += 1
                out.append(RetryStore(st.name, st.retry_seq))
            asm = st.asm
            if asm is not None:
                if not asm.pace.stalled and asm.pace.stalls(now, asm.last_progress, self.repair_idle_s):
                    asm.pace.stalled = asm.repairing = True  # the broadcast stopped short: fetch the rest
                    self.stats["repairs"] += 1
                if asm.repairing:
                    out += self._pump(st, now)
        if self.hub_seen and now - max(self.hub_seen, self._reasked) > self.hub_ttl_s:
            self._reasked = now  # ask once per TTL of silence, not on every tick
            self.stats["hub_silent"] += 1
            for st in self.models.values():
                out += self._ask_manifest(st, 0, now)
        return out

    def forget(self, name: str, seq: int, now: float) -> list[Action]:
        """The node lost its copy of ``seq`` (a damaged cache file): take it again."""
        st = self.follow(name)
        st.rejected.discard(seq)
        st.done_seq = min(st.done_seq, seq - 1)
        st.asked_seq = -1
        return self._ask_manifest(st, seq, now)

    def store_failed(self, name: str, seq: int, now: float) -> float:
        """Writing ``seq`` to the cache failed (a full disk, EIO): the host keeps the verified
        bytes and writes them again on :class:`RetryStore`, with back-off (1 s doubling to
        60 s); nothing is fetched again. Returns the delay."""
        st = self.follow(name)
        if st.asm is not None and st.asm.manifest.seq > seq:
            return 0.0  # a newer release is on its way: it supersedes this one
        delay = min(60.0, 2.0 ** st.retries)
        st.retries += 1
        st.retry_at, st.retry_seq = now + delay, seq
        return delay

    def stored(self, name: str) -> None:
        st = self.follow(name)
        st.retries, st.retry_at = 0, 0.0

    def rejected(self, name: str, seq: int) -> None:
        """``seq`` failed after assembly (digest, load, check): never fetch it again."""
        self.follow(name).rejected.add(seq)

    def set_state(self, name: str, state: ModelState, *, seq: int | None = None,
                  label: str | None = None, reason: str = "") -> list[Action]:
        st = self.follow(name)
        st.state, st.reason = ModelState(state), reason
        if seq is not None:
            st.seq = seq
            if st.state == ModelState.SERVING and seq >= st.staged:
                st.staged = 0  # serving it or newer: nothing is held any more
        if label is not None:
            st.label = label
        return [Send(self._report(st))]

    def stage(self, name: str, seq: int, **seconds: float) -> None:
        """Record how long stages of release ``seq`` took (a newer seq starts afresh)."""
        st = self.follow(name)
        if seq > st.stages_seq:
            st.stages, st.stages_seq = {}, seq
        if seq == st.stages_seq:
            st.stages.update({k: round(v, 4) for k, v in seconds.items()})

    def reports(self) -> list[Action]:
        return [Send(self._report(st)) for st in self.models.values()]

    # -- internals ---------------------------------------------------------------------------
    def _unstage(self, st: Follow) -> list[Action]:
        if not st.staged or st.staged > st.active:
            return []
        seq, st.staged = st.staged, 0
        return [Unstage(st.name, seq)]

    def _report(self, st: Follow) -> P.Report:
        return P.Report(node=self.node_id, model=st.name, state=st.state.value, seq=st.seq,
                        label=st.label, reason=st.reason[:500], host=self.host, pid=self.pid,
                        device=self.device, stages=dict(st.stages), stages_seq=st.stages_seq,
                        staged=st.staged, labels=self.labels, requests=st.requests, errors=st.errors)

    def _refuse(self, st: Follow, m: Manifest, raw: bytes, exc: ZmqModelsError) -> list[Action]:
        kind = "untrusted" if isinstance(exc, SignatureError) else "too_large"
        self.stats[kind] += 1
        self.stats[f"rejected_{kind}"] += 1
        digest = xxhash.xxh3_64_intdigest(raw)
        st.refused_release = (m.seq, m.archive_sha256)
        if digest == st.refused:
            return []
        st.refused = digest
        return self._rejection(st, m, str(exc))

    def _rejection(self, st: Follow, m: Manifest, reason: str) -> list[Action]:
        """Report ``m`` rejected with ``reason``, then what is held again."""
        held = (st.state, st.seq, st.label, st.reason)
        st.state, st.seq, st.label, st.reason = ModelState.REJECTED, m.seq, m.label, reason
        out: list[Action] = [Send(self._report(st))]
        st.state, st.seq, st.label, st.reason = held
        return [*out, Send(self._report(st))]

    def _drop(self, st: Follow) -> None:
        if st.asm is not None:
            st.asm.view.release()
            self._give(st.name, st.asm.buf)
            st.asm = None

    def _ask_manifest(self, st: Follow, seq: int, now: float, *, older: bool = False) -> list[Action]:
        pending = st.asked_seq == seq if older else st.asked_seq >= seq
        if pending and now - st.asked_at < self.fetch_timeout_s:
            return []
        st.asked_seq, st.asked_at = seq, now
        self.stats["fetch_manifest"] += 1
        return [Send(P.FetchManifest(st.name, seq))]

    def _pump(self, st: Follow, now: float) -> list[Action]:
        """Keep up to ``fetch_credit`` missing chunks requested; re-ask ones that timed out."""
        asm = st.asm
        if asm is None:
            return []
        want = next_fetch(asm.missing, asm.requested, now, self.limits.fetch_credit, self.fetch_timeout_s,
                          asm.pace.fetch_below(asm.manifest.chunk_count))
        if not want:
            return []
        self.stats["fetch_chunks"] += len(want)
        return [Send(P.FetchChunks(st.name, asm.manifest.seq, want))]

    def _complete(self, st: Follow) -> list[Action]:
        asm = st.asm
        assert asm is not None
        st.asm = None
        st.done_seq = max(st.done_seq, asm.manifest.seq)  # an older wanted seq leaves it
        if st.want == asm.manifest.seq:
            st.want = 0
        asm.hash_prefix()
        digest = asm.sha.hexdigest()
        asm.view.release()
        asm.receive_s = max(0.0, self._now - asm.started)
        self.stage(st.name, asm.manifest.seq, receive=asm.receive_s)
        return [Deliver(st.name, asm, digest)]
