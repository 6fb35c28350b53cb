"""A relay's decisions, sans I/O: take releases from upstream once, pass each manifest and
chunk downstream as it arrives, answer downstream repairs, keep complete releases.

Unlike a node's :class:`~zmqmodels.assembly.Assembler`, a relay never decompresses: it keeps the
chunk payloads as sent, checks each one's size and XXH3 against the manifest, and never
forwards one that fails. Integrity stays end to end (nodes check the archive sha256 and the
signature), so a relay need not be trusted.

Events in, actions out: :class:`Up` (a message for the upstream hub's ROUTER), :class:`Down`
(frames to publish downstream), :class:`Reply` (frames for one downstream peer),
:class:`Keep` (store a complete release).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from . import defaults
from . import protocol as P
from .assembly import Pace, next_fetch
from .defaults import Limits
from .errors import LimitError, ProtocolError, SignatureError
from .release import Manifest
from .signing import Trust

__all__ = ["Carried", "Up", "Down", "Reply", "Keep", "Forwarder"]


@dataclass
class Carried:
    """A release the relay holds (complete) or is receiving (``missing`` not empty)."""

    manifest: Manifest
    raw: bytes
    signature: bytes
    chunks: list[Any]  # payloads as sent; None where missing
    missing: set[int]
    requested: dict[int, float] = field(default_factory=dict)
    waiters: dict[int, set[bytes]] = field(default_factory=dict)  # index -> downstream peers
    last_progress: float = 0.0
    repairing: bool = False
    corrupt_fetches: int = 0
    pace: Pace = field(default_factory=lambda: Pace(0.0))


@dataclass(frozen=True)
class Up:
    msg: msgspec.Struct


@dataclass(frozen=True)
class Down:
    name: str  # the topic's model ("" = the relay's own beat)
    frames: list[Any]


@dataclass(frozen=True)
class Reply:
    peer: bytes
    frames: list[Any]


@dataclass(frozen=True)
class Keep:
    carried: Carried


Action = Up | Down | Reply | Keep


class Forwarder:
    """``held`` maps model names to the newest complete release already stored (a restarted
    relay serves its store at once)."""

    def __init__(self, models: Sequence[str], relay_id: str, *, limits: Limits | None = None,
                 trust: Trust | None = None, held: dict[str, Carried] | None = None,
                 repair_idle_s: float = defaults.REPAIR_IDLE_S, hub_ttl_s: float = defaults.HUB_TTL_S,
                 fetch_timeout_s: float = defaults.FETCH_TIMEOUT_S) -> None:
        self.models = list(models)  # empty: every model upstream
        self.relay_id = relay_id
        self.limits = limits or Limits()
        self.trust = trust or Trust()
        self.latest: dict[str, Carried] = dict(held or {})
        self.receiving: dict[str, Carried] = {}
        self._asked: dict[str, tuple[int, float]] = {}
        self.repair_idle_s, self.hub_ttl_s, self.fetch_timeout_s = repair_idle_s, hub_ttl_s, fetch_timeout_s
        self.hub_seen = 0.0
        self._reasked = 0.0
        self.upstream_path: list[str] = []  # relays between the root hub and us
        self.active: dict[str, int] = {}  # per model: the upstream's fleet-wide active seq
        self.loop = ""  # why this relay refuses to forward (its upstream leads back to it)
        self.stats: Counter[str] = Counter()

    # -- upstream ----------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        return [a for n in self.models for a in self._ask(n, 0, now)]

    def done_seq(self, name: str) -> int:
        held = self.latest.get(name)
        cur = self.receiving.get(name)
        return max(held.manifest.seq if held else 0, cur.manifest.seq if cur else 0)

    def on_manifest(self, m: Manifest, raw: bytes, signature: bytes, now: float, *,
                    fetched: bool = False) -> list[Action]:
        if not self._follows(m.name) or self.loop:
            return []
        self._asked.pop(m.name, None)
        if m.seq <= self.done_seq(m.name):
            self.stats["stale_manifest"] += 1
            return []
        try:
            m.check(self.limits)
            self.trust.verify(m, raw, signature)
        except (LimitError, SignatureError) as exc:
            self.stats["refused"] += 1
            self.stats[f"refused_{exc.code}"] += 1
            return []
        c = Carried(m, raw, signature, [None] * m.chunk_count, set(range(m.chunk_count)), last_progress=now,
                    pace=Pace(now, broadcast_manifest=not fetched))
        self.receiving[m.name] = c
        out: list[Action] = [Down(m.name, P.pack(P.ManifestFrames(), raw, signature))]
        return out + (self._complete(c) if not c.missing else [])

    def on_chunk(self, hdr: P.ChunkHeader, payload: Any, now: float, *, fetched: bool) -> list[Action]:
        c = self.receiving.get(hdr.name)
        if c is None or c.manifest.seq != hdr.seq:
            self.stats["chunk_unexpected"] += 1
            if self._follows(hdr.name) and hdr.seq > self.done_seq(hdr.name):
                return self._ask(hdr.name, hdr.seq, now)
            return []
        m, i = c.manifest, hdr.index
        if i >= m.chunk_count:
            raise ProtocolError(f"chunk {i} of {m.name} seq {m.seq} out of range")
        if not fetched and c.pace.broadcast(i):
            c.repairing = True  # the broadcast skipped chunks: they were dropped
        c.requested.pop(i, None)
        if i not in c.missing:
            self.stats["chunk_duplicate"] += 1
            return []
        if len(payload) != m.chunk_sizes[i] or xxhash.xxh3_64_intdigest(payload) != m.chunk_xxh3[i]:
            self.stats["chunk_corrupt"] += 1  # never forwarded
            c.corrupt_fetches += fetched
            c.repairing = True
            if c.corrupt_fetches >= defaults.CORRUPT_FETCHES_MAX:
                del self.receiving[m.name]
                self.stats["corrupt_at_source"] += 1
                return []
            return self._pump(c, now)
        data = payload  # kept as received (the frame's buffer): no copy of model-sized bytes
        c.chunks[i] = data
        c.missing.discard(i)
        c.last_progress = now
        c.pace.received += 1
        self.stats["chunks_fetched" if fetched else "chunks_broadcast"] += 1
        frames = P.pack(P.ChunkHeader(m.name, m.seq, i), data)
        out: list[Action] = [Down(m.name, frames)]
        out += [Reply(peer, frames) for peer in sorted(c.waiters.pop(i, ()))]
        if not c.missing:
            out += self._complete(c)
        elif c.repairing:
            out += self._pump(c, now)
        return out

    def on_beat(self, beat: P.Heartbeat, now: float) -> list[Action]:
        if not beat.name:  # the upstream's own beat carries the relays it came through
            self.upstream_path = list(beat.path)
            if self.relay_id in beat.path and not self.loop:
                self.loop = (f"relay {self.relay_id} refuses to forward: its upstream leads back to it "
                             f"({' -> '.join([*beat.path, self.relay_id])})")
                self.stats["loop"] += 1
            return []
        if beat.active > self.active.get(beat.name, 0) and self._follows(beat.name):
            self.active[beat.name] = beat.active  # passed on in this relay's own beats
        c = self.receiving.get(beat.name)
        if c is not None and beat.seq == c.manifest.seq and c.missing and not c.pace.stalled:
            c.pace.stalled = c.repairing = True  # the upstream beats after all its chunks: lost
            self.stats["repairs"] += 1
        if self._follows(beat.name) and beat.seq > self.done_seq(beat.name) and not self.loop:
            return self._ask(beat.name, beat.seq, now)
        return []

    def on_activate(self, msg: P.Activate) -> list[Action]:
        """Activations pass straight down (the nodes they name may be behind this relay)."""
        if not self._follows(msg.name) or self.loop:
            return []
        return [Down(msg.name, P.pack(msg))]

    def on_error(self, err: P.ErrorReply) -> list[Action]:
        self._asked.pop(err.name, None)
        c = self.receiving.get(err.name)
        if c is not None and err.seq == c.manifest.seq:
            if err.code == "not_found":
                del self.receiving[err.name]
            else:
                for i in err.indices:
                    c.requested.pop(i, None)
        return []

    def stored(self, c: Carried) -> None:
        """``c`` is in the store: serve it from there (replaces the older one)."""
        name = c.manifest.name
        cur = self.latest.get(name)
        if cur is None or cur.manifest.seq < c.manifest.seq:
            self.latest[name] = c
        if self.receiving.get(name) is c:
            del self.receiving[name]

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for c in list(self.receiving.values()):
            if not c.missing:
                continue
            if not c.pace.stalled and c.pace.stalls(now, c.last_progress, self.repair_idle_s):
                c.pace.stalled = c.repairing = True
                self.stats["repairs"] += 1
            if c.repairing:
                out += self._pump(c, now)
        if self.hub_seen and now - max(self.hub_seen, self._reasked) > self.hub_ttl_s:
            self._reasked = now  # once per TTL of silence; hub_seen stays the last message
            for n in self.models:
                out += self._ask(n, 0, now)
        return out

    def beats(self, hub_id: str) -> list[Action]:
        """Heartbeats for downstream: the relay's own (with the path of relays), then per model
        the newest release it holds whole. Never one it is still forwarding: a beat naming a
        release tells downstream every chunk of it was sent before (docs/protocol.md)."""
        out: list[Action] = [Down("", P.pack(P.Heartbeat(hub=hub_id, path=[*self.upstream_path,
                                                                        self.relay_id])))]
        for name in sorted({*self.models, *self.latest}):
            c = self.latest.get(name)
            if c is not None:
                m = c.manifest
                out.append(Down(name, P.pack(P.Heartbeat(hub=hub_id, name=name, seq=m.seq,
                                                         sha256=m.archive_sha256, label=m.label,
                                                         active=self.active.get(name, 0)))))
        return out

    # -- downstream --------------------------------------------------------------------------
    def fetch_manifest(self, peer: bytes, req: P.FetchManifest) -> list[Action]:
        c = self._find(req.name, req.seq)
        if c is None:
            return [Reply(peer, P.pack(P.ErrorReply("not_found", f"relay has no {req.name!r} seq {req.seq}",
                                                    req.name, req.seq)))]
        self.stats["fetch_manifest"] += 1
        return [Reply(peer, P.pack(P.ManifestFrames(), c.raw, c.signature))]

    def fetch_chunks(self, peer: bytes, req: P.FetchChunks) -> list[Action]:
        if len(req.indices) > self.limits.fetch_credit:
            return [Reply(peer, P.pack(P.ErrorReply("too_large", f"{len(req.indices)} chunks asked, credit "
                                                    f"is {self.limits.fetch_credit}", req.name, req.seq,
                                                    indices=req.indices)))]
        c = self._find(req.name, req.seq) if req.seq else None
        if c is None or any(i >= c.manifest.chunk_count for i in req.indices):
            return [Reply(peer, P.pack(P.ErrorReply("not_found", f"relay no longer has {req.name!r} seq "
                                                    f"{req.seq}", req.name, req.seq, indices=req.indices)))]
        out: list[Action] = []
        for i in req.indices:
            if c.chunks[i] is None:  # not here yet: answer when it comes
                c.waiters.setdefault(i, set()).add(peer)  # one answer per peer and chunk
            else:
                out.append(Reply(peer, P.pack(P.ChunkHeader(req.name, req.seq, i), c.chunks[i])))
        self.stats["fetch_chunks"] += len(req.indices)
        return out

    def report(self, report: P.Report) -> list[Action]:
        """A node's report goes on upstream, naming this relay (the innermost first)."""
        return [Up(msgspec.structs.replace(report, via=[*report.via, self.relay_id]))]

    # -- internals ---------------------------------------------------------------------------
    def _follows(self, name: str) -> bool:
        return not self.models or name in self.models

    def _find(self, name: str, seq: int) -> Carried | None:
        cands = [c for c in (self.receiving.get(name), self.latest.get(name)) if c is not None]
        if not cands:
            return None
        if seq == 0:
            return max(cands, key=lambda c: c.manifest.seq)
        return next((c for c in cands if c.manifest.seq == seq), None)

    def _ask(self, name: str, seq: int, now: float) -> list[Action]:
        asked = self._asked.get(name)
        if asked is not None and asked[0] >= seq and now - asked[1] < self.fetch_timeout_s:
            return []
        self._asked[name] = (seq, now)
        self.stats["ask_manifest"] += 1
        return [Up(P.FetchManifest(name, seq))]

    def _pump(self, c: Carried, now: float) -> list[Action]:
        want = next_fetch(c.missing, c.requested, now, self.limits.fetch_credit, self.fetch_timeout_s,
                          c.pace.fetch_below(c.manifest.chunk_count))
        return [Up(P.FetchChunks(c.manifest.name, c.manifest.seq, want))] if want else []

    def _complete(self, c: Carried) -> list[Action]:
        self.stats["complete"] += 1
        return [Keep(c)]
