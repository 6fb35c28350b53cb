"""A serving node: the front process (torch-free) and its worker processes.

The front is a shell around three cores: :class:`~zmqmodels.core.broker.Broker` (who serves each
request, when a worker loads; with :class:`~zmqmodels.core.swap.Swaps`'s fairness and
monotonic-version rules) and :class:`~zmqmodels.core.supervisor.Supervisor` (spawn, health,
back-off). Its one I/O thread owns a ROUTER for clients (plain ZeroMQ REQ) and a ROUTER for
its workers (DEALER, over ipc), feeds the cores what arrives and carries out what they return.

Its :class:`~zmqmodels.node.follower.Follower` receives each release once per node, verifies it,
writes it into the cache, whose file CPU workers map (one copy per node); the broker then
**rolls** it through the workers one at a time (``LOAD`` -> load or weight-only apply, check,
warm-up, swap -> ``LOADED``). A loading worker serves nobody, so with two or more workers no
request waits for a load; with one, requests queue (bounded), or with ``unload-first`` get a
retryable ``unavailable``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

import zmq

from .. import defaults
from .. import protocol as P
from ..core.broker import Broker
from ..core.supervisor import Activity, Kill, Spawn, Supervisor
from ..core.swap import SwapPolicy, Target
from ..core.work import Action, Changed, Dispatch, Expire, Load, Refetch, Refuse, Rejected
from ..defaults import Limits
from ..errors import ZmqModelsError
from ..protocol import Refusal
from ..release.cache import Cache
from ..release.manifest import Manifest, validate_name
from ..release.signing import Trust
from ..transport.curve import Curve, ServerContext
from ..transport.exporter import MetricsServer
from ..transport.health import hub_down, node_health
from ..transport.ioloop import IOThread, LoopState
from ..transport.upstream import hub_list
from ..transport.wire import send_frames
from .follower import Follower, FollowOptions, default_node_id
from .host import WorkerProcesses, WorkerSite, check_devices
from .pool import WorkerMessages
from .reports import HubReports
from .requests import MODELS, admit, describe, work_frames
from .worker_boot import command as worker_command

__all__ = ["Node"]

log = logging.getLogger("zmqmodels.node")
def _checked(swap_policy: SwapPolicy | str, workers: int, devices: Sequence[str], curve: Curve | None,
             hub: str | Sequence[str] | None) -> SwapPolicy:
    """The swap policy, once the node's arguments hold together (else one line saying why)."""
    if curve is not None and hub and curve.server_key is None:
        raise ZmqModelsError("a node with CURVE keys needs the hub's public key")
    try:
        policy = SwapPolicy(swap_policy)
    except ValueError:
        raise ZmqModelsError(f"swap policy must be one of {[p.value for p in SwapPolicy]}, "
                             f"not {swap_policy!r}") from None
    if workers < 1:
        raise ZmqModelsError("a node needs at least one worker")
    if len(devices) not in (1, workers):
        raise ZmqModelsError(f"give one device, or one per worker ({workers}), not {len(devices)}")
    return policy


