"""The hub: one I/O thread owns a PUB (broadcast) and a ROUTER (fetch, reports, control).

Addresses: the hub is known by one address, its ROUTER's; the PUB binds the derived address
(:func:`zmqmodels.protocol.pub_endpoint`). ``tcp://HOST:0`` picks a free port pair.

Every decision is :class:`~zmqmodels.core.hub.HubCore`'s: this shell feeds it events and
carries out its actions. Threads: the I/O thread is the only one that touches the sockets and
the core; other threads post callables to it (``status`` and ``activate`` run there too).
Store and disk work (storing a publish, reading an older release for a fetch, recording an
activation, a rollback) runs on a one-thread executor, never on the I/O thread, so a 1 GB
publish never stalls fetches or heartbeats.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from . import defaults
from . import protocol as P
from .core.fleet import Fleet, tally
from .core.hub import HubCore, Load, Log, RollBack, SendRelease, StoreActive
from .core.serve import Broadcast, Reply
from .core.waves import check_plan
from .curve import Curve, ServerContext
from .defaults import Limits
from .endpoints import bind_hub_sockets
from .errors import ProtocolError, StoreError, ZmqModelsError
from .exporter import MetricsServer
from .hub_store import ReleaseDesk
from .ioloop import IOThread
from .release import Manifest, Release, stage_release
from .signing import SigningKey, Trust
from .store import Store
from .tuning import trim_heap

__all__ = ["Hub"]

log = logging.getLogger("zmqmodels.hub")
_CONTROL = (P.Publish, P.Rollback, P.Reserve, P.Activate)


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
        if control_keys is not None and (curve is None or curve.allow is None):
            raise ZmqModelsError("control_keys need CURVE with an allowlist: peers are known by their keys")
        self.curve, self._control_keys, self._fault, self._sndhwm = curve, control_keys, fault, sndhwm
        self._server_ctx = ServerContext(curve, context)
        super().__init__(self._server_ctx.ctx)
        hub_id = hub_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        fleet = Fleet(self.limits.max_fleet_entries, lost_after_s=lost_after_s, forget_after_s=forget_after_s)
        self.core = HubCore(hub_id, limits=self.limits, fleet=fleet, stats=self.stats)
        self.desk = ReleaseDesk(self.store, self.limits, trust or Trust(), signing_key,
                                lambda name: self.core.held.get(name, 0))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zmqmodels-hub-store")
        self._store_jobs = 0  # PUBLISH/ROLLBACK in the executor (I/O thread's counter)
        self._changed = threading.Condition()  # notified after the I/O thread handled an event
        self._next_beat = 0.0
        self._metrics = MetricsServer(metrics, "hub", self)
        self.address = self.pub_address = ""

    kind = "hub"

    @property
    def hub_id(self) -> str:
        return self.core.hub_id

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Hub:
        for tmp in self.store.clean_temp():
            log.warning("store: removed %s, left by an interrupted write", tmp)
        self._server_ctx.start()
        for name in self.store.names():
            latest = self.store.latest(name)
            if latest is not None:
                self.core.restore(latest, self.store.active(name), set(self.store.seqs(name)))
        try:
            super().start(timeout)
        except ZmqModelsError as exc:  # start() closed us (pool, context) already
            raise ZmqModelsError(f"hub failed to start on {self.bind}: {self._start_error or exc}") from None
        self._metrics.start(self.close)
        log.info("hub %s: ROUTER %s, PUB %s, %d model(s)", self.hub_id, self.address,
                 self.pub_address, len(self.core.latest))
        return self

    def close(self) -> None:
        self._metrics.stop()
        was_running = self.state.value == "running"
        super().close()
        if was_running:
            self._pool.shutdown(wait=True)
            self._server_ctx.close()

    # -- API for other threads ---------------------------------------------------------------
    def publish(self, release: Release, timeout: float = 60.0, *, staged: bool = False,
                plan: P.WavePlan | None = None) -> Manifest:
        """Verify, store and broadcast ``release``; return its manifest. Unsigned, it gets the
        next seq (and is signed as that seq if this hub has a ``signing_key``); signed, it
        keeps the seq it was signed with.

        ``staged``: nodes receive and cache it but keep serving what they serve until it is
        activated (:meth:`activate`). ``plan`` (implies staged): activate it wave by wave, as
        ``zmqmodels publish --waves`` does; :meth:`status` shows the rollout."""
        self._check_running()
        check_plan(plan)
        if staged or plan:
            release = stage_release(release)
        stored = self._put(release)
        now, wall = time.monotonic(), time.time()
        self.call(lambda: self._carry(self.core.released(stored, now, plan, wall)), timeout)
        return stored.manifest

    def activate(self, name: str, seq: int, nodes: list[str] | None = None,
                 labels: list[str] | None = None, timeout: float = 10.0) -> P.Activated:
        """Serve staged release ``seq`` of ``name`` on ``nodes`` and on nodes carrying any of
        ``labels``; with neither, on every node, for good (nodes that join later included)."""
        self._check_running()
        req = P.Activate(name, seq, nodes or [], labels or [])
        reply, actions = self.call(lambda: self.core.activate(req, time.monotonic()), timeout)
        if reply is not None:
            self.call(lambda: self._carry(actions), timeout)
            return reply
        (store,) = actions  # fleet-wide: durable first, here on the caller's thread
        active = self.store.activate(name, store.seq)
        self.call(lambda: self._carry(self.core.stored_active(name, active, None)), timeout)
        return P.Activated(name, seq, [], fleet=True)

    def rollback(self, name: str, to: str, timeout: float = 60.0, *,
                 signed: Release | None = None) -> Manifest:
        """Re-broadcast stored content of ``name`` (by label or seq) under a new seq. ``signed``
        is a manifest for it signed elsewhere (its chunks are ignored)."""
        self._check_running()
        stored = self.desk.rollback(name, to, (signed.manifest_bytes, signed.signature) if signed else None)
        self.call(lambda: self._carry(self.core.released(stored, time.monotonic())), timeout)
        return stored.manifest

    def status(self, timeout: float = 10.0) -> P.StatusReply:
        """The fleet table, the models and the rollouts, as the I/O thread sees them now."""
        return self.call(lambda: self.core.status(time.monotonic()), timeout)

    def releases(self, name: str = "") -> list[P.ReleaseInfo]:
        """The stored releases of ``name`` (all models if empty), oldest first, with how many
        live nodes serve each."""
        manifests = self.desk.manifests(name)
        return self.call(lambda: self.core.release_infos(manifests, time.monotonic()), 10.0)

    def wait_for(self, name: str, seq: int, count: int, timeout: float) -> tuple[bool, P.StatusReply]:
        """Wait until ``count`` nodes report ``name`` at ``seq`` serving. Returns ``(ok, status)``;
        ``ok`` is False at the deadline or as soon as a node rejects that seq."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            t = tally(status.nodes, name, seq)
            left = deadline - time.monotonic()
            if t.rejected or t.reached(count) or left <= 0:
                return t.reached(count), status
            with self._changed:
                self._changed.wait(min(left, 0.5))

    # -- internals: I/O thread ---------------------------------------------------------------
    def _put(self, release: Release) -> Release:
        release = self.desk.seal(release)
        return self.desk.put(release.manifest_bytes, release.chunks, release.signature)

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
            self._next_beat = now + self.heartbeat_interval_s
            self._carry(self.core.tick(now))
        return self._next_beat - now

    def _carry(self, actions: list[Any]) -> None:
        for action in actions:
            match action:
                case Broadcast(name, frames):
                    self._pub.send_multipart([P.topic(name) if name else P.HUB_TOPIC, *frames])
                case Reply(peer, frames):
                    self._router.send_multipart([peer, *frames], copy=False)
                case SendRelease(rel):
                    self._send_release(rel)
                case Load(name, seq):
                    self._store_work(lambda n=name, s=seq: self.store.read(n, s), self.core.loaded,
                                     lambda _c, msg, n=name, s=seq: self.core.load_failed(n, s, msg))
                case StoreActive(name, seq, peer):
                    self._store_work(lambda n=name, s=seq: self.store.activate(n, s),
                                     lambda active, n=name, p=peer: self.core.stored_active(n, active, p),
                                     lambda _c, msg, n=name, s=seq, p=peer: self.core.store_active_failed(
                                         n, s, p, msg))
                case RollBack(name, before):
                    self._store_work(lambda n=name, b=before: self.desk.rollback(n, str(b)),
                                     lambda rel, n=name: self.core.rolled_back(n, rel, time.monotonic()),
                                     lambda _c, msg, n=name, b=before: self.core.rollback_failed(n, b, msg))
                case Log(level, message):
                    log.log(level, "%s", message)
        with self._changed:
            self._changed.notify_all()

    def _send_release(self, release: Release) -> None:
        m = release.manifest
        t = P.topic(m.name)
        self._pub.send_multipart([t, *P.pack(P.ManifestFrames(), release.manifest_bytes, release.signature)])
        for i, payload in enumerate(release.chunks):
            if self._fault is not None:
                payload = self._fault(m.name, m.seq, i, payload)
            self._pub.send_multipart([t, *P.pack(P.ChunkHeader(m.name, m.seq, i), payload)], copy=False)
        log.info("broadcast %s seq %d (%s): %d chunks, %d bytes", m.name, m.seq, m.label or "-",
                 m.chunk_count, m.compressed_bytes)

    def _error(self, ident: Any, code: str, message: str, retryable: bool = False) -> None:
        self.stats[f"error_{code}"] += 1
        self._router.send_multipart([ident, *P.pack(P.ErrorReply(code, message[:1000], retryable=retryable))])

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
            if isinstance(msg, _CONTROL) and not self._may_control(frames[1]):
                self._error(ident, "forbidden", f"{kind.decode()} is open to publisher keys only")
                return
            peer, now = ident.bytes, time.monotonic()
            match msg:
                case P.FetchManifest() | P.FetchChunks():
                    self._carry(self.core.fetch(peer, msg))
                case P.Report():
                    self._carry(self.core.report(msg, now))
                case P.StatusRequest():
                    self._router.send_multipart([ident, *P.pack(self.core.status(now))])
                case P.Publish():
                    self._on_publish(peer, msg, payload)
                case P.Rollback() if len(payload) in (0, 2):
                    signed = (payload[0].bytes, payload[1].bytes) if payload else None
                    self._in_pool(peer, lambda: self.desk.rollback(msg.name, msg.to, signed), self._published)
                case P.Reserve():
                    self._in_pool(peer, lambda: self.desk.reserve(msg), self._reserved)
                case P.ReleasesRequest():
                    self._in_pool(peer, lambda: self.desk.manifests(msg.name), self._releases)
                case P.Activate():
                    reply, actions = self.core.activate(msg, now, peer)
                    if reply is not None:
                        self._router.send_multipart([ident, *P.pack(reply)])
                    self._carry(actions)
                case _:
                    raise ProtocolError(f"unexpected {kind[:32]!r} with {len(frames) - 1} frame(s)")
        except ZmqModelsError as exc:
            code = exc.code if exc.code != "error" else "bad_message"
            log.warning("rejected %r from a peer: %s", kind[:32], exc)
            self._error(ident, code, str(exc))

    def _may_control(self, frame: zmq.Frame) -> bool:
        if self._control_keys is None:
            return True
        try:
            return frame.get("User-Id").encode() in self._control_keys
        except zmq.ZMQError:
            return False

    def _on_publish(self, peer: bytes, hdr: P.Publish, frames: list[zmq.Frame]) -> None:
        # the manifest is decoded, the signature, every chunk and the archive sha256 checked
        # once, in the pool: a large manifest never stalls fetches or heartbeats
        check_plan(hdr.plan)
        chunks = [f.buffer for f in frames[1:]]

        def store() -> tuple[Release, float]:
            t0 = time.perf_counter()
            rel = self.desk.put(frames[0].buffer, chunks, hdr.signature, staged=hdr.plan is not None)
            return rel, time.perf_counter() - t0

        self._in_pool(peer, store, lambda p, done: self._published(p, done[0], hdr.plan, store_s=done[1]))

    def _published(self, peer: bytes, rel: Release, plan: P.WavePlan | None = None, *,
                   store_s: float = 0.0) -> None:
        t0 = time.perf_counter()
        self._carry(self.core.released(rel, time.monotonic(), plan, time.time()))
        m = rel.manifest
        self._router.send_multipart([peer, *P.pack(P.Published(
            m.name, m.seq, m.label, m.archive_sha256, note=self.desk.note(m.name), store_s=round(store_s, 6),
            broadcast_s=round(time.perf_counter() - t0, 6)))])

    def _releases(self, peer: bytes, manifests: list[Manifest]) -> None:
        infos = self.core.release_infos(manifests, time.monotonic())
        self._router.send_multipart([peer, *P.pack(P.ReleasesReply(infos))])

    def _reserved(self, peer: bytes, result: tuple[str, int, Any]) -> None:
        name, seq, base = result
        self._router.send_multipart([peer, *P.pack(P.Reserved(name, seq), base)], copy=False)

    def _in_pool(self, peer: bytes, work: Callable[[], Any], then: Callable[[bytes, Any], None]) -> None:
        """Store work a peer asked for (at most ``max_store_jobs`` at once, ``busy`` beyond);
        ``then(peer, result)`` on the I/O thread; errors are replied."""
        if self._store_jobs >= self.limits.max_store_jobs:
            self._error(peer, "busy", f"{self._store_jobs} releases are being stored; retry", retryable=True)
            return
        self._store_jobs += 1

        def ok(result: Any) -> list[Any]:
            self._store_jobs -= 1
            then(peer, result)
            return []

        def failed(code: str, message: str) -> list[Any]:
            self._store_jobs -= 1
            self._error(peer, code, message)
            return []

        self._store_work(work, ok, failed)

    def _store_work(self, work: Callable[[], Any], then: Callable[[Any], list[Any]],
                    fail: Callable[[str, str], list[Any]]) -> None:
        """Run ``work`` on the store executor, never on the I/O thread; back on the I/O thread,
        carry out ``then(result)`` or ``fail(code, message)``."""
        def done(fut: concurrent.futures.Future[Any]) -> None:
            def finish() -> None:
                try:
                    result = fut.result()
                except (ZmqModelsError, StoreError) as exc:
                    if isinstance(exc, StoreError):
                        log.error("store: %s", exc)
                    self._carry(fail(exc.code, str(exc)))
                    return
                except Exception as exc:
                    log.exception("store work failed")
                    self._carry(fail("internal", f"{type(exc).__name__}: {exc}"))
                    return
                self._carry(then(result))

            self.post(finish)

        def work_then_trim() -> Any:
            try:
                return work()
            finally:
                trim_heap()  # the PUBLISH frames are garbage now; hand their pages back

        self._pool.submit(work_then_trim).add_done_callback(done)
