"""A subscriber's follow-and-repair state, sans I/O: what it holds, what it still lacks, what
to ask the hub for.

An :class:`Assembler` is fed what arrives (a manifest, a chunk, a heartbeat, an error reply)
and the clock, and returns actions: :class:`Send` (a message for the hub's ROUTER) and
:class:`Deliver` (a complete archive whose sha256 the delivery thread checks). Chunks are
verified (XXH3 of the payload) and decompressed straight into one preallocated buffer per
release; the archive's sha256 is extended over the in-order prefix as chunks land.

Rules (docs/protocol.md §Subscriber); the repair rules (gap, end-of-broadcast beat, stall,
corrupt at source, re-ask, credit) are the :mod:`.intake`'s, shared with relays:

- Clone semantics: a release whose seq is not newer than the one held (or assembling) is
  dropped; a seq that was rejected here is never fetched again.
- A manifest over the limits or without a trusted signature is refused before anything is
  allocated for it, reported once per distinct manifest, and does not mark its seq rejected
  (a forged manifest must not block the genuine release of that seq); heartbeats naming that
  same release (seq and sha256) no longer trigger a fetch.
- **Deltas**: a manifest with ``chunk_raw_xxh3`` lets the node take every chunk whose span of
  an archive it holds (``base``: its newest cached one) has that digest from there (the sender
  leaves out chunks its previous release had); what is missing is a gap like any other, so a
  node without that base converges on the same verified bytes through the repair path.
- A chunk fetched ``CORRUPT_FETCHES_MAX`` times failing its digest: the release is rejected.
- A *staged* release is received, verified and cached like any other, then held (reported as
  ``staged``) until activated (an ACTIVATE naming this node or every node for its seq, or a
  heartbeat whose ``active`` reaches it); then :class:`Unstage` hands it on.
- A node that serves nothing as new as the fleet's ``active`` seq, while what it holds is
  newer (staged, not activated: a node that joined after a staged publish), fetches the
  active release itself, so it converges on what the fleet serves instead of serving nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from .. import defaults
from .. import protocol as P
from ..defaults import Limits
from ..errors import LimitError, ProtocolError, SignatureError, ZmqModelsError
from ..protocol import ModelState
from ..release.manifest import Manifest
from ..release.signing import Trust
from .intake import Intake, Send, Taken
from .receiving import Assembly
from .retry import Unstored

__all__ = ["Assembly", "Follow", "Send", "Deliver", "Unstage", "RetryStore", "Assembler"]


@dataclass
class Follow:
    """What one model's subscriber holds and reports."""

    name: str
    done_seq: int = 0  # newest seq assembled (being verified, verified or rejected)
    rejected: set[int] = field(default_factory=set)
    refused: int = -1  # XXH3 of the last manifest refused (signature, limits): quiets repeats
    refused_release: tuple[int, str] = (0, "")  # (seq, archive sha256) of that manifest
    state: ModelState = ModelState.IDLE
    seq: int = 0
    label: str = ""
    reason: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # of release ``stages_seq``
    stages_seq: int = 0
    moved: dict[str, int] = field(default_factory=dict)  # release ``stages_seq``: its cost to the link,
    how: str = ""  # how it was taken in ("apply" or "load") and why "load"
    how_reason: str = ""
    format: str = ""  # the release format release ``stages_seq`` is served as
    staged: int = 0  # a verified, cached staged release held until activated (0: none)
    active: int = 0  # staged releases up to this seq are activated for this node
    want: int = 0  # an older seq to fetch all the same: the active one, behind a held staged one
    held: tuple[Manifest, Any] | None = None  # the staged release held (and its buffer, no cache)
    requests: int = 0  # what the host answered (Report.requests / errors)
    errors: int = 0

    def stage(self, seq: int, how: str = "", why: str = "", moved: dict[str, int] | None = None,
              fmt: str = "", **seconds: float) -> None:
        """Record release ``seq``'s stage seconds (a newer seq starts afresh), its cost to the
        link (``moved``) and ``how`` it was taken in ("apply"; "load", ``why``: any worker's)."""
        if seq > self.stages_seq:
            self.stages, self.stages_seq, self.moved, self.how, self.how_reason = {}, seq, {}, "", ""
            self.format = ""
        if seq == self.stages_seq:
            self.stages.update({k: round(v, 4) for k, v in seconds.items()})
            self.moved = moved if moved is not None else self.moved
            self.format = fmt or self.format
            if how and (self.how != "load" or how == "load"):
                self.how, self.how_reason = how, why if how == "load" else ""