class Node(IOThread):
    """Serve ``models`` on ``bind`` with ``workers`` processes, following the hub at ``hub``.

    ``devices`` is one device for all workers or one per worker (``["cuda:0", "cuda:1"]``).
    ``hub=None`` serves the cache alone.

    ``trust`` loads only releases signed by its keys (checked on receipt and again on the
    cache at start). ``curve``: this node's CURVE keys; its ``server_key`` is the hub's, its
    ``allow`` the clients admitted to the inference socket.
    """

    kind = "node"
    burst = 1024

    def __init__(
        self,
        hub: str | Sequence[str] | None,
        models: Sequence[str],
        bind: str,
        *,
        workers: int = 2,
        devices: Sequence[str] = ("cpu",),
        cache: str | os.PathLike[str] = ".zmqmodels/cache",
        node_id: str | None = None,
        swap_policy: SwapPolicy | str = SwapPolicy.AVAILABILITY,
        limits: Limits | None = None,
        threads_per_worker: int = 1,
        queue_max: int = defaults.NODE_QUEUE_MAX,
        queue_timeout_s: float = defaults.NODE_QUEUE_TIMEOUT_S,
        worker_ttl_s: float = defaults.WORKER_TTL_S,
        worker_start_timeout_s: float = defaults.WORKER_START_TIMEOUT_S,
        request_timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        load_timeout_s: float = defaults.LOAD_TIMEOUT_S,
        context: zmq.Context | None = None,
        trust: Trust | None = None,
        curve: Curve | None = None,
        metrics: str | None = None,
        hub_unreachable_s: float = defaults.HUB_UNREACHABLE_S,
        labels: Sequence[str] = (),
        max_batch: int = defaults.MAX_BATCH,
        batch_delay_s: float = defaults.BATCH_DELAY_S,
        unbatched: Sequence[str] = (),
    ) -> None:
        self.swap_policy = policy = _checked(swap_policy, workers, devices, curve, hub)
        self.hubs = hub_list(hub) if hub else []  # several: hubs on one shared store
        self.hub = ", ".join(self.hubs)
        self.models, self.labels, self.bind = [validate_name(m) for m in models], list(labels), bind
        self.node_id = node_id or default_node_id(cache)
        self.limits, self.cache, self.trust = limits or Limits(), Cache(cache), trust or Trust()
        self.curve = curve
        self._server_ctx = ServerContext(curve, context)
        super().__init__(self._server_ctx.ctx)
        self._threads_per_worker = threads_per_worker
        wids = [f"{self.node_id}/w{i}" for i in range(workers)]
        self._site = WorkerSite.make(wids, devices)
        self._procs = WorkerProcesses(wids)
        self.broker = Broker(self.models, wids, path_for=lambda n, s: str(self.cache.path(n, s)),
                             policy=policy, queue_max=queue_max, queue_timeout_s=queue_timeout_s,
                             max_batch=max_batch, batch_delay_s=batch_delay_s)
        self.unbatched = set(unbatched)  # models whose requests are never joined
        self.supervisor = Supervisor(wids, ttl_s=worker_ttl_s, start_timeout_s=worker_start_timeout_s,
                                     request_timeout_s=request_timeout_s,
                                     load_timeout_s=load_timeout_s)
        self.reports = HubReports(self.models, self.broker, self.supervisor, self.cache, self.stats)
        self._workers = WorkerMessages(self.node_id, wids, self.broker, self.supervisor, self.reports,
                                       self.stats, carry=self._carry, send_reply=self._reply,
                                       metrics=lambda: self.metrics)
        self._sub: Follower | None = None
        self.hub_unreachable_s = hub_unreachable_s
        self._draining, self._hub_down_logged, self._started_at = False, False, time.monotonic()
        self._metrics = MetricsServer(metrics, "node", self)
        self.metrics: Any = None  # NodeMetrics once started with metrics=
        self.address = ""
        self.local_address = f"ipc://{self._site.dir}/front"  # the same socket, for this host's gateway

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Node:
        try:
            check_devices(sorted(set(self._site.devices.values())))
            self.cache.lock()  # one node per cache directory
        except ZmqModelsError:
            self._cleanup()
            raise
        self._server_ctx.start()
        # verify the cache before any worker starts: workers load from it without hashing again
        known, staged = {}, {}
        for name in self.models:
            found, held = self.cache.startup(name, trust=self.trust)
            if held is not None:
                staged[name] = held  # held until the hub activates it
            if found is not None:
                known[name] = found[0].seq
        self._started_at = time.monotonic()
        try:
            super().start(timeout)  # workers are spawned (and respawned) by the I/O thread alone
        except ZmqModelsError as exc:  # start() closed us (and so cleaned up) already
            raise ZmqModelsError(f"node failed to start on {self.bind}: {self._start_error or exc}") from None
        if self.hub:
            devices = ",".join(sorted(set(self._site.devices.values())))
            follow = FollowOptions(node_id=self.node_id, device=devices, limits=self.limits, trust=self.trust,
                                   curve=self.curve, labels=self.labels, background_nice=10)
            self._sub = Follower(self.hubs, self.models, on_release=self._on_release, options=follow,
                                 known=known, cache=self.cache, context=self._ctx, staged=staged,
                                 counts=self.reports.counts)
            self.reports.follower = self._sub
            self._sub.start()
            self.post(lambda: [self.reports.changed(n) for n in self.models])  # workers may be up already
        self._metrics.start(lambda: self.close(drain_s=0))
        self.metrics = self._metrics.collector
        log.info("node %s serving %s on %s with %d worker(s)", self.node_id, self.models,
                 self.address, len(self._procs))
        return self

    def close(self, drain_s: float = defaults.NODE_DRAIN_S) -> None:
        """Stop: refuse new requests (retryable ``unavailable``), answer those queued and in
        flight for up to ``drain_s``, then stop the workers. Idempotent."""
        if self.state is LoopState.CLOSED:
            return
        self._metrics.stop()
        if self._sub is not None:
            self._sub.close()
        if self.serving and drain_s > 0:
            self._drain(drain_s)
        super().close()
        self._cleanup()

    def _drain(self, timeout: float) -> None:
        self.post(lambda: setattr(self, "_draining", True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.call(self.broker.busy, 5.0):
                    return
            except ZmqModelsError:
                return
            time.sleep(0.02)
        log.warning("node %s: requests still in flight after %.0fs; stopping anyway", self.node_id, timeout)

    def _cleanup(self) -> None:
        self._procs.stop()
        shutil.rmtree(self._site.dir, ignore_errors=True)
        self._site.dir_lock.close()
        self.cache.unlock()
        self._server_ctx.close()

    def hub_silence(self, now: float | None = None) -> float:
        """Seconds since the hub was last heard from (since start if never; 0 without a hub)."""
        if not self.hub:
            return 0.0
        now = time.monotonic() if now is None else now
        seen = self._sub.hub_seen if self._sub is not None else 0.0
        return now - (seen or self._started_at)

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        """What an operator's probe wants (:func:`~zmqmodels.transport.health.node_health`), as the I/O
        thread sees it now."""
        return self.call(lambda: node_health(self), timeout)

    def follower_stats(self, timeout: float = 5.0) -> dict[str, int]:
        """The counters of this node's subscriber (bytes received, repairs, refusals), as its
        I/O thread sees them now."""
        sub = self._sub
        return sub.call(lambda: dict(sub.stats), timeout) if sub is not None else {}

    def worker_pids(self) -> dict[str, int]:
        """``worker id -> pid`` of the worker processes running now."""
        return self._procs.pids()

    # -- other threads -> I/O thread ---------------------------------------------------------
    def _on_release(self, m: Manifest, archive: Any) -> None:
        """Subscriber delivery thread: the verified archive is in the cache; roll it out."""
        target = Target(m.name, m.seq, str(self.cache.path(m.name, m.seq)), m.label)

        def roll() -> None:
            now = time.monotonic()
            self.reports.ledger.rolling(m.name, m.seq, now)
            self._carry(self.broker.target(target, now))

        self.post(roll)
    # -- I/O thread --------------------------------------------------------------------------
    def _open(self) -> list[tuple[zmq.Socket, Any]]:
        front, back = self._socket(zmq.ROUTER), self._socket(zmq.ROUTER)
        back.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its identity
        # a hard cap per frame, enforced by libzmq before it buffers: requests a little over the
        # limit still get a `too_large` reply, grossly oversized frames cost the connection
        front.setsockopt(zmq.MAXMSGSIZE, self.limits.max_request_bytes + (1 << 20))
        if self.curve is not None:
            self.curve.serve(front)
        back.bind(self._site.backend)
        if self.bind.startswith("tcp://") and self.bind.endswith(":0"):
            port = front.bind_to_random_port(self.bind[: -len(":0")])
            self.address = f"{self.bind[: -len(':0')]}:{port}"
        else:
            front.bind(self.bind)
            self.address = self.bind
        front.bind(self.local_address)
        self._front, self._back = front, back
        return [(back, self._workers.on_message), (front, self._on_client)]

    def _tick(self, now: float) -> float:
        for wid, code in self._procs.exited():
            self._workers.died(wid, code, now)
        for action in self.supervisor.tick(now):
            match action:
                case Spawn(wid):
                    self._spawn(wid, now)
                case Kill(wid, reason):
                    log.warning("worker %s %s; killing it", wid, reason)
                    self._procs.kill(wid)
        self._carry(self.broker.tick(now))
        why = hub_down(self, now)
        if bool(why) != self._hub_down_logged:
            self._hub_down_logged = bool(why)
            log.log(logging.WARNING if why else logging.INFO, "node %s: %s", self.node_id,
                    why or f"hub {self.hub} heard again")
        return 0.1

    def _wake_at(self) -> float:
        return self.broker.wake_at  # a batch held back goes then

    def _teardown(self) -> None:
        for wid, slot in self.broker.workers.items():
            if slot.ready:
                send_frames(self._back, [wid.encode(), *P.pack(P.StopWorker())])

    def _spawn(self, wid: str, now: float) -> None:
        args = worker_command(self._site.backend, wid, self._site.devices[wid], str(self.cache.root),
                              self._threads_per_worker, self.models, os.getpid(), self._site.map_cache)
        self._procs.spawn(wid, args)
        self.supervisor.spawned(wid, now)

    def _carry(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Dispatch(wid, reqs, waited):
                    send_frames(self._back, work_frames(action), copy=False)
                    now = time.monotonic()
                    self.supervisor.seen(wid, now, Activity.BUSY)
                    if self.metrics is not None:
                        self.metrics.dispatched(reqs[0].model, sum(r.rows for r in reqs), waited, now,
                                                [r.received for r in reqs])
                case Load(wid, target, unload_first):
                    cmd = P.LoadCommand(target.name, target.seq, target.path, unload_first=unload_first)
                    send_frames(self._back, [wid.encode(), *P.pack(cmd)])
                    self.supervisor.seen(wid, time.monotonic(), Activity.LOADING)
                    log.info("worker %s: loading %s seq %d", wid, target.name, target.seq)
                case Refuse(req, code, message):
                    if code == "not_ready" and (why := hub_down(self)):
                        message += f"; {why}"
                    self._error(req.client, code, message, req.rid, req.model)
                case Expire(req):
                    self.stats["expired"] += 1  # the client gave up: nobody to answer
                case Rejected(name, seq, reason):
                    self.reports.rejected(name, seq, reason)
                case Refetch(name, seq, reason):
                    self.reports.refetch(name, seq, reason)
                case Changed(name):
                    self.reports.changed(name)

    # clients ---------------------------------------------------------------------------------
    def _reply(self, frames: list[Any]) -> None:
        send_frames(self._front, frames, copy=False)

    def _error(self, client: Any, code: str, message: str, rid: str = "", model: str = "") -> None:
        self.stats[f"error_{code}"] += 1
        if model in self.models:
            self.reports.ledger.answer(model, self.broker.report(model)[1], code)
        if self.metrics is not None:
            self.metrics.refused(model if model in self.models else "", code)
        send_frames(self._front, [client, b"", *P.pack(P.serving_error(code, message, model, rid))])

    def _on_client(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        if len(frames) < 3 or frames[1].bytes != b"":
            self.stats["dropped_not_req"] += 1  # not a REQ envelope: nowhere to answer
            return
        if frames[2].bytes == MODELS:  # what is served now, answered at once (a gateway's view)
            reply = describe(frames[2:], self.node_id, self.models, self.broker.workers, self.cache.signature)
            return send_frames(self._front, [client, b"", *reply])
        try:
            request = admit(client, frames[2:], self.limits, self.broker.queue_timeout_s,
                            unbatched=self.unbatched if self.broker.max_batch > 1 else None)
        except Refusal as exc:
            self._error(client, exc.code, str(exc), exc.rid, exc.model)
            return
        if self._draining:
            why = f"node {self.node_id} is shutting down"
            return self._error(client, "unavailable", why, request.rid, request.model)
        self._carry(self.broker.request(request, request.received))

    # workers ---------------------------------------------------------------------------------
