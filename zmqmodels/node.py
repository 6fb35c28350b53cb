"""A serving node: the front process (torch-free) and its worker processes.

The front owns, in one I/O thread, a ROUTER for clients (plain ZeroMQ REQ) and a ROUTER for
its workers (DEALER, over ipc). It routes each request to the least recently used idle
worker that serves the model (the guide's LRU / Paranoid Pirate broker), restarts a dead or
hung worker and answers its in-flight request with a retryable ``worker_lost``.

Its :class:`~zmqmodels.subscriber.Subscriber` receives each release once per node, verifies
it and writes it atomically into the cache; the front then **rolls** it through the workers
one at a time (``LOAD`` -> load by path, example check, warm-up, swap -> ``LOADED``). A
loading worker serves nobody (``torch.jit.load`` holds its GIL), so with two or more workers
no request waits for a load. With one worker, requests queue (bounded) during the load; with
``swap_policy="unload-first"`` the worker frees the old model first and requests in that gap
get a retryable ``unavailable`` instead.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from . import defaults
from . import protocol as P
from .cache import Cache
from .commands import Commands
from .curve import Curve, ServerContext
from .defaults import Limits
from .errors import ProtocolError, ZmqModelsError
from .release import Manifest, validate_name
from .signing import Trust
from .subscriber import Subscriber

__all__ = ["Node", "SWAP_POLICIES"]

log = logging.getLogger("zmqmodels.node")
SWAP_POLICIES = ("availability", "unload-first")


class _State(enum.Enum):
    NEW = 0
    RUNNING = 1
    CLOSED = 2


@dataclass
class _Worker:
    wid: str
    device: str
    proc: subprocess.Popen[bytes] | None = None
    ready: bool = False
    busy: Any = None  # client identity of the request in flight
    loading: str | None = None
    load_started: float = 0.0
    serving: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float = 0.0


@dataclass
class _Pending:
    client: Any
    received_ns: int
    frames: list[Any]
    model: str
    version: int
    rid: str
    deadline: float


class Node:
    """Serve ``models`` on ``bind`` with ``workers`` processes, following the hub at ``hub``.

    ``devices`` is one device for all workers or one per worker (``["cuda:0", "cuda:1"]``).
    ``hub=None`` serves the cache alone.

    ``trust`` loads only releases signed by its keys (checked on receipt and again on the
    cache at start). ``curve``: this node's CURVE keys; its ``server_key`` is the hub's, its
    ``allow`` the clients admitted to the inference socket.
    """

    def __init__(
        self,
        hub: str | None,
        models: Sequence[str],
        bind: str,
        *,
        workers: int = 2,
        devices: Sequence[str] = ("cpu",),
        cache: str | os.PathLike[str] = ".zmqmodels/cache",
        node_id: str | None = None,
        swap_policy: str = "availability",
        limits: Limits | None = None,
        threads_per_worker: int = 1,
        queue_max: int = defaults.NODE_QUEUE_MAX,
        queue_timeout_s: float = defaults.NODE_QUEUE_TIMEOUT_S,
        worker_ttl_s: float = defaults.WORKER_TTL_S,
        request_timeout_s: float = defaults.REQUEST_TIMEOUT_S,
        load_timeout_s: float = defaults.LOAD_TIMEOUT_S,
        context: zmq.Context | None = None,
        trust: Trust | None = None,
        curve: Curve | None = None,
    ) -> None:
        if swap_policy not in SWAP_POLICIES:
            raise ZmqModelsError(f"swap policy must be one of {SWAP_POLICIES}, not {swap_policy!r}")
        if workers < 1:
            raise ZmqModelsError("a node needs at least one worker")
        if len(devices) not in (1, workers):
            raise ZmqModelsError(f"give one device, or one per worker ({workers}), not {len(devices)}")
        self.hub = hub
        self.models = [validate_name(m) for m in models]
        self.bind = bind
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.swap_policy = swap_policy
        self.limits = limits or Limits()
        self.cache = Cache(cache)
        self._threads_per_worker = threads_per_worker
        self._queue_max, self._queue_timeout_s = queue_max, queue_timeout_s
        self._worker_ttl_s, self._request_timeout_s = worker_ttl_s, request_timeout_s
        self._load_timeout_s = load_timeout_s
        devs = list(devices) * (workers if len(devices) == 1 else 1)
        self._workers = {f"{self.node_id}/w{i}": _Worker(f"{self.node_id}/w{i}", devs[i])
                         for i in range(workers)}
        self.trust = trust or Trust()
        self.curve = curve
        if curve is not None and hub and curve.server_key is None:
            raise ZmqModelsError("a node with CURVE keys needs the hub's public key")
        self._server_ctx = ServerContext(curve, context)
        self._ctx = self._server_ctx.ctx
        self._state = _State.NEW
        self._dir = tempfile.mkdtemp(prefix="zmqm-node-", dir="/tmp")  # ipc paths must be short
        self._backend_addr = f"ipc://{self._dir}/workers"
        self._commands = Commands(self._ctx, "node")
        self._ready, self._stop = threading.Event(), threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sub: Subscriber | None = None
        self._idle: collections.deque[str] = collections.deque()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._targets: dict[str, tuple[int, str, str]] = {}  # name -> (seq, path, label)
        self._rejected: dict[str, set[int]] = collections.defaultdict(set)
        self._reported: dict[str, tuple[str, int]] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self.address = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Node:
        if self._state is not _State.NEW:
            raise ZmqModelsError("a Node can be started once")
        self._state = _State.RUNNING
        self._server_ctx.start()
        # verify the cache before any worker starts: workers load from it without hashing again
        known = {}
        for name in self.models:
            found = self.cache.latest(name, trust=self.trust)
            if found is not None:
                known[name] = found[0].seq
        # workers are spawned (and respawned) by the I/O thread alone, from its first tick
        self._thread = threading.Thread(target=self._run, name="zmqmodels-node-io", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            self.close()
            raise ZmqModelsError(f"node failed to start on {self.bind}: {self._start_error}")
        if self.hub:
            devices = ",".join(sorted({w.device for w in self._workers.values()}))
            self._sub = Subscriber(self.hub, self.models, on_release=self._on_release, load=False,
                                   node_id=self.node_id, device=devices, known=known,
                                   limits=self.limits, background_nice=10, cache=self.cache,
                                   trust=self.trust, curve=self.curve, context=self._ctx)
            self._sub.start()
        log.info("node %s serving %s on %s with %d worker(s)", self.node_id, self.models,
                 self.address, len(self._workers))
        return self

    def close(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._sub is not None:
            self._sub.close()
        self._stop.set()
        if self._thread is not None:
            self._commands.wake()
            self._thread.join(timeout=10)
        for w in self._workers.values():
            if w.proc is not None and w.proc.poll() is None:
                w.proc.terminate()
        for w in self._workers.values():
            if w.proc is not None:
                try:
                    w.proc.wait(5)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._server_ctx.close()

    def __enter__(self) -> Node:
        return self.start() if self._state is _State.NEW else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- other threads -> I/O thread ---------------------------------------------------------
    def _on_release(self, m: Manifest, archive: Any) -> None:
        """Subscriber delivery thread: the verified archive is in the cache; roll it out."""
        path = self.cache.path(m.name, m.seq)
        self._commands.post(lambda: self._set_target(m.name, m.seq, str(path), m.label))

    # -- I/O thread --------------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        args = [sys.executable, "-m", "zmqmodels.worker", "--backend", self._backend_addr,
                "--id", w.wid, "--device", w.device, "--cache", str(self.cache.root),
                "--threads", str(self._threads_per_worker)]
        for m in self.models:
            args += ["--model", m]
        w.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        w.ready, w.busy, w.loading, w.serving = False, None, None, {}
        w.last_seen = time.monotonic()

    def _run(self) -> None:
        ctx = self._ctx
        front, back, wake = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER), self._commands.bind()
        for s in (front, back, wake):
            s.linger = defaults.LINGER_MS
        back.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its identity
        # a hard cap per frame, enforced by libzmq before it buffers: requests a little over the
        # limit still get a `too_large` reply, grossly oversized frames cost the connection
        front.setsockopt(zmq.MAXMSGSIZE, self.limits.max_request_bytes + (1 << 20))
        try:
            if self.curve is not None:  # inside the try: a failure is a start error, at once
                self.curve.serve(front)
            back.bind(self._backend_addr)
            if self.bind.startswith("tcp://") and self.bind.endswith(":0"):
                port = front.bind_to_random_port(self.bind[: -len(":0")])
                self.address = f"{self.bind[: -len(':0')]}:{port}"
            else:
                front.bind(self.bind)
                self.address = self.bind
        except Exception as exc:
            self._start_error = exc
            for s in (front, back, wake):
                s.close()
            self._ready.set()
            return
        self._front, self._back = front, back
        self._ready.set()
        poller = zmq.Poller()
        for s in (front, back, wake):
            poller.register(s, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if wake in events:
                    self._commands.run_pending(wake)
                if back in events:
                    for _ in range(1024):
                        try:
                            self._on_worker(back.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                if front in events:
                    for _ in range(1024):
                        try:
                            self._on_client(front.recv_multipart(zmq.NOBLOCK, copy=False))
                        except zmq.Again:
                            break
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + 0.1
                self._dispatch()
                self._schedule_loads()
        finally:
            for w in self._workers.values():
                if w.ready:
                    back.send_multipart([w.wid.encode(), b"STOP"])
            for s in (front, back, wake):
                s.close()

    # clients ---------------------------------------------------------------------------------
    def _error(self, client: Any, code: str, message: str, rid: str = "", model: str = "") -> None:
        self.stats[f"error_{code}"] += 1
        err = P.ErrorReply(code, message[:4000], model, 0, P.SERVING_CODES.get(code, False), id=rid)
        self._front.send_multipart([client, b"", b"ERROR", P.encode(err)])

    def _on_client(self, frames: list[zmq.Frame]) -> None:
        client = frames[0]
        if len(frames) < 3 or frames[1].bytes != b"":
            self.stats["dropped_not_req"] += 1  # not a REQ envelope: nowhere to answer
            return
        req = frames[2:]
        received = time.monotonic_ns()
        if req[0].bytes != b"INFER" or len(req) < 2:
            self._error(client, "bad_request", "expected [INFER, header, tensor frames...]")
            return
        size = sum(len(f) for f in req)
        if size > self.limits.max_request_bytes or len(req) - 2 > self.limits.max_request_tensors:
            self._error(client, "too_large", f"request of {len(req) - 2} tensor(s), {size} bytes; limits "
                        f"{self.limits.max_request_tensors} / {self.limits.max_request_bytes}")
            return
        try:
            hdr = P.decode_header(b"INFER", req[1].buffer)
        except ProtocolError as exc:
            self._error(client, "bad_request", str(exc))
            return
        if hdr.model not in self.models:
            self._error(client, "unknown_model", f"this node serves {self.models}, not {hdr.model!r}",
                        hdr.id, hdr.model)
            return
        if len(self._pending) >= self._queue_max:
            self._error(client, "unavailable", f"queue full ({self._queue_max})", hdr.id, hdr.model)
            return
        self._pending.append(_Pending(client, received, req, hdr.model, hdr.version, hdr.id,
                                      time.monotonic() + self._queue_timeout_s))

    def _can_serve(self, w: _Worker, model: str, version: int) -> bool:
        return (w.ready and w.loading is None and model in w.serving
                and (not version or w.serving[model] == version))

    def _dispatch(self) -> None:
        if not self._pending:
            return
        keep: collections.deque[_Pending] = collections.deque()
        while self._pending:
            p = self._pending.popleft()
            wid = next((i for i in self._idle if self._can_serve(self._workers[i], p.model, p.version)),
                       None)
            if wid is not None:
                self._idle.remove(wid)
                w = self._workers[wid]
                w.busy = p.client
                w.last_seen = time.monotonic()
                self._back.send_multipart([wid.encode(), b"INFER", p.client,
                                           p.received_ns.to_bytes(8, "little"), *p.frames], copy=False)
                continue
            verdict = self._wait_or_refuse(p)
            if verdict is None:
                keep.append(p)
            else:
                self._error(p.client, verdict[0], verdict[1], p.rid, p.model)
        self._pending = keep

    def _wait_or_refuse(self, p: _Pending) -> tuple[str, str] | None:
        """None: keep it queued (someone will serve it soon); else (code, message)."""
        live = [w for w in self._workers.values()]
        if p.version:
            held = any(w.serving.get(p.model) == p.version for w in live)
            coming = self._targets.get(p.model, (0,))[0] == p.version
            if not held and not coming:
                return "version_unavailable", f"{p.model} seq {p.version} is not served by this node"
        if any(self._can_serve(w, p.model, p.version) for w in live):
            return None  # all busy: wait for one
        starting = any(not w.ready for w in live)
        loading = [w for w in live if w.loading == p.model]
        if loading and self.swap_policy == "unload-first":
            return "unavailable", f"{p.model} is reloading (unload-first); retry shortly"
        if starting or loading or any(w.loading for w in live):
            return None
        return "not_ready", f"no version of {p.model!r} is loaded on this node yet"

    # workers ---------------------------------------------------------------------------------
    def _on_worker(self, frames: list[zmq.Frame]) -> None:
        wid = frames[0].bytes.decode(errors="replace")
        w = self._workers.get(wid)
        if w is None or len(frames) < 2:
            self.stats["dropped_unknown_worker"] += 1
            return
        kind = frames[1].bytes
        w.last_seen = time.monotonic()
        if kind == b"HB":
            return
        if kind == b"DONE" and len(frames) >= 4:
            self._front.send_multipart([frames[2], b"", *frames[3:]], copy=False)
            self.stats["replies"] += 1
            w.busy = None
            self._idle.append(wid)
        elif kind == b"READY" and len(frames) == 3:
            msg = P.decode_header(b"READY", frames[2].buffer)
            w.ready, w.busy, w.loading = True, None, None
            w.serving = {n: int(v[0]) for n, v in msg.serving.items()}
            w.labels = {n: str(v[1]) for n, v in msg.serving.items()}
            if wid not in self._idle:
                self._idle.append(wid)
            log.info("worker %s ready (pid %d, %s): %s", wid, msg.pid, msg.device, w.serving)
            for name in self.models:
                self._report(name)
        elif kind == b"LOADED" and len(frames) == 3:
            res = P.decode_header(b"LOADED", frames[2].buffer)
            w.loading = None
            self._idle.append(wid)
            if res.ok:
                w.serving[res.name], w.labels[res.name] = res.seq, res.label
                log.info("worker %s: %s seq %d swapped in (load %.3fs, check %.3fs)", wid, res.name,
                         res.seq, res.load_s, res.check_s)
            else:
                self._load_failed(res.name, res.seq, res.reason, wid)
            self._report(res.name)
        else:
            self.stats["dropped_bad_worker_message"] += 1

    def _load_failed(self, name: str, seq: int, reason: str, wid: str) -> None:
        log.warning("worker %s rejected %s seq %d: %s", wid, name, seq, reason)
        self._rejected[name].add(seq)
        target = self._targets.get(name)
        if target and target[0] == seq:
            del self._targets[name]  # stop rolling it; the others keep the old version
        self.cache.discard(name, seq)  # a restarted worker must not pick it up
        if self._sub is not None:
            self._sub.report(name, "rejected", seq=seq, reason=reason)
        self._reported.pop(name, None)

    def _set_target(self, name: str, seq: int, path: str, label: str) -> None:
        if seq in self._rejected[name]:
            return
        current = self._targets.get(name)
        if current is None or current[0] < seq:
            self._targets[name] = (seq, path, label)
            self._report(name)

    def _schedule_loads(self) -> None:
        if any(w.loading for w in self._workers.values()):
            return  # one worker loads at a time; the rest keep serving
        for name, (seq, path, _label) in list(self._targets.items()):
            stale = [w for w in self._workers.values() if w.ready and w.serving.get(name, 0) < seq]
            if not stale:
                del self._targets[name]
                self._report(name)
                continue
            w = next((s for s in stale if s.busy is None and s.wid in self._idle), None)
            if w is None:
                return  # wait for one of them to finish its request
            self._idle.remove(w.wid)
            w.loading, w.load_started = name, time.monotonic()
            cmd = P.LoadCommand(name, seq, path, unload_first=self.swap_policy == "unload-first")
            self._back.send_multipart([w.wid.encode(), b"LOAD", P.encode(cmd)])
            self._report(name)
            return

    def _tick(self, now: float) -> None:
        for p in [p for p in self._pending if now > p.deadline]:
            self._pending.remove(p)
            self._error(p.client, "unavailable", f"no worker free within {self._queue_timeout_s}s",
                        p.rid, p.model)
        for w in self._workers.values():
            if w.proc is None:
                if now >= w.restart_at:
                    self._spawn(w)
                continue
            limit = (self._load_timeout_s if w.loading else self._request_timeout_s if w.busy
                     else self._worker_ttl_s)
            if w.proc.poll() is None and now - w.last_seen > limit and (w.ready or w.loading):
                log.warning("worker %s silent for %.1fs; killing it", w.wid, now - w.last_seen)
                w.proc.kill()
            if w.proc.poll() is not None:
                self._worker_died(w, now)

    def _worker_died(self, w: _Worker, now: float) -> None:
        code = w.proc.returncode if w.proc else None
        log.warning("worker %s exited (%s); restarting", w.wid, code)
        self.stats["worker_restarts"] += 1
        if w.busy is not None:
            err = P.ErrorReply("worker_lost", f"worker {w.wid} died serving this request", "", 0, True)
            self._front.send_multipart([w.busy, b"", b"ERROR", P.encode(err)])
            self.stats["error_worker_lost"] += 1
        if w.loading:
            target = self._targets.get(w.loading)
            if target:
                self._load_failed(w.loading, target[0], f"worker {w.wid} died loading it", w.wid)
        if w.wid in self._idle:
            self._idle.remove(w.wid)
        w.proc, w.ready, w.busy, w.loading, w.serving = None, False, None, None, {}
        w.restarts += 1
        w.restart_at = now + min(5.0, 0.1 * 2 ** min(w.restarts, 6))  # back off a crash loop
        for name in self.models:
            self._report(name)

    def _report(self, name: str) -> None:
        """Tell the hub this node's state for ``name``: serving (all ready workers on one seq),
        loading (a roll in progress) or idle."""
        if self._sub is None:
            return
        ready = [w for w in self._workers.values() if w.ready and name in w.serving]
        target = self._targets.get(name)
        if target is not None or any(w.loading == name for w in self._workers.values()):
            state, seq = "loading", target[0] if target else 0
            label = target[2] if target else ""
        elif ready:
            low = min(ready, key=lambda w: w.serving[name])
            state, seq, label = "serving", low.serving[name], low.labels.get(name, "")
        else:
            state, seq, label = "idle", 0, ""
        if self._reported.get(name) != (state, seq):
            self._reported[name] = (state, seq)
            self._sub.report(name, state, seq=seq, label=label)