@dataclass(frozen=True)
class Deliver:
    """``asm`` is complete: check ``digest`` against its manifest and hand it on. ``active``:
    a staged release already activated for this node (served, not held), decided here, where
    the activations are, never read by the delivery thread."""

    name: str
    asm: Assembly
    digest: str
    active: bool = False


@dataclass(frozen=True)
class Unstage:
    """The held staged release ``manifest`` is activated: hand it on now (from ``buf``, the
    buffer it was assembled in, when there is no cache; else from the cache)."""

    name: str
    manifest: Manifest
    buf: Any = None


@dataclass(frozen=True)
class RetryStore:
    """Writing ``asm`` to the cache failed earlier: check and write it again now, from the
    verified bytes kept here (it is not fetched again)."""

    name: str
    asm: Assembly
    digest: str
    active: bool = False  # as :class:`Deliver`'s


Action = Send | Deliver | Unstage | RetryStore


def activated(st: Follow, m: Manifest) -> bool:
    """Staged ``m`` is already activated here (fetched as the active one): serve, not hold."""
    return m.staged and m.seq <= st.active


class Assembler:
    """``take(name, size)`` and ``give(name, buf)`` lend archive buffers (reused across
    releases: first-touch page faults, not copies, bound the receive rate)."""

    def __init__(self, models: Sequence[str], *, node_id: str, host: str, pid: int, device: str,
                 take: Callable[[str, int], Any], give: Callable[[str, Any], None],
                 base: Callable[[str], Any] | None = None,
                 limits: Limits | None = None, trust: Trust | None = None,
                 known: dict[str, int] | None = None,
                 staged: dict[str, Manifest] | None = None, labels: Sequence[str] = (),
                 repair_idle_s: float = defaults.REPAIR_IDLE_S,
                 hub_ttl_s: float = defaults.HUB_TTL_S,
                 fetch_timeout_s: float = defaults.FETCH_TIMEOUT_S) -> None:
        self.models = {n: Follow(n) for n in models}
        for name, seq in (known or {}).items():
            if name in self.models:
                self.models[name].done_seq = self.models[name].seq = seq
        for name, m in (staged or {}).items():  # held in the cache across a restart
            if name in self.models:
                st = self.models[name]
                st.staged, st.done_seq, st.held = m.seq, max(st.done_seq, m.seq), (m, None)
        self.labels = list(labels)
        self.node_id, self.host, self.pid, self.device = node_id, host, pid, device
        self._take, self._give, self._base = take, give, base
        self.stats: Counter[str] = Counter()
        self.intake = Intake(limits=limits, trust=trust, stats=self.stats, repair_idle_s=repair_idle_s,
                             hub_ttl_s=hub_ttl_s, fetch_timeout_s=fetch_timeout_s)
        self.unstored = Unstored(self._let_go)  # verified, their cache write failed: kept, tried again
        self._now = 0.0  # the time of the event being handled

    @property
    def hub_seen(self) -> float:
        return self.intake.hub_seen

    @property
    def limits(self) -> Limits:
        return self.intake.limits

    def use_stats(self, stats: Counter[str]) -> None:
        """Count into ``stats`` (the shell's counter) from now on."""
        self.stats = self.intake.stats = stats

    def asm(self, name: str) -> Assembly | None:
        """The release of ``name`` being received (None: none)."""
        return self.intake.coming.get(name)  # type: ignore[return-value]

    # -- events ------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        """Late joiner: ask for every model's snapshot at once, do not wait for a broadcast."""
        return [a for n in self.models for a in self.intake.ask(n, 0, now)]

    def heard(self, now: float) -> None:
        self.intake.hub_seen = now

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
            self.intake.answered(m.name)
        coming = self.intake.coming_seq(m.name)
        wanted = m.seq == st.want and not coming
        if not wanted and (m.seq <= st.done_seq or m.seq in st.rejected or coming >= m.seq):
            self.stats["stale_manifest"] += 1  # replays of older releases end here
            return []
        try:  # before anything is allocated for it
            self.intake.admit(m, raw, signature)
        except (LimitError, SignatureError) as exc:
            return self._refuse(st, m, raw, exc)
        asm = Assembly(m, raw, signature, now, buf=self._take(m.name, m.archive_bytes), give=self._give)
        self.intake.begin(asm, fetched=fetched)
        self.stats["manifests"] += 1
        if m.chunk_raw_xxh3 and self._base is not None:
            with self._base(m.name) as base:  # the archive this node holds, if any
                if base is not None:
                    reused = asm.reuse(base, reopen=lambda: self._base(m.name))  # type: ignore[misc]
                    self.stats["bytes_reused"] += reused
                    self.stats["chunks_reused"] += m.chunk_count - len(asm.missing)
                    asm.moved.update(bytes_reused=reused, chunks_reused=m.chunk_count - len(asm.missing))
        out: list[Action] = []
        if not m.staged:  # a staged release does not change what this node says it serves
            st.state, st.seq, st.label, st.reason = ModelState.RECEIVING, m.seq, m.label, ""
            out.append(Send(self._report(st)))
        if not asm.missing:
            self.intake.coming.pop(m.name)
            out += self._complete(st, asm)
        return out

    def on_chunk(self, hdr: P.ChunkHeader | P.PatchHeader, payload: Any, now: float, *,
                 fetched: bool) -> list[Action]:
        self._now = now
        st = self.follow(hdr.name)
        asm = self.asm(hdr.name)
        taken, asks = self.intake.chunk(hdr, payload, now, fetched=fetched)
        match taken:
            case Taken.UNEXPECTED:
                if hdr.seq > st.done_seq and hdr.seq not in st.rejected and self.intake.coming_seq(
                        hdr.name) < hdr.seq:
                    return [*self.intake.ask(hdr.name, hdr.seq, now)]  # missed the manifest: ask
                return []
            case Taken.COMPLETE:
                assert asm is not None
                return self._complete(st, asm)
            case Taken.CORRUPT_AT_SOURCE:  # the hub's own copy is bad (or a path rewrites it)
                assert asm is not None
                asm.close()
                st.rejected.add(hdr.seq)
                self.stats["rejected_corrupt_at_source"] += 1
                return self._rejection(st, asm.manifest, f"{asm.fault}, from the hub "
                                       f"{asm.corrupt_fetches} times: corrupt at its source")
        return [*asks]

    def on_patch(self, hdr: P.PatchHeader, payload: Any, now: float) -> list[Action]:
        """A broadcast chunk sent as a patch: taken like the chunk if the span this node copied
        from its base is the one it was made against; otherwise left missing (the repair path
        fetches the chunk whole)."""
        asm = self.asm(hdr.name)
        if asm is None or asm.manifest.seq != hdr.seq or not asm.can_patch(hdr.index, hdr.base_xxh3):
            self.stats["patches_unusable"] += 1
            return []
        return self.on_chunk(hdr, payload, now, fetched=False)

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
        coming = self.intake.coming_seq(st.name)
        if (st.seq < st.active < st.done_seq and st.staged > st.active and st.active not in st.rejected
                and not coming):
            st.want = st.active  # serves older than the fleet, holds newer: take the active one
            asked = self.intake.ask(st.name, st.active, now, exact=True)
            self.stats["fetch_active"] += len(asked)
            out += asked
        out += self.intake.beat(st.name, beat.seq, now)
        if beat.seq > st.done_seq and beat.seq not in st.rejected and coming < beat.seq:
            out += self.intake.ask(st.name, beat.seq, now)
        return out

    def on_activate(self, msg: P.Activate) -> list[Action]:
        """ACTIVATE from the hub: if it names this node (or every node), serve ``msg.seq``."""
        st = self.models.get(msg.name)
        if st is None or (msg.nodes and self.node_id not in msg.nodes) or msg.seq <= st.active:
            return []
        st.active = msg.seq
        self.stats["activations"] += 1
        return self._unstage(st)

    def hold(self, m: Manifest, buf: Any = None) -> list[Action]:
        """Staged release ``m`` is verified and cached (or, with no cache, kept in ``buf``):
        hold it until it is activated. A held older one is let go."""
        st = self.follow(m.name)
        if m.seq <= st.seq and st.state == ModelState.SERVING:
            self._let_go(m.name, buf)
            return []
        if st.held is not None and st.held[0].seq > m.seq:
            self._let_go(m.name, buf)
            return []
        if st.held is not None:
            self._let_go(m.name, st.held[1])
        st.held, st.staged = (m, buf), max(st.staged, m.seq)
        return [*self._unstage(st), Send(self._report(st))]

    def served(self, name: str, seq: int) -> None:
        """``seq`` was handed on to be served: a staged release held older than it is let go."""
        st = self.follow(name)
        if st.held is not None and st.held[0].seq < seq:
            self._let_go(name, st.held[1])
            st.held = None

    def count(self, name: str, requests: int, errors: int) -> None:
        """What the host has answered for ``name`` so far (reported to the hub)."""
        st = self.follow(name)
        st.requests, st.errors = requests, errors

    def on_error(self, err: P.ErrorReply, now: float) -> list[Action]:
        """The hub answered a fetch with an error (see :meth:`Intake.error`)."""
        self.stats[f"hub_error_{err.code}"] += 1
        if err.name in self.models:
            gone = self.intake.error(err)
            if gone is not None:
                gone.close()
        return []

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for name, asm, digest in self.unstored.due(now):  # a failed cache write, tried again
            self.stats["store_retries"] += 1
            out.append(RetryStore(name, asm, digest, activated(self.models[name], asm.manifest)))
        return [*out, *self.intake.tick(now, self.models)]

    def forget(self, name: str, seq: int, now: float) -> list[Action]:
        """The node lost its copy of ``seq`` (a damaged cache file): take it again."""
        st = self.follow(name)
        st.rejected.discard(seq)
        st.done_seq = min(st.done_seq, seq - 1)
        self.intake.answered(name)
        return [*self.intake.ask(name, seq, now)]

    def store_failed(self, asm: Assembly, digest: str, now: float) -> float:
        """Writing ``asm`` to the cache failed (a full disk, EIO): its verified bytes are kept
        here (:attr:`unstored`) and written again on :class:`RetryStore` when due; nothing
        is fetched again. Returns the delay (0: a newer release supersedes it, and it is let go)."""
        m = asm.manifest
        asm.store_failures += 1
        if self.intake.coming_seq(m.name) > m.seq or self.follow(m.name).done_seq > m.seq:
            self._let_go(m.name, asm.buf)
            return 0.0
        return self.unstored.keep(asm, digest, now)

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

    def stage(self, name: str, seq: int, **kw: Any) -> None:
        """:meth:`Follow.stage` of model ``name`` (``how``, ``why``, ``fmt``, stage seconds)."""
        self.follow(name).stage(seq, **kw)

    def reports(self) -> list[Action]:
        return [Send(self._report(st)) for st in self.models.values()]

    def stopping(self) -> list[Action]:
        """The last reports of a node that stops cleanly: ``stopped``, with what it served."""
        return [Send(msgspec.structs.replace(self._report(st), state=ModelState.STOPPED, reason=""))
                for st in self.models.values()]

    # -- internals ---------------------------------------------------------------------------
    def _unstage(self, st: Follow) -> list[Action]:
        if not st.staged or st.staged > st.active:
            return []
        st.staged = 0
        if st.held is None:
            return []
        (m, buf), st.held = st.held, None
        return [Unstage(st.name, m, buf)]

    def _let_go(self, name: str, buf: Any) -> None:
        if buf is not None:
            self._give(name, buf)

    def _report(self, st: Follow) -> P.Report:
        return P.Report(node=self.node_id, model=st.name, state=st.state, seq=st.seq,
                        label=st.label, reason=st.reason[:500], host=self.host, pid=self.pid,
                        device=self.device, stages=dict(st.stages), stages_seq=st.stages_seq,
                        moved=dict(st.moved), how=st.how, how_reason=st.how_reason[:300], format=st.format,
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

    def _complete(self, st: Follow, asm: Assembly) -> list[Action]:
        self.unstored.superseded(st.name, asm.manifest.seq)  # an older kept one's write is moot
        st.done_seq = max(st.done_seq, asm.manifest.seq)  # an older wanted seq leaves it
        if st.want == asm.manifest.seq:
            st.want = 0
        asm.hash_prefix()
        digest = asm.sha.hexdigest()
        asm.view.release()
        asm.receive_s = max(0.0, self._now - asm.started)
        st.stage(asm.manifest.seq, receive=asm.receive_s, moved=dict(asm.moved))
        return [Deliver(st.name, asm, digest, activated(st, asm.manifest))]

