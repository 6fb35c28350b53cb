"""The hub: one I/O thread owns a PUB (broadcast) and a ROUTER (fetch, reports, control).

Addresses: the hub is known by one address, its ROUTER's; the PUB binds the derived address
(:func:`zmqmodels.protocol.pub_endpoint`). ``tcp://HOST:0`` picks a free port pair.

Every decision is :class:`~zmqmodels.core.hub.HubCore`'s: this shell feeds it events and
carries out its actions. Threads: the I/O thread is the only one that touches the sockets and
the core; other threads post callables to it (``status`` and ``activate`` run there too).
Store and disk work (storing a publish, reading an older release for a fetch, recording an
activation, a rollback) runs on one worker thread, never on the I/O thread
(:class:`~zmqmodels.hub.jobs.StoreJobs`), so a 1 GB publish never stalls fetches or beats.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from .. import defaults
from .. import protocol as P
from ..core.fleet import Fleet, wait_for
from ..core.hub import HubCore, Load, Log, RollBack, SendRelease, StoreActive
from ..core.serve import Broadcast, Reply
from ..core.waves import check_plan
from ..defaults import Limits
from ..errors import ProtocolError, ZmqModelsError
from ..release.catalog import Catalog
from ..release.manifest import Manifest, Release, stage_release
from ..release.signing import SigningKey, Trust
from ..release.store import Store, open_store
from ..transport.curve import Curve, ServerContext, peer_allowed
from ..transport.endpoints import bind_hub_sockets
from ..transport.exporter import MetricsServer
from ..transport.ioloop import IOThread, LoopState
from .desk import ReleaseDesk
from .jobs import StoreJobs
from .watch import StoreWatch

__all__ = ["Hub"]

log = logging.getLogger("zmqmodels.hub")
_CONTROL = (P.Publish, P.Rollback, P.Reserve, P.Activate, P.Pin)


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

    ``store_poll_s``: how often to read what other hubs on a shared store stored and activated
    (:class:`~zmqmodels.hub.watch.StoreWatch`; default: every second on S3, never on a
    directory; 0: never).

    ``fault`` is a test hook: ``fault(name, seq, index, payload) -> payload`` alters chunks
    as they are *broadcast* (fetch replies are never altered), to exercise repair.
    """

    def __init__(
        self,
        bind: str,
        store: Catalog | str | os.PathLike[str],
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
        store_poll_s: float | None = None,
    ) -> None:
        self.bind = bind
        self.store = store if isinstance(store, Catalog) else open_store(store)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.limits = limits or Limits()
        if control_keys is not None and (curve is None or curve.allow is None):
            raise ZmqModelsError("control_keys need CURVE with an allowlist: peers are known by their keys")
        self.curve, self._control_keys, self._fault, self._sndhwm = curve, control_keys, fault, sndhwm
        self._server_ctx = ServerContext(curve, context)
        super().__init__(self._server_ctx.ctx)
        self.hub_id = hub_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        fleet = Fleet(self.limits.max_fleet_entries, lost_after_s=lost_after_s, forget_after_s=forget_after_s)
        self.core = HubCore(self.hub_id, limits=self.limits, fleet=fleet, stats=self.stats)
        self.desk = ReleaseDesk(self.store, self.limits, trust or Trust(), signing_key,
                                lambda name: self.core.held.get(name, 0))
        self._jobs = StoreJobs(self)
        if store_poll_s is None:  # a bucket is shared by design; a directory by one hub, usually
            store_poll_s = defaults.STORE_POLL_S if not isinstance(self.store, Store) else 0.0
        self._watch = StoreWatch(self, store_poll_s)
        self._changed = threading.Condition()  # notified after the I/O thread handled an event
        self._next_beat = 0.0
        self._metrics = MetricsServer(metrics, "hub", self)
        self.address = self.pub_address = ""

    kind = "hub"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Hub:
        for tmp in self.store.clean_temp():
            log.warning("store: removed %s, left by an interrupted write", tmp)
        self._server_ctx.start()
        for latest, active, stored in self.desk.holdings():
            self.core.restore(latest, active, stored)
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
        was_running = self.state is LoopState.RUNNING
        super().close()
        if was_running:
            self._server_ctx.close()

    # -- API for other threads ---------------------------------------------------------------
    def publish(self, release: Release, timeout: float = 60.0, *, staged: bool = False,
                plan: P.WavePlan | None = None, reuse_label: bool = False, rebase: bool = True) -> Manifest:
        """Verify, store and broadcast ``release``; return its manifest. Unsigned, it gets the
        next seq (and is signed as that seq if this hub has a ``signing_key``); signed, it
        keeps the seq it was signed with.

        ``staged``: nodes receive and cache it but keep serving what they serve until it is
        activated (:meth:`activate`). ``plan`` (implies staged): activate it wave by wave, as
        ``zmqmodels publish --waves`` does; :meth:`status` shows the rollout. ``reuse_label``
        and ``rebase``: as :meth:`~zmqmodels.clients.hub.HubClient.publish`."""
        self._check_running()
        check_plan(plan)
        rel = _rebased(self, release) if rebase else release
        rel = self.desk.seal(stage_release(rel) if staged or plan else rel)
        stored = self.desk.put(rel.manifest_bytes, rel.chunks, rel.signature, reuse_label=reuse_label)
        self.call(lambda: self.release(stored, plan), timeout)
        return stored.manifest

    def activate(self, name: str, seq: int, nodes: list[str] | None = None,
                 labels: list[str] | None = None, timeout: float = 10.0) -> P.Activated:
        """Serve staged release ``seq`` of ``name`` on ``nodes`` and on nodes carrying any of
        ``labels``; with neither, on every node, for good (nodes that join later included)."""
        self._check_running()
        req = P.Activate(name, seq, nodes or [], labels or [])
        reply, actions = self.call(lambda: self.core.activate(req, time.monotonic()), timeout)
        if reply is not None:
            self.call(lambda: self.carry(actions), timeout)
            return reply
        (store,) = actions  # fleet-wide: durable first, here on the caller's thread
        active = self.store.activate(name, store.seq)
        self.call(lambda: self.carry(self.core.stored_active(name, active, None)), timeout)
        return P.Activated(name, seq, [], fleet=True)

    def rollback(self, name: str, to: str, timeout: float = 60.0, *,
                 signed: Release | None = None) -> Manifest:
        """Re-broadcast stored content of ``name`` (by label or seq) under a new seq. ``signed``
        is a manifest for it signed elsewhere (its chunks are ignored)."""
        self._check_running()
        stored = self.desk.rollback(name, to, (signed.manifest_bytes, signed.signature) if signed else None)
        self.call(lambda: self.release(stored), timeout)
        return stored.manifest

    def status(self, timeout: float = 10.0) -> P.StatusReply:
        """The fleet table, the models and the rollouts, as the I/O thread sees them now."""
        return self.call(lambda: self.core.status(time.monotonic()), timeout)

    def releases(self, name: str = "") -> list[P.ReleaseInfo]:
        """The stored releases of ``name`` (all models if empty), oldest first, with how many
        live nodes serve each."""
        manifests, pins = self.desk.listing(name)
        return self.call(lambda: self.core.release_infos(manifests, pins, time.monotonic()), 10.0)

    def pin(self, name: str, to: str, *, on: bool = True) -> P.Pinned:
        """Keep release ``to`` (a label or seq) of ``name`` through retention (``on``), or not."""
        return self.desk.pin(P.Pin(name, to, on))

    def wait_for(self, name: str, seq: int, count: int, timeout: float, *,
                 staged: bool = False) -> tuple[bool, P.StatusReply]:
        """:func:`zmqmodels.core.fleet.wait_for` on this hub, woken by each event it handles."""
        def pause(s: float) -> None:
            with self._changed:
                self._changed.wait(s)

        return wait_for(self.status, name, seq, count, timeout, clock=time.monotonic, pause=pause,
                        staged=staged)

    # -- internals: I/O thread ---------------------------------------------------------------
    def _check_running(self) -> None:
        if self.state is not LoopState.RUNNING:
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
        self._watch.tick(now)
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_interval_s
            self.carry(self.core.tick(now))
        return self._next_beat - now

    def carry(self, actions: list[Any]) -> None:
        for action in actions:
            match action:
                case Broadcast(name, frames):
                    self._pub.send_multipart([P.topic(name) if name else P.HUB_TOPIC, *frames])
                case Reply(peer, frames):
                    self.reply(peer, frames)
                case SendRelease(rel, skip):
                    self._send_release(rel, skip)
                case Load() | StoreActive() | RollBack():
                    self._jobs.carry(action)
                case Log(level, message):
                    log.log(level, "%s", message)
        with self._changed:
            self._changed.notify_all()

    def _send_release(self, release: Release, skip: frozenset[int]) -> None:
        m = release.manifest
        t = P.topic(m.name)
        self._pub.send_multipart([t, *P.pack(P.ManifestFrames(), release.manifest_bytes, release.signature)])
        sent = 0
        for i, hdr, payload in chunk_messages(release, skip):
            if self._fault is not None:
                payload = self._fault(m.name, m.seq, i, payload)
            self._pub.send_multipart([t, *P.pack(hdr, payload)], copy=False)
            sent += len(payload)
        log.info("broadcast %s seq %d (%s): %d of %d chunks (%d as patches), %d of %d bytes", m.name,
                 m.seq, m.label or "-", m.chunk_count - len(skip), m.chunk_count, len(release.patches),
                 sent, m.compressed_bytes)

    # -- I/O thread: for StoreJobs ------------------------------------------------------
    def reply(self, peer: Any, frames: list[Any]) -> None:
        self._router.send_multipart([peer, *frames], copy=False)

    def error(self, peer: Any, code: str, message: str, retryable: bool = False) -> None:
        self.stats[f"error_{code}"] += 1
        self.reply(peer, P.pack(P.ErrorReply(code, message[:1000], retryable=retryable)))

    def release(self, rel: Release, plan: P.WavePlan | None = None) -> None:
        """``rel`` is stored: broadcast it (and start its rollout in waves)."""
        self.carry(self.core.released(rel, time.monotonic(), plan, time.time()))

    def _on_router(self, frames: list[zmq.Frame]) -> None:
        ident = frames[0]
        misdirected = P.wrong_peer(frames, "hub")
        if misdirected is not None:
            self.stats["error_wrong_peer"] += 1
            self._router.send_multipart(misdirected, copy=False)
            return
        if len(frames) < 3:
            self.stats["dropped_short"] += 1
            log.warning("dropped a message of %d frame(s) from a peer", len(frames))
            self.error(ident, "bad_message", f"expected at least 2 frames, got {len(frames) - 1}")
            return
        kind = frames[1].bytes
        try:
            msg, payload = P.unpack(frames[1:])
            if isinstance(msg, _CONTROL) and not peer_allowed(frames[1], self._control_keys):
                self.error(ident, "forbidden", f"{kind.decode()} is open to publisher keys only")
                return
            peer, now = ident.bytes, time.monotonic()
            match msg:
                case P.FetchManifest() | P.FetchChunks():
                    self.carry(self.core.fetch(peer, msg))
                case P.Report():
                    self.carry(self.core.report(msg, now))
                case P.StatusRequest():
                    self.reply(ident, P.pack(self.core.status(now)))
                case P.Publish() | P.Rollback() | P.Reserve() | P.ReleasesRequest() | P.Pin():
                    self._jobs.handle(peer, msg, payload)
                case P.Activate():
                    reply, actions = self.core.activate(msg, now, peer)
                    if reply is not None:
                        self.reply(ident, P.pack(reply))
                    self.carry(actions)
                case _:
                    raise ProtocolError(f"unexpected {kind[:32]!r} with {len(frames) - 1} frame(s)")
        except ZmqModelsError as exc:
            code = exc.code if exc.code != "error" else "bad_message"
            log.warning("rejected %r from a peer: %s", kind[:32], exc)
            self.error(ident, code, str(exc))


