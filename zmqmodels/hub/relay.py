"""A relay: subscribe to a hub (or another relay) once, republish downstream chunk by chunk.

``hub -> relay -> nodes``: the hub sends each release once per relay, not once per node. The
shell around :class:`~zmqmodels.core.forward.Forwarder` owns four sockets in one I/O thread: an
upstream SUB and DEALER (as a node has) and a downstream PUB and ROUTER (as a hub has, on the
same one-address convention), so nodes and other relays point ``--hub`` at it unchanged.
Complete releases go to its store on a worker thread (the store format is the hub's), so a
restarted relay serves them at once; node reports go on upstream naming the relay.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from .. import defaults
from .. import protocol as P
from ..core.forward import Carried, Forwarder, Keep
from ..core.intake import Send
from ..core.serve import Broadcast, Reply
from ..defaults import Limits
from ..errors import ProtocolError, ZmqModelsError
from ..release.catalog import Catalog
from ..release.manifest import Release, manifest_frames, validate_name
from ..release.signing import Trust
from ..release.store import open_store
from ..transport.curve import Curve, ServerContext
from ..transport.endpoints import bind_hub_sockets
from ..transport.exporter import MetricsServer
from ..transport.ioloop import IOThread, LoopState
from ..transport.upstream import connect_upstream, hub_list

__all__ = ["Relay"]

log = logging.getLogger("zmqmodels.relay")


class Relay(IOThread):
    """Follow ``models`` (every model if empty) from ``upstream``; serve them on ``bind``.

    ``curve``: this relay's keys as a server downstream (its ``allow`` admits nodes);
    ``upstream_curve``: its keys as a client of the upstream hub or relay."""

    kind = "relay"

    def __init__(self, upstream: str | Sequence[str], bind: str, store: Catalog | str | os.PathLike[str],
                 models: Sequence[str] = (), *, relay_id: str | None = None,
                 limits: Limits | None = None, trust: Trust | None = None,
                 curve: Curve | None = None, upstream_curve: Curve | None = None,
                 heartbeat_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
                 metrics: str | None = None, context: zmq.Context | None = None) -> None:
        self.upstreams = hub_list(upstream)
        self.upstream = ", ".join(self.upstreams)
        self.bind = bind
        self.store = store if isinstance(store, Catalog) else open_store(store)
        self.relay_id = relay_id or f"relay-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.limits = limits or Limits()
        self.curve, self.upstream_curve = curve, upstream_curve
        self.heartbeat_interval_s = heartbeat_interval_s
        self._server_ctx = ServerContext(curve, context)
        super().__init__(self._server_ctx.ctx)
        models = [validate_name(m) for m in models]
        self.forwarder = Forwarder(models, self.relay_id, limits=self.limits, trust=trust,
                                   held=self._held(models))
        self.forwarder.use_stats(self.stats)
        self._next_beat = 0.0
        self.address = self.pub_address = ""
        self._metrics = MetricsServer(metrics, "relay", self)

    def metrics_view(self) -> dict[str, Any]:
        """What metrics show (run on the I/O thread)."""
        held = {n: c.manifest.seq for n, c in self.forwarder.latest.items()}
        return {"stats": dict(self.stats), "held": held}

    def _held(self, models: list[str]) -> dict[str, Carried]:
        """The newest stored release of each model: served before upstream answers."""
        out = {}
        for name in models or self.store.names():
            rel = self.store.latest(name)
            if rel is not None:
                out[name] = Carried(rel.manifest, bytes(rel.manifest_bytes), rel.signature, 0.0,
                                    chunks=list(rel.chunks))
        return out

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Relay:
        self._server_ctx.start()
        try:
            super().start(timeout)
        except ZmqModelsError as exc:
            why = self._start_error or exc
            raise ZmqModelsError(f"relay failed to start on {self.bind}: {why}") from None
        self._metrics.start(self.close)
        log.info("relay %s: following %s, serving on %s (PUB %s)", self.relay_id, self.upstream,
                 self.address, self.pub_address)
        return self

    def close(self) -> None:
        self._metrics.stop()
        was_running = self.state is LoopState.RUNNING
        super().close()
        if was_running:
            self._server_ctx.close()

    # -- I/O thread --------------------------------------------------------------------------
    def _open(self) -> list[tuple[zmq.Socket, Any]]:
        up = connect_upstream(self._socket, self.upstreams, list(self.forwarder.models),
                              limits=self.limits, rcvhwm=defaults.SUB_RCVHWM * 4,
                              curve=self.upstream_curve, every=not self.forwarder.models)
        down_router, down_pub = self._socket(zmq.ROUTER), self._socket(zmq.PUB)
        down_router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        down_pub.sndhwm = 4096
        down_router.sndhwm = 8 * self.limits.fetch_credit
        if self.curve is not None:
            self.curve.serve(down_router)
            self.curve.serve(down_pub)
        self.address = bind_hub_sockets(down_router, down_pub, self.bind)
        self.pub_address = P.pub_endpoint(self.address)
        self._up, self._router, self._pub = up, down_router, down_pub
        self._carry(self.forwarder.start(time.monotonic()))
        return [(up.sub, self._on_up_sub), *((d, self._on_up_dealer) for d in up.dealers),
                (down_router, self._on_down)]

    def _tick(self, now: float) -> float:
        self._carry(self.forwarder.tick(now))
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_interval_s
            self._carry(self.forwarder.beats(self.relay_id))
            if self.forwarder.loop:
                log.error("%s", self.forwarder.loop)
        return min(0.05, max(0.001, self._next_beat - now))

    def _carry(self, actions: list[Any]) -> None:
        for action in actions:
            match action:
                case Send(msg):
                    self._up.send(msg)
                case Broadcast(name, frames):
                    self._pub.send_multipart([P.topic(name) if name else P.HUB_TOPIC, *frames], copy=False)
                case Reply(peer, frames):
                    self._router.send_multipart([peer, *frames], copy=False)
                case Keep(carried):
                    self._keep(carried)

    def _keep(self, c: Carried) -> None:
        """Store a complete release off the I/O thread; serve it from the store once there."""
        def failed(exc: BaseException) -> None:
            m = c.manifest
            log.error("relay %s: cannot store %s seq %d: %s", self.relay_id, m.name, m.seq, exc)

        release = Release(c.manifest, c.chunks, c.raw, c.signature)
        self.offload(lambda: self.store.put(release), lambda _stored: self.forwarder.stored(c), failed)

    def _on_up_sub(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            raise ProtocolError(f"broadcast of {len(frames)} frame(s)")
        now = time.monotonic()
        self.forwarder.heard(now)
        msg, payload = P.unpack(frames[1:])
        self._upstream(msg, payload, now, fetched=False)

    def _on_up_dealer(self, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        self.forwarder.heard(now)
        msg, payload = P.unpack(frames)
        if isinstance(msg, P.ErrorReply):
            if msg.code != "not_found":
                log.warning("relay %s: upstream error %s: %s", self.relay_id, msg.code, msg.message)
            self._carry(self.forwarder.on_error(msg))
            return
        self._upstream(msg, payload, now, fetched=True)

    def _upstream(self, msg: Any, payload: list[Any], now: float, *, fetched: bool) -> None:
        match msg:
            case P.ManifestFrames():
                m, raw, sig = manifest_frames(payload, self.limits)
                self._carry(self.forwarder.on_manifest(m, raw, sig, now, fetched=fetched))
            case P.ChunkHeader():
                self._carry(self.forwarder.on_chunk(msg, payload[0].buffer, now, fetched=fetched))
            case P.PatchHeader():  # a relay keeps chunks as sent: it fetches this one whole
                self.stats["patches_not_taken"] += 1
            case P.Heartbeat():
                self._carry(self.forwarder.on_beat(msg, now))
            case P.Activate():
                self._carry(self.forwarder.on_activate(msg))
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from upstream")

    def _on_down(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        misdirected = P.wrong_peer(frames, "relay")
        if misdirected is not None:
            self._router.send_multipart(misdirected, copy=False)
            return
        try:
            msg, _ = P.unpack(frames[1:])
            match msg:
                case P.FetchManifest():
                    self._carry(self.forwarder.fetch_manifest(peer, msg))
                case P.FetchChunks():
                    self._carry(self.forwarder.fetch_chunks(peer, msg))
                case P.Report():
                    self._carry(self.forwarder.report(msg))
                case _:
                    raise ProtocolError(f"a relay answers fetches and passes reports on; send "
                                        f"{type(msg).__name__} to the root hub")
        except ZmqModelsError as exc:
            code = exc.code if exc.code != "error" else "bad_message"
            self._router.send_multipart([peer, *P.pack(P.ErrorReply(code, str(exc)[:1000]))])
