"""The hub: one I/O thread owns a PUB (broadcast) and a ROUTER (fetch, reports, control).

Addresses: the hub is known by one address, its ROUTER's; the PUB binds the derived address
(:func:`zmqmodels.protocol.pub_endpoint`). ``tcp://HOST:0`` picks a free port pair.

Threads: the I/O thread is the only one that touches the sockets. Other threads post
callables to a queue and wake it through a fresh inproc PUSH socket of their own; store
writes and whole-archive checks run on a one-thread executor so a 1 GB publish never stalls
fetches or heartbeats.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import zmq

from . import defaults
from . import protocol as P
from .core.fleet import Fleet, rollout
from .core.waves import ActivateNodes, Finish, Halt, WaveRollout, activation_refusal
from .core.waves import plan as wave_plan
from .curve import Curve, ServerContext
from .defaults import Limits
from .endpoints import bind_hub_sockets
from .errors import ProtocolError, StoreError, ZmqModelsError
from .hub_store import ReleaseDesk
from .ioloop import IOThread
from .release import Manifest, Release, stage_release
from .signing import SigningKey, Trust
from .store import Store
from .tuning import trim_heap

__all__ = ["Hub"]

log = logging.getLogger("zmqmodels.hub")
_NOT_FOUND = "not_found"


class Hub(IOThread):
    """A hub, embeddable in any process (a training loop, the ``zmqmodels hub`` daemon).

    ::

        with Hub("tcp://0.0.0.0:5555", Store("releases")) as hub:
            manifest = hub.publish(release)            # stored, seq assigned, broadcast
            hub.wait_for(manifest.name, manifest.seq, count=3, timeout=60)

    Trust: ``signing_key`` signs what this hub publishes or rolls back itself when it is not
    signed already; ``trust`` (keys) makes it refuse releases not signed by one of them; a
    signature present is always checked. ``curve`` secures both sockets (an allowlist there
    admits nodes and publishers); ``control_keys`` (CURVE public keys, z85) further limits
    PUBLISH, ROLLBACK and RESERVE to those peers.

    ``fault`` is a test hook: ``fault(name, seq, index, payload) -> payload`` alters chunks
    as they are *broadcast* (fetch replies are never altered), to exercise repair.
    """

    def __init__(
        self,
        bind: str,
        store: Store | str | os.PathLike[str],
        *,
        heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        limits: Limits | None = None,
        hub_id: str | None = None,
        context: zmq.Context | None = None,
        fault: Callable[[str, int, int, Any], Any] | None = None,
        sndhwm: int = 4096,
        signing_key: SigningKey | None = None,
        trust: Trust | None = None,
        curve: Curve | None = None,
        control_keys: frozenset[bytes] | None = None,
        lost_after_s: float = defaults.NODE_LOST_AFTER_S,
        forget_after_s: float = defaults.NODE_FORGET_AFTER_S,
        metrics: str | None = None,
    ) -> None:
        self.bind = bind
        self.store = store if isinstance(store, Store) else Store(store)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.limits = limits or Limits()
        self.hub_id = hub_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.signing_key = signing_key
        self.trust = trust or Trust()
        self.curve = curve
        if control_keys is not None and (curve is None or curve.allow is None):
            raise ZmqModelsError("control_keys need CURVE with an allowlist: peers are known by their keys")
        self._control_keys = control_keys
        self._server_ctx = ServerContext(curve, context)
        super().__init__(self._server_ctx.ctx)
        self._fault = fault
        self._store_jobs = 0  # PUBLISH/ROLLBACK in the executor (I/O thread's counter)
        self._sndhwm = sndhwm
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zmqmodels-hub-store")
        self._latest: dict[str, Release] = {}
        self._older: OrderedDict[tuple[str, int], Release] = OrderedDict()
        self.fleet = Fleet(self.limits.max_fleet_entries, lost_after_s=lost_after_s,
                           forget_after_s=forget_after_s)
        self._lost: set[tuple[str, str]] = set()
        self.desk = ReleaseDesk(self.store, self.limits, self.trust, signing_key, self._held)
        self._metrics_spec, self._metrics_server = metrics, None
        self._fleet_cond = threading.Condition()  # guards fleet and _latest for other threads
        self._next_beat = 0.0
        # staged rollouts: the seq active fleet-wide per model, the activations not yet
        # confirmed by their nodes (re-broadcast every beat), and each model's wave rollout
        self._active: dict[str, int] = {}
        self._activating: dict[str, tuple[int, set[str]]] = {}
        self._waves: dict[str, WaveRollout] = {}
        self.address = ""
        self.pub_address = ""

    kind = "hub"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Hub:
        for tmp in self.store.clean_temp():
            log.warning("store: removed %s, left by an interrupted write", tmp)
        self._server_ctx.start()
        for name in self.store.names():
            latest = self.store.latest(name)
            if latest is not None:
                self._latest[name] = latest
                self._active[name] = self.store.active(name)
        try:
            super().start(timeout)
        except ZmqModelsError as exc:  # start() closed us (pool, context) already
            raise ZmqModelsError(f"hub failed to start on {self.bind}: {self._start_error or exc}") from None
        if self._metrics_spec:
            from .metrics import HubMetrics, serve_metrics

            try:
                self._metrics_server = serve_metrics(HubMetrics(self).registry, self._metrics_spec)
            except ZmqModelsError:
                self.close()
                raise
        log.info("hub %s: ROUTER %s, PUB %s, %d model(s)", self.hub_id, self.address,
                 self.pub_address, len(self._latest))
        return self

    def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        was_running = self.state.value == "running"
        super().close()
        if was_running:
            self._pool.shutdown(wait=True)
            self._server_ctx.close()

    # -- API for other threads ---------------------------------------------------------------
    def publish(self, release: Release, timeout: float = 60.0, *, staged: bool = False,
                waves: list[str] | None = None, wave_wait_s: float = 0.0,
                halt_on: list[str] | None = None, confirm_s: float = 120.0) -> Manifest:
        """Verify, store and broadcast ``release``; return its manifest. Unsigned, it gets the
        next seq (and is signed as that seq if this hub has a ``signing_key``); signed, it
        keeps the seq it was signed with.

        ``staged``: nodes receive and cache it but keep serving what they serve until it is
        activated (:meth:`activate`). ``waves`` (implies staged): activate it wave by wave,
        as ``zmqmodels publish --waves`` does; :meth:`status` shows the rollout."""
        self._check_running()
        plan = wave_plan(waves or [], wave_wait_s, halt_on or [], confirm_s)
        if staged or plan:
            release = stage_release(release)
        release = self.desk.seal(release)
        stored = self.desk.put(release.manifest_bytes, release.chunks, release.signature)
        self.call(lambda: self._release(stored, plan), timeout)
        return stored.manifest

    def activate(self, name: str, seq: int, nodes: list[str] | None = None,
                 labels: list[str] | None = None, timeout: float = 10.0) -> P.Activated:
        """Serve staged release ``seq`` of ``name`` on ``nodes`` and on nodes carrying any of
        ``labels``; with neither, on every node, for good (nodes that join later included)."""
        self._check_running()
        return self.call(lambda: self._activate(P.Activate(name, seq, nodes or [], labels or [])), timeout)

    def rollback(self, name: str, to: str, timeout: float = 60.0, *,
                 signed: Release | None = None) -> Manifest:
        """Re-broadcast stored content of ``name`` (by label or seq) under a new seq. ``signed``
        is a manifest for it signed elsewhere (its chunks are ignored)."""
        self._check_running()
        stored = self.desk.rollback(name, to, (signed.manifest_bytes, signed.signature) if signed else None)
        self.call(lambda: self._broadcast(stored), timeout)
        return stored.manifest

    def status(self) -> P.StatusReply:
        with self._fleet_cond:
            return self._status_locked()

    def wait_for(self, name: str, seq: int, count: int, timeout: float) -> tuple[bool, P.StatusReply]:
        """Wait until ``count`` nodes report ``name`` at ``seq`` serving. Returns ``(ok, status)``;
        ``ok`` is False at the deadline or as soon as a node rejects that seq."""
        deadline = time.monotonic() + timeout
        with self._fleet_cond:
            while True:
                status = self._status_locked()
                serving, rejected = rollout(status, name, seq)
                left = deadline - time.monotonic()
                if rejected or serving >= count or left <= 0:
                    return serving >= count and not rejected, status
                self._fleet_cond.wait(min(left, 0.5))

    # -- internals: I/O thread ---------------------------------------------------------------
    def _check_running(self) -> None:
        if self.state.value != "running":
            raise ZmqModelsError("the hub is not running")

    def _open(self) -> list[tuple[zmq.Socket, Any]]:
        router, pub = self._socket(zmq.ROUTER), self._socket(zmq.PUB)
        # queued chunk messages share one buffer across subscribers: a high mark costs refs only
        pub.sndhwm = self._sndhwm
        # a peer gets at most this many replies queued (fetches ask for fetch_credit chunks at
        # a time); past it the ROUTER drops replies to that peer, which asks again
        router.sndhwm = 8 * self.limits.fetch_credit
        router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        if self.curve is not None:
            self.curve.serve(router)
            self.curve.serve(pub)
        self.address = bind_hub_sockets(router, pub, self.bind)
        self.pub_address = P.pub_endpoint(self.address)
        self._router, self._pub = router, pub
        return [(router, self._on_router)]

    def _tick(self, now: float) -> float:
        if now >= self._next_beat:
            self._heartbeat()
            self._next_beat = now + self.heartbeat_interval_s
            self._check_liveness(now)
            self._step_waves(now)
        return self._next_beat - now

    def _check_liveness(self, now: float) -> None:
        with self._fleet_cond:
            lost = {(e.report.node, e.report.model) for e in self.fleet.lost(now)}
            gone = self.fleet.prune(now)
            if lost != self._lost or gone:
                self._fleet_cond.notify_all()
        for node, model in sorted(lost - self._lost):
            log.warning("node %s: %s lost (no report for %.0fs)", node, model, self.fleet.lost_after_s)
        for e in gone:
            log.info("node %s: %s forgotten (silent for %.0fs)", e.report.node, e.report.model,
                     now - e.seen)
        self._lost = lost - {(e.report.node, e.report.model) for e in gone}

    def _heartbeat(self) -> None:
        self._pub.send_multipart([P.HUB_TOPIC, *P.pack(P.Heartbeat(hub=self.hub_id))])
        for name, rel in self._latest.items():
            m = rel.manifest
            beat = P.Heartbeat(hub=self.hub_id, name=name, seq=m.seq, sha256=m.archive_sha256,
                               label=m.label, active=self._active.get(name, 0))
            self._pub.send_multipart([P.topic(name), *P.pack(beat)])
        for name, (seq, nodes) in self._activating.items():
            self._pub.send_multipart([P.topic(name), *P.pack(P.Activate(name, seq, sorted(nodes)))])

    def _broadcast(self, release: Release) -> None:
        m = release.manifest
        with self._fleet_cond:  # status() reads _latest from other threads
            current = self._latest.get(m.name)
            if current is None or current.manifest.seq < m.seq:
                self._latest[m.name] = release
                if not m.staged:
                    self._active[m.name] = m.seq
                    self._activating.pop(m.name, None)
                wave = self._waves.get(m.name)
                if wave is not None and wave.state == "running":
                    wave.state, wave.reason = "halted", f"superseded by seq {m.seq}"
        t = P.topic(m.name)
        self._pub.send_multipart([t, *P.pack(P.ManifestFrames(), release.manifest_bytes, release.signature)])
        for i, payload in enumerate(release.chunks):
            if self._fault is not None:
                payload = self._fault(m.name, m.seq, i, payload)
            self._pub.send_multipart([t, *P.pack(P.ChunkHeader(m.name, m.seq, i), payload)], copy=False)
        self.stats["broadcasts"] += 1
        self._heartbeat()
        log.info("broadcast %s seq %d (%s): %d chunks, %d bytes", m.name, m.seq, m.label or "-",
                 m.chunk_count, m.compressed_bytes)

    def _reply(self, ident: Any, *frames: Any) -> None:
        self._router.send_multipart([ident, *frames], copy=False)

    def _error(self, ident: Any, code: str, message: str, name: str = "", seq: int = 0,
               retryable: bool = False, indices: list[int] | None = None) -> None:
        self.stats[f"error_{code}"] += 1
        self._reply(ident, *P.pack(P.ErrorReply(code, message[:1000], name, seq, retryable,
                                                indices=indices or [])))

    def _on_router(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0]
        if len(frames) < 3:
            self.stats["dropped_short"] += 1
            log.warning("dropped a message of %d frame(s) from a peer", len(frames))
            self._error(ident, "bad_message", f"expected at least 2 frames, got {len(frames) - 1}")
            return
        kind = frames[1].bytes
        try:
            msg, payload = P.unpack(frames[1:])
            if isinstance(msg, _CONTROL) and self._control_keys is not None:
                try:
                    peer = frames[1].get("User-Id").encode()
                except zmq.ZMQError:
                    peer = b""
                if peer not in self._control_keys:
                    self._error(ident, "forbidden", f"{kind.decode()} is open to publisher keys only")
                    return
            match msg:
                case P.FetchManifest():
                    self._on_fetch_manifest(ident, msg)
                case P.FetchChunks():
                    self._on_fetch_chunks(ident, msg)
                case P.Report():
                    self._on_report(msg)
                case P.StatusRequest():
                    self._reply(ident, *P.pack(self.status()))
                case P.Publish():
                    self._on_publish(ident, msg, payload)
                case P.Rollback() if len(payload) in (0, 2):
                    signed = (payload[0].bytes, payload[1].bytes) if payload else None
                    self._in_pool(ident, lambda: self.desk.rollback(msg.name, msg.to, signed))
                case P.Reserve():
                    self._in_pool(ident, lambda: self.desk.reserve(msg), self._reserved)
                case P.ReleasesRequest():
                    self._in_pool(ident, lambda: self.desk.manifests(msg.name), self._releases)
                case P.Activate():
                    self._reply(ident, *P.pack(self._activate(msg)))
                case _:
                    raise ProtocolError(f"unexpected {kind[:32]!r} with {len(frames) - 1} frame(s)")
        except ZmqModelsError as exc:
            code = exc.code if exc.code != "error" else "bad_message"
            log.warning("rejected %r from a peer: %s", kind[:32], exc)
            self._error(ident, code, str(exc))

    def _find(self, name: str, seq: int) -> Release | None:
        latest = self._latest.get(name)
        if latest is None or seq == 0 or latest.manifest.seq == seq:
            return latest
        key = (name, seq)
        if key not in self._older:
            if seq not in self.store.seqs(name):
                return None
            self._older[key] = self.store.read(name, seq)
            while len(self._older) > 4:
                self._older.popitem(last=False)
        self._older.move_to_end(key)
        return self._older[key]

    def _on_fetch_manifest(self, ident: Any, req: P.FetchManifest) -> None:
        rel = self._find(req.name, req.seq)
        if rel is None:
            what = f"seq {req.seq}" if req.seq else "any release"
            self._error(ident, _NOT_FOUND, f"hub has no {what} of {req.name!r}", req.name, req.seq)
            return
        self.stats["fetch_manifest"] += 1
        self._reply(ident, *P.pack(P.ManifestFrames(), rel.manifest_bytes, rel.signature))

    def _on_fetch_chunks(self, ident: Any, req: P.FetchChunks) -> None:
        if len(req.indices) > self.limits.fetch_credit:
            self._error(ident, "too_large", f"{len(req.indices)} chunks asked, credit is "
                        f"{self.limits.fetch_credit}", req.name, req.seq, indices=req.indices)
            return
        rel = self._find(req.name, req.seq)
        if rel is None or req.seq == 0:
            self._error(ident, _NOT_FOUND, f"hub no longer has {req.name!r} seq {req.seq}",
                        req.name, req.seq, indices=req.indices)
            return
        for i in req.indices:
            if i >= rel.manifest.chunk_count:
                self._error(ident, "bad_message", f"chunk {i} out of range", req.name, req.seq,
                            indices=req.indices)
                return
        for i in req.indices:
            self._reply(ident, *P.pack(P.ChunkHeader(req.name, req.seq, i), rel.chunks[i]))
        self.stats["fetch_chunks"] += len(req.indices)

    def _held(self, name: str) -> int:
        """The highest seq of ``name`` any node has reported (store side, any thread)."""
        with self._fleet_cond:
            return self.fleet.highest_seq(name)

    def _on_report(self, report: P.Report) -> None:
        with self._fleet_cond:
            evicted = self.fleet.evicted
            prev = self.fleet.report(report, time.monotonic())
            self.stats["fleet_evicted"] += self.fleet.evicted - evicted
            self._fleet_cond.notify_all()
        if prev is None or (prev.report.state, prev.report.seq) != (report.state, report.seq):
            log.info("node %s: %s seq %d %s%s", report.node, report.model, report.seq, report.state,
                     f" ({report.reason})" if report.reason else "")

    def _on_publish(self, ident: Any, hdr: P.Publish, frames: list[zmq.Frame]) -> None:
        # the manifest is decoded, the signature, every chunk and the archive sha256 checked
        # once, in the pool: a large manifest never stalls fetches or heartbeats
        plan = wave_plan(hdr.waves, hdr.wave_wait_s, hdr.halt_on, hdr.confirm_s)
        chunks = [f.buffer for f in frames[1:]]

        def store() -> tuple[Release, float]:
            t0 = time.perf_counter()
            rel = self.desk.put(frames[0].buffer, chunks, hdr.signature, staged=bool(plan))
            return rel, time.perf_counter() - t0

        self._in_pool(ident, store, lambda i, done: self._published(i, done[0], plan, store_s=done[1]))

    def _release(self, rel: Release, plan: dict[str, Any] | None) -> None:
        """Broadcast a stored release and, for a staged rollout in waves, start it."""
        self._broadcast(rel)
        if not plan:
            return
        m = rel.manifest
        now = time.monotonic()
        with self._fleet_cond:
            rows = [r for r in self.fleet.rows(now) if r.model == m.name and r.state != P.ModelState.LOST]
            wave = WaveRollout(m.name, m.seq, plan["waves"], [(r.node, r.labels) for r in rows], now,
                               wave_wait_s=plan["wave_wait_s"], error_rate=plan["error_rate"],
                               confirm_s=plan["confirm_s"], started_at=time.time(),
                               before=self._active.get(m.name, 0))
            self._waves[m.name] = wave
        log.info("%s seq %d: rolling out in waves of %s nodes", m.name, m.seq, wave.counts)
        self._carry_waves(wave.start(now))

    def _published(self, ident: bytes, rel: Release, plan: dict[str, Any] | None = None, *,
                   store_s: float = 0.0) -> None:
        t0 = time.perf_counter()
        self._release(rel, plan)
        m = rel.manifest
        self._reply(ident, *P.pack(P.Published(m.name, m.seq, m.label, m.archive_sha256,
                                               note=self.desk.note(m.name), store_s=round(store_s, 6),
                                               broadcast_s=round(time.perf_counter() - t0, 6))))

    # -- staged rollouts ----------------------------------------------------------------------
    def _activate(self, req: P.Activate) -> P.Activated:
        """ACTIVATE from an operator: resolve labels to the nodes that carry them now."""
        rel = self._find(req.name, req.seq) if req.seq else None
        why = activation_refusal(req.name, req.seq, self._active.get(req.name, 0),
                                 rel.manifest.staged if rel is not None else None)
        if why:
            raise ZmqModelsError(why)
        if not req.nodes and not req.labels:
            self._activate_fleet(req.name, req.seq)
            return P.Activated(req.name, req.seq, [], fleet=True)
        with self._fleet_cond:
            rows = [r for r in self.fleet.rows(time.monotonic()) if r.model == req.name]
        unknown = set(req.nodes) - {r.node for r in rows}
        if unknown:
            raise ZmqModelsError(f"no node {', '.join(sorted(unknown))} follows {req.name} (see status)")
        nodes = set(req.nodes) | {r.node for r in rows if set(r.labels) & set(req.labels)}
        if not nodes:
            raise ZmqModelsError(f"no node of {req.name} carries label(s) {', '.join(req.labels)}")
        self._activate_nodes(req.name, req.seq, nodes)
        return P.Activated(req.name, req.seq, sorted(nodes))

    def _activate_nodes(self, name: str, seq: int, nodes: set[str] | tuple[str, ...]) -> None:
        seq0, pending = self._activating.get(name, (0, set()))
        pending = set(nodes) | (pending if seq0 == seq else set())
        self._activating[name] = (seq, pending)
        self._pub.send_multipart([P.topic(name), *P.pack(P.Activate(name, seq, sorted(pending)))])
        log.info("%s seq %d: activating on %s", name, seq, ", ".join(sorted(nodes)))

    def _activate_fleet(self, name: str, seq: int) -> None:
        active = self.store.activate(name, seq)
        with self._fleet_cond:
            self._active[name] = max(self._active.get(name, 0), active)
        self._activating.pop(name, None)
        self._heartbeat()
        log.info("%s seq %d: active on every node", name, seq)

    def _step_waves(self, now: float) -> None:
        running = [w for w in self._waves.values() if w.state == "running"]
        if not running and not self._activating:
            return  # the common case: no fleet table to build every beat
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
        for wave in running:
            with self._fleet_cond:  # status() reads the wave from other threads
                actions = wave.step(now, rows)
            self._carry_waves(actions)

    def _carry_waves(self, actions: list[Any]) -> None:
        for action in actions:
            match action:
                case ActivateNodes(name, seq, nodes):
                    self._activate_nodes(name, seq, nodes)
                case Finish(name, seq, fleet):
                    log.info("%s seq %d: every wave serves it", name, seq)
                    if fleet:
                        self._activate_fleet(name, seq)
                case Halt(name, seq, reason, failed, back):
                    self._activating.pop(name, None)
                    log.error("%s seq %d: rollout halted: %s; %s", name, seq, reason,
                              "; ".join(f"{n}: {why}" for n, why in sorted(failed.items())))
                    if back:
                        self._roll_back(self._waves[name], back)
            with self._fleet_cond:
                self._fleet_cond.notify_all()

    def _roll_back(self, wave: WaveRollout, nodes: tuple[str, ...]) -> None:
        """Nodes of a halted wave serve (or load) its release: publish the content the fleet
        served before under a new seq, so they go back and no node steps back in seq."""
        before = wave.before
        if not before:
            wave.reason += "; nothing to roll back to (no earlier release was active)"
            return

        def rolled(rel: Release) -> None:
            wave.rollback_seq = rel.manifest.seq
            self._broadcast(rel)
            log.warning("%s: rolled back %s to seq %d's content as seq %d", wave.name,
                        ", ".join(nodes), before, rel.manifest.seq)
            with self._fleet_cond:
                self._fleet_cond.notify_all()

        def failed(code: str, message: str) -> None:
            wave.reason += f"; rollback to seq {before} failed: {message}"
            log.error("%s: rollback to seq %d failed: %s", wave.name, before, message)

        self._store_work(lambda: self.desk.rollback(wave.name, str(before)), rolled, failed)

    def releases(self, name: str = "") -> list[P.ReleaseInfo]:
        """The stored releases of ``name`` (all models if empty), oldest first, with how many
        live nodes serve each."""
        return self._release_infos(self.desk.manifests(name))

    def _release_infos(self, manifests: list[Manifest]) -> list[P.ReleaseInfo]:
        rows = self.status().nodes
        return [P.ReleaseInfo(m.name, m.seq, m.label, m.created_at, m.archive_bytes, m.compressed_bytes,
                              f"{m.codec.name}/{m.codec.filter}", m.signer,
                              int(m.metadata.get("rollback_of", "0") or 0),
                              sum(r.model == m.name and r.seq == m.seq and r.state == "serving"
                                  for r in rows), m.archive_sha256)
                for m in manifests]

    def _releases(self, ident: bytes, manifests: list[Manifest]) -> None:
        self._reply(ident, *P.pack(P.ReleasesReply(self._release_infos(manifests))))

    def _reserved(self, ident: bytes, result: tuple[str, int, Any]) -> None:
        name, seq, base = result
        self._reply(ident, *P.pack(P.Reserved(name, seq), base))

    def _in_pool(self, ident: Any, work: Callable[[], Any],
                 then: Callable[[bytes, Any], None] | None = None) -> None:
        """Store work a peer asked for (at most ``max_store_jobs`` at once, ``busy`` beyond);
        ``then`` (default: broadcast and reply PUBLISHED) gets the result, errors are replied."""
        then = then or self._published
        ident = ident.bytes
        if self._store_jobs >= self.limits.max_store_jobs:
            self._error(ident, "busy", f"{self._store_jobs} releases are being stored; retry",
                        retryable=True)
            return
        self._store_jobs += 1

        def ok(result: Any) -> None:
            self._store_jobs -= 1
            then(ident, result)

        def failed(code: str, message: str) -> None:
            self._store_jobs -= 1
            self._error(ident, code, message)

        self._store_work(work, ok, failed)

    def _store_work(self, work: Callable[[], Any], then: Callable[[Any], None],
                    fail: Callable[[str, str], None]) -> None:
        """Run ``work`` on the store executor, never on the I/O thread; back on the I/O thread,
        ``then(result)`` or ``fail(code, message)``."""
        def done(fut: concurrent.futures.Future[Any]) -> None:
            def finish() -> None:
                try:
                    result = fut.result()
                except (ZmqModelsError, StoreError) as exc:
                    if isinstance(exc, StoreError):
                        log.error("store: %s", exc)
                    fail(exc.code, str(exc))
                    return
                except Exception as exc:
                    log.exception("store work failed")
                    fail("internal", f"{type(exc).__name__}: {exc}")
                    return
                then(result)

            self.post(finish)

        def work_then_trim() -> Any:
            try:
                return work()
            finally:
                trim_heap()  # the PUBLISH frames are garbage now; hand their pages back

        self._pool.submit(work_then_trim).add_done_callback(done)

    def _status_locked(self) -> P.StatusReply:
        models = [P.ModelStatus(n, r.manifest.seq, r.manifest.label, r.manifest.archive_sha256,
                                r.manifest.archive_bytes) for n, r in sorted(self._latest.items())]
        return P.StatusReply(self.hub_id, models, self.fleet.rows(time.monotonic()), dict(self.stats),
                             rollouts=[w.status() for _, w in sorted(self._waves.items())])



_CONTROL = (P.Publish, P.Rollback, P.Reserve, P.Activate)

