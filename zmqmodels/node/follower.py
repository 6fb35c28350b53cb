"""The subscriber's network side: receive, repair and verify releases (the *follower*).

A shell around :class:`~zmqmodels.core.assembly.Assembler`: one I/O thread owns a SUB (broadcasts)
and a DEALER (fetches and reports), feeds the core what arrives and sends what it asks for.
A second thread checks each complete archive's sha256, writes it to the cache (signed bytes
and all) and hands it to ``on_release(manifest, archive)``, newest first: a consumer slower
than the releases skips the ones it could not take in time.

To *serve* the releases in-process (load, check, swap, predict) use the embedded host,
:class:`zmqmodels.Subscriber` (:mod:`zmqmodels.node.embedded`), which is composed on a follower;
``zmqmodels serve`` (:class:`~zmqmodels.node.node.Node`) composes one with worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .. import defaults
from .. import protocol as P
from ..core.assembly import Assembler, Assembly, Deliver, RetryStore, Send, Unstage
from ..defaults import Limits
from ..errors import ProtocolError, StoreError, ZmqModelsError
from ..protocol import ModelState
from ..release.cache import Cache
from ..release.manifest import Manifest, manifest_frames, validate_name
from ..release.signing import Trust
from ..transport.buffers import BufferPool
from ..transport.curve import Curve
from ..transport.ioloop import IOThread, LoopState
from ..transport.tuning import lower_thread_priority, tune_malloc
from ..transport.upstream import connect_upstream, hub_list
from .delivery import Delivery, ReleaseCallback

__all__ = ["Follower", "FollowOptions", "default_node_id"]

log = logging.getLogger("zmqmodels.follower")


class ReceiveCpu:
    """The receiving thread's CPU time, added to the releases it works on (``Assembly.cpu_s``):
    each handler's time goes to every release being received (a handler works on one, a
    heartbeat costs next to nothing) and to those it completed. I/O thread only."""

    def __init__(self, coming: Callable[[], Iterable[Assembly]]) -> None:
        self._coming = coming
        self._completed: list[Assembly] = []  # by the handler running now

    def timed(self, handler: Callable[[list[zmq.Frame]], None]) -> Callable[[list[zmq.Frame]], None]:
        def run(frames: list[zmq.Frame]) -> None:
            t0 = time.thread_time()
            try:
                handler(frames)
            finally:
                dt = time.thread_time() - t0
                for asm in [*self._coming(), *self._completed]:
                    asm.cpu_s += dt
                self._completed.clear()

        return run

    def completed(self, asm: Assembly) -> None:
        self._completed.append(asm)


@dataclass(frozen=True)
class FollowOptions:
    """How a follower follows, whoever composes it (:class:`Follower`, the embedded
    :class:`~zmqmodels.node.embedded.Subscriber`, the :class:`~zmqmodels.node.node.Node`).

    ``node_id`` (default :func:`default_node_id`) is what the hub lists; ``device`` what it reports;
    ``labels`` what the hub's waves and activations select on. ``trust`` (keys) accepts only
    releases signed by one of them: a manifest that fails is refused before a byte of its
    archive is allocated, and the hub hears why. ``curve`` connects both sockets with CURVE to
    the hub's key. The rest tune the intake (``limits``, ``rcvhwm``, ``hub_ttl_s``,
    ``repair_idle_s``), its reports (``report_interval_s``) and its threads (``tune_malloc``,
    ``background_nice``: a serving node runs its follower below its broker)."""

    node_id: str | None = None
    device: str = ""
    labels: Sequence[str] = ()
    trust: Trust | None = None
    curve: Curve | None = None
    limits: Limits | None = None
    rcvhwm: int = defaults.SUB_RCVHWM
    report_interval_s: float = defaults.HEARTBEAT_INTERVAL_S
    hub_ttl_s: float = defaults.HUB_TTL_S
    repair_idle_s: float = defaults.REPAIR_IDLE_S
    tune_malloc: bool = True
    background_nice: int = 0


def default_node_id(cache: Cache | str | os.PathLike[str] | None) -> str:
    """The host and a digest of the cache directory's real path: a node restarted on the same
    machine and cache keeps its id (and its row in the hub's table); one with no cache is
    ``host-pid``."""
    host = socket.gethostname()
    if cache is None:
        return f"{host}-{os.getpid()}"
    root = cache.root if isinstance(cache, Cache) else Path(cache)
    return f"{host}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"


class Follower(IOThread):
    """Follow the releases of ``models`` from the hub at ``hub`` (its one address), or from
    several hubs on one shared store (a list: broadcasts from all, reports to each, fetches to
    whichever is connected, duplicates dropped by seq and digest).

    ``on_release(manifest, archive)`` runs on the delivery thread for every verified release;
    ``archive`` is a read-write memoryview valid only until the callback returns (its buffer
    is reused for a later release): copy or write it out to keep it. An exception from it
    rejects the release (reported to the hub with its reason). Report what became of a
    release with :meth:`report`. ``accept(manifest)`` runs first and may return False to
    decline a release (it is then neither cached nor handed on). ``known`` maps model names
    to the seq already held (e.g. from a local cache) so only newer releases are fetched;
    ``serving`` maps those the host already serves to ``(seq, label)``: reported so from the
    first report on. ``cache`` keeps every verified release (signature included) before it is
    handed on. ``options``: :class:`FollowOptions`.

    A release published *staged* is verified and cached, then held until the hub activates
    it for this node; only then does ``on_release`` see it. ``staged`` names releases held in
    the cache across a restart. ``counts(name) -> (requests, errors)`` is what the host
    answered, sent with each report (the hub's waves halt on error rates).
    """

    kind = "sub"

    def __init__(
        self,
        hub: str | Sequence[str],
        models: Sequence[str],
        *,
        on_release: ReleaseCallback,
        options: FollowOptions | None = None,
        accept: Callable[[Manifest], bool] | None = None,
        known: dict[str, int] | None = None,
        serving: dict[str, tuple[int, str]] | None = None,
        staged: dict[str, Manifest] | None = None,
        cache: Cache | str | Path | None = None,
        context: zmq.Context | None = None,
        counts: Callable[[str], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(context or zmq.Context.instance())
        o = options or FollowOptions()
        self.hubs = hub_list(hub)
        self.hub = ", ".join(self.hubs)
        self.pub_address = ", ".join(P.pub_endpoint(h) for h in self.hubs)
        self.device = o.device or "cpu"
        self.limits = o.limits or Limits()
        self.cache = Cache(cache) if isinstance(cache, str | Path) else cache
        self.node_id = o.node_id or default_node_id(self.cache)
        self.trust = o.trust or Trust()
        self.curve = o.curve
        self._tune_malloc = o.tune_malloc
        self._nice = o.background_nice  # a serving node runs its subscriber below its broker
        self._rcvhwm = o.rcvhwm
        self._report_interval_s = o.report_interval_s
        self._pool = BufferPool()
        self.assembler = Assembler([validate_name(n) for n in models], node_id=self.node_id,
                                   host=socket.gethostname(), pid=os.getpid(), device=self.device,
                                   take=self._pool.take, give=self._pool.give, limits=self.limits,
                                   base=self.cache.newest_archive if self.cache is not None else None,
                                   trust=self.trust, known=known, repair_idle_s=o.repair_idle_s,
                                   hub_ttl_s=o.hub_ttl_s, labels=o.labels,
                                   staged=staged)
        self.assembler.use_stats(self.stats)  # one counter for the shell and its core
        for name, (seq, label) in (serving or {}).items():  # the first report (at start) says so
            self.assembler.set_state(name, ModelState.SERVING, seq=seq, label=label)
        self.labels = list(o.labels)
        self._counts = counts
        # the thread that checks, caches and hands on what the core completes, newest first
        self._delivery = Delivery(self, node_id=self.node_id, cache=self.cache, pool=self._pool,
                                  on_release=on_release, accept=accept, stats=self.stats,
                                  nice=o.background_nice)
        self._next_report = 0.0
        self._next_room_check = 0.0  # statvfs of the cache while a write waits for room
        self._cpu = ReceiveCpu(lambda: self.assembler.intake.coming.values())  # type: ignore[arg-type]

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Follower:
        if self._tune_malloc and self.state is LoopState.NEW:
            tune_malloc()
        self._delivery.start()
        try:
            super().start(timeout)
        except ZmqModelsError as exc:
            raise ZmqModelsError(f"subscriber failed to start: {self._start_error or exc}") from None
        return self

    def close(self) -> None:
        super().close()
        self._delivery.close()

    # -- API for other threads ---------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self.assembler.models)

    @property
    def hub_seen(self) -> float:
        """Monotonic time of the last message from the hub (0: never)."""
        return self.assembler.hub_seen

    def report(self, name: str, state: ModelState | str, *, seq: int | None = None,
               label: str | None = None, reason: str = "") -> None:
        """Tell the hub what became of ``name`` (``loaded``, ``serving``, ``rejected`` ...)."""
        if state not in P.STATES:
            raise ValueError(f"unknown state {state!r}")
        self.post(lambda: self._carry(self.assembler.set_state(name, ModelState(state), seq=seq,
                                                               label=label, reason=reason)))

    def stage(self, name: str, seq: int, *, how: str = "", why: str = "", fmt: str = "",
              **seconds: float) -> None:
        """Record stage timings of release ``seq``, how it was taken in and the format it serves
        as (sent with reports)."""
        self.post(lambda: self.assembler.stage(name, seq, how=how, why=why, fmt=fmt, **seconds))

    def refetch(self, name: str, seq: int) -> None:
        """This node's copy of ``seq`` is damaged or gone: fetch it from the hub again."""
        self.post(lambda: self._carry(self.assembler.forget(name, seq, time.monotonic())))

    def reject(self, m: Manifest, reason: str) -> None:
        """``m`` failed after delivery: never fetch it again, and tell the hub why."""
        log.warning("%s: rejected %s seq %d: %s", self.node_id, m.name, m.seq, reason)
        self.post(lambda: self.assembler.rejected(m.name, m.seq))
        self.report(m.name, ModelState.REJECTED, seq=m.seq, label=m.label, reason=reason)

    # -- I/O thread --------------------------------------------------------------------------
    def _open(self) -> list[tuple[zmq.Socket, Any]]:
        lower_thread_priority(self._nice)
        # a low mark: the hub's queue shares one buffer across nodes, ours would copy the
        # whole release into fresh pages ahead of the reader
        up = connect_upstream(self._socket, self.hubs, list(self.assembler.models),
                              limits=self.limits, rcvhwm=self._rcvhwm, curve=self.curve)
        self._up = up
        self._carry(self.assembler.start(time.monotonic()))
        on_dealer = self._cpu.timed(self._on_dealer)
        return [(up.sub, self._cpu.timed(self._on_sub)), *((d, on_dealer) for d in up.dealers)]

    def _teardown(self) -> None:
        """Say ``stopped`` (not left to go ``lost``): the reports get a moment to leave."""
        for dealer in self._up.dealers:
            dealer.setsockopt(zmq.LINGER, defaults.STOP_REPORT_LINGER_MS)
        self._carry(self.assembler.stopping())

    def _tick(self, now: float) -> float:
        if now >= self._next_room_check:
            self._next_room_check = now + defaults.ROOM_CHECK_INTERVAL_S
            for name, need in self.assembler.unstored.pending().items():
                if self.cache is not None and self.cache.free_bytes() >= need + defaults.ROOM_MARGIN_BYTES:
                    self.assembler.unstored.room(name, now)
        self._carry(self.assembler.tick(now))
        if now >= self._next_report:
            if self._counts is not None:
                for name in self.assembler.models:
                    self.assembler.count(name, *self._counts(name))
            self._carry(self.assembler.reports())
            self._next_report = now + self._report_interval_s
        return 0.05

    def _carry(self, actions: list[Any]) -> None:
        for action in actions:
            match action:
                case Send(msg):
                    self._up.send(msg)
                case Deliver(name, asm):
                    self._cpu.completed(asm)  # this handler's CPU counts for it too
                    self._delivery.mail(name, action)
                case Unstage(name):
                    self._delivery.mail(name, action)
                case RetryStore(name, asm, digest, active):  # delivered again: checked, written, served
                    self._delivery.mail(name, Deliver(name, asm, digest, active))

    def _on_sub(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            raise ProtocolError(f"broadcast of {len(frames)} frame(s)")
        topic = frames[0].bytes
        now = time.monotonic()
        self.assembler.heard(now)
        msg, payload = P.unpack(frames[1:])
        if topic == P.HUB_TOPIC:
            if not isinstance(msg, P.Heartbeat):
                raise ProtocolError(f"unexpected {type(msg).__name__} on the hub topic")
            return
        name = topic[:-1].decode(errors="replace")
        if not topic.endswith(b"\0") or name not in self.assembler.models:
            raise ProtocolError(f"broadcast on unsubscribed topic {topic[:64]!r}")
        match msg:
            case P.ManifestFrames():
                m, raw, sig = manifest_frames(payload, self.limits)
                if m.name != name:
                    raise ProtocolError(f"manifest for {m.name!r} on topic {name!r}")
                self._carry(self.assembler.on_manifest(m, raw, sig, now))
            case P.ChunkHeader():
                if msg.name != name:
                    raise ProtocolError(f"chunk for {msg.name!r} on topic {name!r}")
                self._carry(self.assembler.on_chunk(msg, payload[0].buffer, now, fetched=False))
            case P.PatchHeader():
                if msg.name != name:
                    raise ProtocolError(f"patch for {msg.name!r} on topic {name!r}")
                self._carry(self.assembler.on_patch(msg, payload[0].buffer, now))
            case P.Heartbeat():
                if msg.name == name:
                    self._carry(self.assembler.on_beat(msg, now))
            case P.Activate():
                if msg.name != name:
                    raise ProtocolError(f"activation for {msg.name!r} on topic {name!r}")
                self._carry(self.assembler.on_activate(msg))
            case _:
                raise ProtocolError(f"unexpected broadcast {type(msg).__name__}")

    def _on_dealer(self, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        self.assembler.heard(now)
        msg, payload = P.unpack(frames)
        match msg:
            case P.ManifestFrames():
                m, raw, sig = manifest_frames(payload, self.limits)
                self._carry(self.assembler.on_manifest(m, raw, sig, now, fetched=True))
            case P.ChunkHeader():
                self._carry(self.assembler.on_chunk(msg, payload[0].buffer, now, fetched=True))
            case P.ErrorReply():
                if msg.code != "not_found" or msg.name not in self.assembler.models:
                    log.warning("%s: hub error %s: %s", self.node_id, msg.code, msg.message)
                self._carry(self.assembler.on_error(msg, now))
            case _:
                raise ProtocolError(f"unexpected reply {type(msg).__name__}")

    # -- what the delivery thread tells it (node/delivery.Follows) ------------------------------
    def stored(self, name: str) -> None:
        self.post(lambda: self.assembler.unstored.stored(name))

    def hold(self, m: Manifest, buf: Any) -> None:
        self.post(lambda: self._carry(self.assembler.hold(m, buf)))

    def served(self, name: str, seq: int) -> None:
        self.post(lambda: self.assembler.served(name, seq))

    def store_failed(self, asm: Assembly, digest: str, exc: StoreError) -> None:
        """Not a rejection: the release is fine, this node could not write it. Keep the
        verified bytes, say so with the whole reason (the state stays ``error`` until a write
        succeeds), keep serving what it has, and write it again later: never fetch it again."""
        m = asm.manifest
        self.stats["store_failed"] += 1

        def apply() -> None:
            delay = self.assembler.store_failed(asm, digest, time.monotonic())
            if not delay:
                return  # a newer release supersedes it
            reason = (f"cache write failed: {exc}; kept in memory, writing again as soon as the disk "
                      f"has room (at the latest in {delay:.0f}s)")
            log.error("%s: %s seq %d: %s", self.node_id, m.name, m.seq, reason)
            self._carry(self.assembler.set_state(m.name, ModelState.ERROR, seq=m.seq, label=m.label,
                                                 reason=reason))

        self.post(apply)