def chunk_messages(release: Release, skip: frozenset[int]) -> Iterator[tuple[int, Any, Any]]:
    """``(index, header, payload)`` of each chunk a broadcast sends: CHUNK, or PATCH where the
    release has a patch against the previous one (docs/protocol.md §Deltas)."""
    m = release.manifest
    for i, payload in enumerate(release.chunks):
        if i in skip:
            continue
        patch = release.patches.get(i)
        if patch is None:
            yield i, P.ChunkHeader(m.name, m.seq, i), payload
        else:
            yield i, P.PatchHeader(m.name, m.seq, i, patch[0]), patch[1]


def _rebased(hub: Hub, release: Release) -> Release:
    """``release`` as a delta on the release the fleet serves, when it holds the same code."""
    if release.signature or not release.manifest.tensors:
        return release
    from ..model.weights import WeightsPublisher

    release, line = WeightsPublisher(_Local(hub)).rebase(release)
    log.info("publish %s: %s", release.manifest.name, line)
    return release


class _Local:
    """This process's hub as :class:`~zmqmodels.model.weights.WeightsPublisher` asks one: its status
    and its store."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def status(self) -> P.StatusReply:
        return self._hub.status()

    def fetch(self, name: str, seq: int = 0, *, manifest_only: bool = False) -> Release:
        store = self._hub.store
        return store.read(name, seq) if seq else store.latest(name)  # type: ignore[return-value]
