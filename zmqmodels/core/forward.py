"""A relay's decisions, sans I/O: take releases from upstream once, pass each manifest and
chunk downstream as it arrives, answer downstream repairs, keep complete releases.

Unlike a node's :class:`~zmqmodels.assembly.Assembler`, a relay never decompresses: it keeps the
chunk payloads as sent, checks each one's size and XXH3 against the manifest, and never
forwards one that fails. Integrity stays end to end (nodes check the archive sha256 and the
signature), so a relay need not be trusted.

The intake and repair rules are the :mod:`.intake`'s (the same as a node's); the answers to
downstream fetches and the beats are the :mod:`.serve`'s (the same as the hub's). Events in,
actions out: :class:`~.intake.Send` (a message for upstream's ROUTER),
:class:`~.serve.Broadcast` (frames to publish downstream), :class:`~.serve.Reply` (frames for
one downstream peer), :class:`Keep` (store a complete release).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from .. import defaults
from .. import protocol as P
from ..defaults import Limits
from ..errors import IntegrityError, LimitError, SignatureError
from ..release.manifest import Manifest
from ..release.signing import Trust
from .intake import Incoming, Intake, Send, Taken
from .serve import Broadcast, ReleaseServer, Reply, same_chunks

__all__ = ["Carried", "Keep", "Forwarder"]


@dataclass
class Carried(Incoming):
    """A release the relay holds (complete) or is receiving (``missing`` not empty); chunk
    payloads are kept as sent (the frames' buffers: no copy of model-sized bytes)."""

    chunks: list[Any] = field(default_factory=list)  # None where missing
    waiters: dict[int, set[bytes]] = field(default_factory=dict)  # index -> downstream peers

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunks:  # a whole release (from the store)
            self.missing = {i for i, c in enumerate(self.chunks) if c is None}
        else:
            self.chunks = [None] * self.manifest.chunk_count

    @property
    def manifest_bytes(self) -> bytes:
        return self.raw

    def accept(self, index: int, payload: Any) -> None:
        m = self.manifest
        if len(payload) != m.chunk_sizes[index] or xxhash.xxh3_64_intdigest(payload) != m.chunk_xxh3[index]:
            raise IntegrityError(f"chunk {index} of {m.name} seq {m.seq} failed its size or XXH3")
        self.chunks[index] = payload


@dataclass(frozen=True)
class Keep:
    carried: Carried


Action = Send | Broadcast | Reply | Keep


class Forwarder:
    """``held`` maps model names to the newest complete release already stored (a restarted
    relay serves its store at once)."""

    def __init__(self, models: Sequence[str], relay_id: str, *, limits: Limits | None = None,
                 trust: Trust | None = None, held: dict[str, Carried] | None = None,
                 repair_idle_s: float = defaults.REPAIR_IDLE_S, hub_ttl_s: float = defaults.HUB_TTL_S,
                 fetch_timeout_s: float = defaults.FETCH_TIMEOUT_S) -> None:
        self.models = list(models)  # empty: every model upstream
        self.relay_id = relay_id
        self.stats: Counter[str] = Counter()
        self.intake = Intake(limits=limits, trust=trust, stats=self.stats, repair_idle_s=repair_idle_s,
                             hub_ttl_s=hub_ttl_s, fetch_timeout_s=fetch_timeout_s)
        self.server = ReleaseServer("relay", self.intake.limits, self.stats)
        self.latest: dict[str, Carried] = dict(held or {})
        self.keeping: dict[str, Carried] = {}  # whole, being stored: served meanwhile
        self.upstream_path: list[str] = []  # relays between the root hub and us
        self.active: dict[str, int] = {}  # per model: the upstream's fleet-wide active seq
        self.loop = ""  # why this relay refuses to forward (its upstream leads back to it)

    @property
    def receiving(self) -> dict[str, Carried]:
        return self.intake.coming  # type: ignore[return-value]

    def heard(self, now: float) -> None:
        self.intake.hub_seen = now

    def use_stats(self, stats: Counter[str]) -> None:
        """Count into ``stats`` (the shell's counter) from now on."""
        self.stats = self.intake.stats = self.server.stats = stats

    # -- upstream ----------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        return [a for n in self.models for a in self.intake.ask(n, 0, now)]

    def done_seq(self, name: str) -> int:
        held = [c.manifest.seq for c in (self.latest.get(name), self.keeping.get(name)) if c is not None]
        return max([*held, self.intake.coming_seq(name)])

    def on_manifest(self, m: Manifest, raw: bytes, signature: bytes, now: float, *,
                    fetched: bool = False) -> list[Action]:
        if not self._follows(m.name) or self.loop:
            return []
        if fetched:
            self.intake.answered(m.name)
        if m.seq <= self.done_seq(m.name):
            self.stats["stale_manifest"] += 1
            return []
        try:
            self.intake.admit(m, raw, signature)
        except (LimitError, SignatureError) as exc:
            self.stats["refused"] += 1
            self.stats[f"refused_{exc.code}"] += 1
            return []
        c = Carried(m, raw, signature, now)
        held = self.keeping.get(m.name) or self.latest.get(m.name)  # the newest whole one
        if held is not None and m.chunk_raw_xxh3:  # a delta: what it sends again is here already
            for i in same_chunks(held.manifest, m):
                c.chunks[i] = held.chunks[i]
                c.missing.discard(i)
            self.stats["chunks_reused"] += m.chunk_count - len(c.missing)
        self.intake.begin(c, fetched=fetched)
        out: list[Action] = [Broadcast(m.name, P.pack(P.ManifestFrames(), raw, signature))]
        if not c.missing:
            self.intake.coming.pop(m.name)
            out += self._keep(c)
        return out

    def on_chunk(self, hdr: P.ChunkHeader, payload: Any, now: float, *, fetched: bool) -> list[Action]:
        c = self.receiving.get(hdr.name)
        taken, asks = self.intake.chunk(hdr, payload, now, fetched=fetched)
        if taken == Taken.UNEXPECTED:
            if self._follows(hdr.name) and hdr.seq > self.done_seq(hdr.name):
                return [*self.intake.ask(hdr.name, hdr.seq, now)]
            return []
        assert c is not None
        out: list[Action] = []
        if taken in (Taken.TAKEN, Taken.COMPLETE):  # never a chunk that failed its digest
            frames = P.pack(P.ChunkHeader(hdr.name, hdr.seq, hdr.index), payload)
            out.append(Broadcast(hdr.name, frames))
            out += [Reply(peer, frames) for peer in sorted(c.waiters.pop(hdr.index, ()))]
        if taken == Taken.COMPLETE:
            out += self._keep(c)
        return [*out, *asks]

    def on_beat(self, beat: P.Heartbeat, now: float) -> list[Action]:
        if not beat.name:  # the upstream's own beat carries the relays it came through
            self.upstream_path = list(beat.path)
            if self.relay_id in beat.path and not self.loop:
                self.loop = (f"relay {self.relay_id} refuses to forward: its upstream leads back to it "
                             f"({' -> '.join([*beat.path, self.relay_id])})")
                self.stats["loop"] += 1
            return []
        if not self._follows(beat.name):
            return []
        if beat.active > self.active.get(beat.name, 0):
            self.active[beat.name] = beat.active  # passed on in this relay's own beats
        out: list[Action] = [*self.intake.beat(beat.name, beat.seq, now)]
        if beat.seq > self.done_seq(beat.name) and not self.loop:
            out += self.intake.ask(beat.name, beat.seq, now)
        return out

    def on_activate(self, msg: P.Activate) -> list[Action]:
        """Activations pass straight down (the nodes they name may be behind this relay)."""
        if not self._follows(msg.name) or self.loop:
            return []
        return [Broadcast(msg.name, P.pack(msg))]

    def on_error(self, err: P.ErrorReply) -> list[Action]:
        self.intake.error(err)
        return []

    def stored(self, c: Carried) -> None:
        """``c`` is in the store: serve it from there (replaces the older one)."""
        name = c.manifest.name
        cur = self.latest.get(name)
        if cur is None or cur.manifest.seq < c.manifest.seq:
            self.latest[name] = c
        if self.keeping.get(name) is c:
            del self.keeping[name]

    def tick(self, now: float) -> list[Action]:
        return [*self.intake.tick(now, self.models)]

    def beats(self, hub_id: str) -> list[Action]:
        """Heartbeats for downstream (:meth:`ReleaseServer.beats`): never one naming a release
        it is still forwarding."""
        whole = {n: c.manifest for n, c in self.latest.items()}
        return [*ReleaseServer.beats(hub_id, whole, self.active, [*self.upstream_path, self.relay_id])]

    # -- downstream --------------------------------------------------------------------------
    def fetch_manifest(self, peer: bytes, req: P.FetchManifest) -> list[Action]:
        return [*self.server.manifest(peer, req, self._find(req.name, req.seq))]

    def fetch_chunks(self, peer: bytes, req: P.FetchChunks) -> list[Action]:
        c = self._find(req.name, req.seq)
        answer = self.server.chunks(peer, req, c)
        for i in answer.pending:  # not here yet: answer when it comes, once per peer and chunk
            assert c is not None
            c.waiters.setdefault(i, set()).add(peer)
        return [*answer.replies]

    def report(self, report: P.Report) -> list[Action]:
        """A node's report goes on upstream, naming this relay (the innermost first)."""
        return [Send(msgspec.structs.replace(report, via=[*report.via, self.relay_id]))]

    # -- internals ---------------------------------------------------------------------------
    def _follows(self, name: str) -> bool:
        return not self.models or name in self.models

    def _find(self, name: str, seq: int) -> Carried | None:
        cands = [c for c in (self.receiving.get(name), self.keeping.get(name), self.latest.get(name))
                 if c is not None]
        if not cands:
            return None
        if seq == 0:
            return max(cands, key=lambda c: c.manifest.seq)
        return next((c for c in cands if c.manifest.seq == seq), None)

    def _keep(self, c: Carried) -> list[Action]:
        self.keeping[c.manifest.name] = c
        return [Keep(c)]
