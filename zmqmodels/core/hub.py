"""The hub's decisions, sans I/O: the release catalog, activations, rollouts in waves and the
fleet's liveness.

The hub shell (:mod:`zmqmodels.hub.hub`) feeds a :class:`HubCore` what happened (a release stored,
a fetch, a report, an ACTIVATE, the clock) and carries out the actions it returns; it never
decides. Store and disk work is an action too (:class:`Load`, :class:`StoreActive`,
:class:`RollBack`), run off the I/O thread, whose outcome comes back as an event.

Rules (docs/protocol.md §Hub, §Staged rollouts):

- **Catalog**: the newest release of each model answers fetches of seq 0 and is beaten; older
  stored seqs are read on demand (a fetch waits for the read) and the last
  ``OLDER_KEPT`` of them kept in memory.
- **Activation** never steps back by accident (:func:`~.waves.activation_refusal`). With no
  nodes or labels it is fleet-wide and durable: the store records it, then the operator is
  answered and the active seq beaten. Labels are resolved to the nodes carrying them now; a
  node activation is repeated every beat until each node serves the seq, refused it or left.
- **Waves**: a release published with a :class:`~zmqmodels.protocol.WavePlan` is activated
  wave by wave (:class:`~.waves.WaveRollout`); a halt rolls the wave's nodes back by
  publishing the previous active release's content under a new seq; a newer publish
  supersedes a running rollout.
- **Liveness**: a node silent for ``lost_after_s`` shows as lost, for ``forget_after_s`` is
  forgotten (:class:`~.fleet.Fleet`).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass

from .. import protocol as P
from ..defaults import Limits
from ..errors import ZmqModelsError
from ..release.manifest import Manifest, Release
from .fleet import Fleet, tally
from .serve import Broadcast, ReleaseServer, Reply, same_chunks
from .waves import ActivateNodes, Finish, Halt, WaveRollout, activation_refusal

__all__ = ["HubCore", "SendRelease", "Load", "StoreActive", "RollBack", "Log", "OLDER_KEPT"]

OLDER_KEPT = 4  # older releases kept in memory for fetches (per hub)
PARKED_MAX = 256  # fetches waiting for one older release to be read; more are told to retry


@dataclass(frozen=True)
class SendRelease:
    """Put ``release`` on the PUB socket: its manifest, then every chunk in index order but
    those in ``skip`` (the previous release had the same bytes there: receivers reuse theirs
    or fetch them), then the beats (so a beat naming it follows all its chunks on that pipe)."""

    release: Release
    skip: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Load:
    """Read stored release ``seq`` of ``name`` (off the I/O thread); then
    :meth:`HubCore.loaded` or :meth:`HubCore.load_failed`."""

    name: str
    seq: int


@dataclass(frozen=True)
class StoreActive:
    """Record durably that ``seq`` of ``name`` is active fleet-wide; then
    :meth:`HubCore.stored_active` (or :meth:`HubCore.store_active_failed`). ``peer``: the
    operator to answer once it is recorded (None: a finished rollout)."""

    name: str
    seq: int
    peer: bytes | None = None


@dataclass(frozen=True)
class RollBack:
    """Publish the content of ``before`` under a new seq (a halted rollout's nodes go back);
    then :meth:`HubCore.rolled_back` or :meth:`HubCore.rollback_failed`."""

    name: str
    before: int


@dataclass(frozen=True)
class Log:
    level: int
    message: str


Action = Broadcast | Reply | SendRelease | Load | StoreActive | RollBack | Log


class HubCore:
    def __init__(self, hub_id: str, *, limits: Limits | None = None, fleet: Fleet | None = None,
                 stats: Counter[str] | None = None) -> None:
        self.hub_id = hub_id
        self.limits = limits or Limits()
        self.fleet = fleet if fleet is not None else Fleet(self.limits.max_fleet_entries)
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.server = ReleaseServer("hub", self.limits, self.stats)
        self.latest: dict[str, Release] = {}
        self.active: dict[str, int] = {}  # the seq active fleet-wide per model
        # per model, the seqs the store holds (what a Load may find) and whether each is staged
        self.stored: dict[str, dict[int, bool]] = {}
        self.held: dict[str, int] = {}  # the highest seq any node reported per model
        self.waves: dict[str, WaveRollout] = {}
        self._older: OrderedDict[tuple[str, int], Release] = OrderedDict()
        self._parked: dict[tuple[str, int], list[tuple[bytes, P.FetchManifest | P.FetchChunks]]] = {}
        self._activating: dict[str, tuple[int, set[str]]] = {}  # repeated every beat until done
        self._lost: set[tuple[str, str]] = set()

    # -- the catalog -------------------------------------------------------------------------
    def restore(self, latest: Release, active: int, stored: dict[int, bool]) -> None:
        """What the store held at start, per model: its newest release, the active seq, and
        each stored seq with whether it was published staged."""
        m = latest.manifest
        self.latest[m.name], self.active[m.name], self.stored[m.name] = latest, active, dict(stored)

    def released(self, rel: Release, now: float, plan: P.WavePlan | None = None,
                 started_at: float = 0.0) -> list[Action]:
        """``rel`` is stored: broadcast it and, for a rollout in waves, start it."""
        m = rel.manifest
        self.stored.setdefault(m.name, {})[m.seq] = m.staged
        current = self.latest.get(m.name)
        skip = same_chunks(current.manifest, m) if current is not None else frozenset()
        if current is None or current.manifest.seq < m.seq:
            self.latest[m.name] = rel
            if not m.staged:
                self.active[m.name] = m.seq
                self._activating.pop(m.name, None)
            wave = self.waves.get(m.name)
            if wave is not None:
                wave.supersede(m.seq)
        else:
            self._keep_older(rel)
        self.stats["broadcasts"] += 1
        self.stats["chunks_not_sent"] += len(skip)
        out: list[Action] = [SendRelease(rel, skip), *self.beats()]
        if plan is None:
            return out
        rows = [r for r in self.fleet.rows(now)
                if r.model == m.name and r.state not in (P.ModelState.LOST, P.ModelState.STOPPED)]
        wave = WaveRollout(m.name, m.seq, plan, [(r.node, r.labels) for r in rows], now,
                           started_at=started_at, before=self.active.get(m.name, 0))
        self.waves[m.name] = wave
        out.append(Log(logging.INFO, f"{m.name} seq {m.seq}: rolling out in waves of {wave.counts} nodes"))
        return out + self._carry_waves(wave.start(now))

    def adopted(self, name: str, latest: Release | None, active: int,
                stored: dict[int, bool]) -> list[Action]:
        """Another hub on the shared store stored ``latest`` (None: nothing newer) or activated
        ``active``: hold it for fetches and beats (its storer broadcast it)."""
        self.stored.setdefault(name, {}).update(stored)
        if latest is not None:
            current = self.latest.get(name)
            if current is None or current.manifest.seq < latest.manifest.seq:
                self.latest[name] = latest
                if not latest.manifest.staged:
                    active = max(active, latest.manifest.seq)
                wave = self.waves.get(name)
                if wave is not None:
                    wave.supersede(latest.manifest.seq)
        if active > self.active.get(name, 0):
            self.active[name] = active
            self._activating.pop(name, None)
        return [*self.beats()]

    def take_over(self, name: str, seq: int, before: int, plan: P.WavePlan, reason: str,
                  now: float) -> list[Action]:
        """This hub took the lease of a rollout whose hub stopped renewing it: halt it here."""
        rows = [r for r in self.fleet.rows(now)
                if r.model == name and r.state not in (P.ModelState.LOST, P.ModelState.STOPPED)]
        wave = WaveRollout(name, seq, plan, [(r.node, r.labels) for r in rows], now, before=before)
        self.waves[name] = wave
        return [Log(logging.WARNING, f"{name} seq {seq}: taking over its rollout in waves: {reason}"),
                *self._carry_waves(wave.halt(reason, now, rows))]

    def lease_lost(self, name: str, holder: str) -> list[Action]:
        """Another hub holds the lease of this hub's rollout of ``name`` now: stop driving it."""
        wave = self.waves.get(name)
        if wave is None or not wave.taken_over(holder):
            return []
        self._activating.pop(name, None)
        return [Log(logging.WARNING, f"{name} seq {wave.seq}: {wave.reason}")]

    def find(self, name: str, seq: int) -> Release | None:
        """The release answering ``seq`` of ``name`` if it is in memory (seq 0: the newest)."""
        latest = self.latest.get(name)
        if latest is None or seq == 0 or latest.manifest.seq == seq:
            return latest
        rel = self._older.get((name, seq))
        if rel is not None:
            self._older.move_to_end((name, seq))
        return rel

    def fetch(self, peer: bytes, req: P.FetchManifest | P.FetchChunks) -> list[Action]:
        if isinstance(req, P.FetchChunks):
            refused = self.server.over_credit(peer, req)
            if refused:
                return [*refused]
        rel = self.find(req.name, req.seq)
        if rel is None and req.seq and req.seq in self.stored.get(req.name, {}):
            key = (req.name, req.seq)
            waiting = self._parked.setdefault(key, [])
            if len(waiting) >= PARKED_MAX:  # askers are peers: the queue of them stays bounded
                return [self.server.error(peer, "busy", f"{req.name} seq {req.seq} is being read; retry",
                                          req, retryable=True)]
            waiting.append((peer, req))
            return [Load(req.name, req.seq)] if len(waiting) == 1 else []
        return self._answer(peer, req, rel)

    def loaded(self, rel: Release) -> list[Action]:
        m = rel.manifest
        self._keep_older(rel)
        out: list[Action] = []
        for peer, req in self._parked.pop((m.name, m.seq), []):
            out += self._answer(peer, req, rel)
        return out

    def load_failed(self, name: str, seq: int, message: str) -> list[Action]:
        self.stored.get(name, {}).pop(seq, None)
        out: list[Action] = [Log(logging.ERROR, f"store: cannot read {name} seq {seq}: {message}")]
        for peer, req in self._parked.pop((name, seq), []):
            out += self._answer(peer, req, None)
        return out

    # -- reports and the clock ---------------------------------------------------------------
    def report(self, report: P.Report, now: float) -> list[Action]:
        evicted = self.fleet.evicted
        prev = self.fleet.report(report, now)
        self.stats["fleet_evicted"] += self.fleet.evicted - evicted
        seq = max(report.seq, report.staged)
        if seq > self.held.get(report.model, 0):
            self.held[report.model] = seq
        if prev is not None and (prev.report.state, prev.report.seq) == (report.state, report.seq):
            return []
        why = f" ({report.reason})" if report.reason else ""
        return [Log(logging.INFO, f"node {report.node}: {report.model} seq {report.seq} {report.state}{why}")]

    def tick(self, now: float) -> list[Action]:
        """Every heartbeat interval: liveness, activations still pending, waves, then the beats
        (which repeat the activations still pending)."""
        return [*self._liveness(now), *self._step(now), *self.beats()]

    def beats(self) -> list[Action]:
        whole = {n: r.manifest for n, r in self.latest.items()}
        out: list[Action] = [*ReleaseServer.beats(self.hub_id, whole, self.active)]
        out += [Broadcast(n, P.pack(P.Activate(n, seq, sorted(nodes))))
                for n, (seq, nodes) in sorted(self._activating.items())]
        return out

    # -- activation --------------------------------------------------------------------------
    def activate(self, req: P.Activate, now: float, peer: bytes | None = None) -> tuple[P.Activated | None,
                                                                                        list[Action]]:
        """ACTIVATE from an operator. Node or label activations answer at once; a fleet-wide
        one answers (``peer``) once it is durable (:class:`StoreActive`), so the reply is None.
        Raises :class:`ZmqModelsError` with the reason it is refused."""
        staged = self.stored.get(req.name, {}).get(req.seq) if req.seq else None
        why = activation_refusal(req.name, req.seq, self.active.get(req.name, 0), staged)
        if why:
            raise ZmqModelsError(why)
        if not req.nodes and not req.labels:
            return None, [StoreActive(req.name, req.seq, peer)]
        rows = [r for r in self.fleet.rows(now) if r.model == req.name]
        unknown = set(req.nodes) - {r.node for r in rows}
        if unknown:
            raise ZmqModelsError(f"no node {', '.join(sorted(unknown))} follows {req.name} (see status)")
        nodes = set(req.nodes) | {r.node for r in rows if set(r.labels) & set(req.labels)}
        if not nodes:
            raise ZmqModelsError(f"no node of {req.name} carries label(s) {', '.join(req.labels)}")
        return P.Activated(req.name, req.seq, sorted(nodes)), self._activate_nodes(req.name, req.seq, nodes)

    def stored_active(self, name: str, seq: int, peer: bytes | None) -> list[Action]:
        """``seq`` is recorded active fleet-wide (the store's active seq: never lower)."""
        self.active[name] = max(self.active.get(name, 0), seq)
        self._activating.pop(name, None)
        out: list[Action] = [*self.beats(), Log(logging.INFO, f"{name} seq {seq}: active on every node")]
        if peer is not None:
            out.append(Reply(peer, P.pack(P.Activated(name, seq, [], fleet=True))))
        return out

    def store_active_failed(self, name: str, seq: int, peer: bytes | None, message: str) -> list[Action]:
        out: list[Action] = [Log(logging.ERROR, f"{name} seq {seq}: cannot record it active: {message}")]
        if peer is not None:
            why = f"cannot record {name} seq {seq} active: {message}"
            out.append(self.server.error(peer, "store_error", why))
        return out

    # -- rollbacks of halted waves -----------------------------------------------------------
    def rolled_back(self, name: str, rel: Release, now: float) -> list[Action]:
        wave = self.waves.get(name)
        if wave is not None:
            wave.rolled_back(rel.manifest.seq)
        return [*self.released(rel, now), Log(logging.WARNING, f"{name}: rolled back to seq "
                                                               f"{wave.before if wave else 0}'s content as "
                                                               f"seq {rel.manifest.seq}")]

    def rollback_failed(self, name: str, before: int, message: str) -> list[Action]:
        wave = self.waves.get(name)
        if wave is not None:
            wave.rollback_failed(f"rollback to seq {before} failed: {message}")
        return [Log(logging.ERROR, f"{name}: rollback to seq {before} failed: {message}")]

    # -- what operators see ------------------------------------------------------------------
    def status(self, now: float) -> P.StatusReply:
        models = [P.ModelStatus(n, r.manifest.seq, r.manifest.label, r.manifest.archive_sha256,
                                r.manifest.archive_bytes, self.active.get(n, 0))
                  for n, r in sorted(self.latest.items())]
        return P.StatusReply(self.hub_id, models, self.fleet.rows(now), dict(self.stats),
                             rollouts=[w.status() for _, w in sorted(self.waves.items())])

    def release_infos(self, manifests: list[Manifest], pins: dict[str, list[int]],
                      now: float) -> list[P.ReleaseInfo]:
        rows = self.fleet.rows(now)
        return [P.ReleaseInfo(m.name, m.seq, m.label, m.created_at, m.archive_bytes, m.compressed_bytes,
                              f"{m.codec.name}/{m.codec.filter}", m.signer,
                              int(m.metadata.get("rollback_of", "0") or 0),
                              tally(rows, m.name, m.seq).serving, m.archive_sha256,
                              m.seq in pins.get(m.name, ()))
                for m in manifests]

    # -- internals ---------------------------------------------------------------------------
    def _answer(self, peer: bytes, req: P.FetchManifest | P.FetchChunks, rel: Release | None) -> list[Action]:
        if isinstance(req, P.FetchManifest):
            return [*self.server.manifest(peer, req, rel)]
        return [*self.server.chunks(peer, req, rel).replies]

    def _keep_older(self, rel: Release) -> None:
        key = (rel.manifest.name, rel.manifest.seq)
        self._older[key] = rel
        self._older.move_to_end(key)
        while len(self._older) > OLDER_KEPT:
            self._older.popitem(last=False)

    def _activate_nodes(self, name: str, seq: int, nodes: set[str] | tuple[str, ...]) -> list[Action]:
        seq0, pending = self._activating.get(name, (0, set()))
        pending = set(nodes) | (pending if seq0 == seq else set())
        self._activating[name] = (seq, pending)
        return [Broadcast(name, P.pack(P.Activate(name, seq, sorted(pending)))),
                Log(logging.INFO, f"{name} seq {seq}: activating on {', '.join(sorted(nodes))}")]

    def _liveness(self, now: float) -> list[Action]:
        lost = {(e.report.node, e.report.model) for e in self.fleet.lost(now)}
        gone = self.fleet.prune(now)
        out: list[Action] = [Log(logging.WARNING, f"node {n}: {m} lost (no report for "
                                                  f"{self.fleet.lost_after_s:.0f}s)")
                             for n, m in sorted(lost - self._lost)]
        out += [Log(logging.INFO, f"node {e.report.node}: {e.report.model} forgotten (silent for "
                                  f"{now - e.seen:.0f}s)") for e in gone]
        self._lost = lost - {(e.report.node, e.report.model) for e in gone}
        return out

    def _step(self, now: float) -> list[Action]:
        running = [w for w in self.waves.values() if w.state == P.WaveState.RUNNING]
        if not running and not self._activating:
            return []  # the common case: no fleet table to build every beat
        rows = self.fleet.rows(now)
        # an activation is repeated until each of its nodes serves the seq or refused it; a node
        # that left the table is dropped too, so the set stays bounded by the fleet
        for name, (seq, nodes) in list(self._activating.items()):
            listed = {r.node for r in rows if r.model == name}
            done = {r.node for r in rows if r.model == name and (r.seq >= seq or r.rejected_seq == seq)}
            left = (nodes & listed) - done
            if left:
                self._activating[name] = (seq, left)
            else:
                del self._activating[name]
        out: list[Action] = []
        for wave in running:
            out += self._carry_waves(wave.step(now, rows))
        return out

    def _carry_waves(self, actions: list[ActivateNodes | Finish | Halt]) -> list[Action]:
        out: list[Action] = []
        for action in actions:
            match action:
                case ActivateNodes(name, seq, nodes):
                    out += self._activate_nodes(name, seq, nodes)
                case Finish(name, seq, fleet):
                    out.append(Log(logging.INFO, f"{name} seq {seq}: every wave serves it"))
                    if fleet:
                        out.append(StoreActive(name, seq))
                case Halt(name, seq, reason, failed, back):
                    self._activating.pop(name, None)
                    out.append(Log(logging.ERROR, f"{name} seq {seq}: rollout halted: {reason}; "
                                   + "; ".join(f"{n}: {why}" for n, why in sorted(failed.items()))))
                    wave = self.waves[name]
                    if back and wave.before:
                        out.append(RollBack(name, wave.before))
                    elif back:
                        wave.rollback_failed("nothing to roll back to (no earlier release was active)")
        return out
