"""Prometheus metrics for a hub, a relay or a node (``--metrics PORT`` or ``HOST:PORT``).

Counters and gauges are read when Prometheus scrapes, from a snapshot the shell's I/O thread
makes (a custom collector: nothing is added to the request path but a dict increment); latencies are
histograms observed as requests finish. Each hub or node has its own registry, so several can
live in one process (the tests do).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from ..core.work import WorkerState
from ..errors import ZmqModelsError
from ..protocol import SERVING_CODES
from .endpoints import parse_listen
from .health import node_health

__all__ = ["NodeMetrics", "HubMetrics", "RelayMetrics", "COLLECTORS", "serve_metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        pass


def serve_metrics(registry: CollectorRegistry, spec: str, ready: Callable[[], str] = lambda: "") -> Any:
    """Serve ``/metrics`` for ``registry`` on ``spec``, with ``/health/live`` (200 while the
    process answers) and ``/health/ready`` (200, or 503 and ``ready()``'s reason); returns the
    server (``.shutdown()``)."""
    host, port = parse_listen(spec, "--metrics")
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/health/live", "/health/ready"):
            return metrics(environ, start_response)
        why = ready() if path == "/health/ready" else ""
        body = (why or "ok").encode() + b"\n"
        start_response("503 Service Unavailable" if why else "200 OK",
                       [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
    except OSError as exc:
        raise ZmqModelsError(f"--metrics {spec}: cannot listen: {exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="zmqmodels-metrics", daemon=True).start()
    return server


def _counter(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Any:
    m = CounterMetricFamily(name, doc, labels=labels)
    for key, v in values.items():
        m.add_metric(list(key), v)
    return m


def _gauge(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Any:
    m = GaugeMetricFamily(name, doc, labels=labels)
    for key, v in values.items():
        m.add_metric(list(key), v)
    return m


def _snapshot(shell: Any, view: Any) -> dict[str, Any]:
    """``view(shell)``, made by the shell's I/O thread (never read live from this HTTP thread)."""
    return shell.call(lambda: view(shell), 5.0)


def node_view(node: Any) -> dict[str, Any]:
    """What a node's metrics show (run on its I/O thread)."""
    states = dict.fromkeys(WorkerState, 0)
    for w in node.broker.workers.values():
        states[w.state] += 1
    health = node_health(node)
    return {"requests": dict(node.metrics.requests), "queue_depth": len(node.broker.pending),
            "workers": states, "serving": health["serving"], "stats": dict(node.stats),
            "hub_unreachable": health["hub_unreachable"]}


class NodeMetrics(Collector):
    """Metrics of a :class:`~zmqmodels.node.node.Node`: requests by model and code; latency and
    queue-wait histograms; queue depth; workers by state; load durations; the seq served per
    model; the subscriber's bytes, repairs and rejections."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        # (model, code), the I/O thread's. No seq label: every publish would add series without bound
        # (zmqmodels_serving_seq says which seq serves)
        self.requests: Counter[tuple[str, str]] = Counter()
        kw = {"registry": self.registry, "labelnames": ["model"]}
        self.latency = Histogram("zmqmodels_request_seconds", "Node receipt to reply, per request",
                                 buckets=_LATENCY_BUCKETS, **kw)
        self.queue_wait = Histogram("zmqmodels_queue_wait_seconds", "Node receipt to a worker taking it",
                                    buckets=_LATENCY_BUCKETS, **kw)
        self.load = Histogram("zmqmodels_load_seconds", "A worker's load, example check and swap",
                              buckets=_LOAD_BUCKETS, **kw)
        self.batch_rows = Histogram("zmqmodels_batch_rows", "Rows per forward a worker was sent",
                                    buckets=_BATCH_BUCKETS, **kw)
        self.batch_wait = Histogram("zmqmodels_batch_wait_seconds",
                                    "How long a batch was held back for more requests",
                                    buckets=_LATENCY_BUCKETS, **kw)
        self.registry.register(self)

    def dispatched(self, model: str, rows: int, waited: float, now: float, received: list[float]) -> None:
        """One forward of ``rows`` sent to a worker after ``waited`` s held (I/O thread)."""
        self.batch_rows.labels(model).observe(rows)
        self.batch_wait.labels(model).observe(waited)
        for t in received:
            self.queue_wait.labels(model).observe(now - t)

    def answered(self, req: Any, code: str, now: float) -> None:
        """``req`` was answered with ``code`` ("" = OK) at ``now`` (I/O thread)."""
        code = code if code in SERVING_CODES else "ok" if not code else "other"
        self.requests[(req.model, code)] += 1
        self.latency.labels(req.model).observe(now - req.received)

    def refused(self, model: str, code: str) -> None:
        """A request refused before any worker saw it. ``model`` is "" unless served here: a
        client's names never become labels (it cannot grow the metric's cardinality)."""
        self.requests[(model, code)] += 1

    def collect(self) -> Iterator[Any]:
        snap = _snapshot(self.node, node_view)
        snap["follower"] = self.node.follower_stats()  # made by the follower's own I/O thread
        yield _counter("zmqmodels_requests", "Inference requests answered, by model and code",
                       ["model", "code"], snap["requests"])
        yield _gauge("zmqmodels_queue_depth", "Requests waiting for a worker", [], {(): snap["queue_depth"]})
        states = snap["workers"]
        yield _gauge("zmqmodels_workers", "Worker processes by state", ["state"],
                     {(str(s),): n for s, n in states.items()})
        yield _gauge("zmqmodels_serving_seq", "The seq every ready worker serves (lowest while rolling)",
                     ["model"], {(m,): seq for m, seq in snap["serving"].items()})
        stats, sub = snap["stats"], snap["follower"]
        yield _counter("zmqmodels_bytes_received", "Chunk payload bytes received", [],
                       {(): sub.get("bytes_received", 0)})
        yield _counter("zmqmodels_chunks_repaired", "Chunks fetched from the hub after a loss", [],
                       {(): sub.get("chunks_fetched", 0)})
        rejected = {(k.removeprefix("rejected_"),): v for k, v in {**sub, **stats}.items()
                    if k.startswith("rejected_")}
        yield _counter("zmqmodels_releases_rejected", "Releases rejected, by reason", ["reason"], rejected)
        yield _gauge("zmqmodels_hub_unreachable", "1 if the hub has not been heard from for "
                     "hub_unreachable_s", [], {(): float(snap["hub_unreachable"])})
        yield _counter("zmqmodels_worker_restarts", "Worker processes restarted", [],
                       {(): stats.get("worker_restarts", 0)})
        yield _counter("zmqmodels_release_cpu_seconds", "CPU spent taking releases in, by stage (the "
                       "front's receiving and cache-writing threads; the workers' loads)",
                       ["stage"], {("receive",): sub.get("cpu_receive_s", 0.0),
                                   ("cache_write",): sub.get("cpu_cache_write_s", 0.0),
                                   ("workers",): stats.get("cpu_workers_s", 0.0)})
        yield _counter("zmqmodels_bytes_reused", "Archive bytes taken from a release held here (deltas)", [],
                       {(): sub.get("bytes_reused", 0)})
        yield _counter("zmqmodels_chunks_reused", "Chunks taken from a release held here (deltas)", [],
                       {(): sub.get("chunks_reused", 0)})


class HubMetrics(Collector):
    """Metrics of a :class:`~zmqmodels.hub.hub.Hub`: broadcasts, fetches served, publishes, nodes
    by state (lost included)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        status = self.hub.status()  # made by the hub's I/O thread
        stats = status.stats
        yield _counter("zmqmodels_hub_broadcasts", "Releases broadcast", [], {(): stats.get("broadcasts", 0)})
        yield _counter("zmqmodels_hub_fetches", "Fetch requests served, by kind", ["kind"],
                       {("manifest",): stats.get("fetch_manifest", 0),
                        ("chunks",): stats.get("fetch_chunks", 0)})
        yield _counter("zmqmodels_hub_errors", "Error replies, by code", ["code"],
                       {(k.removeprefix("error_"),): v for k, v in stats.items() if k.startswith("error_")})
        by: Counter[tuple[str, str]] = Counter((n.model, str(n.state)) for n in status.nodes)
        yield _gauge("zmqmodels_hub_nodes", "Nodes by model and state", ["model", "state"],
                     {k: float(v) for k, v in by.items()})
        yield _gauge("zmqmodels_hub_latest_seq", "The newest stored seq per model", ["model"],
                     {(m.name,): m.seq for m in status.models})


class RelayMetrics(Collector):
    """Metrics of a :class:`~zmqmodels.hub.relay.Relay`: chunks taken in (broadcast or fetched),
    repairs asked upstream, fetches served downstream, refusals by code, releases complete,
    and the newest complete seq it holds per model."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Any]:
        snap = _snapshot(self.relay, lambda relay: relay.metrics_view())
        stats = snap["stats"]
        yield _counter("zmqmodels_relay_chunks", "Chunks received from upstream, by how", ["how"],
                       {("broadcast",): stats.get("chunks_broadcast", 0),
                        ("fetched",): stats.get("chunks_fetched", 0)})
        yield _counter("zmqmodels_relay_corrupt_chunks", "Chunks that failed their digest (dropped)", [],
                       {(): stats.get("chunk_corrupt", 0)})
        yield _counter("zmqmodels_relay_repairs", "Repairs asked of upstream", [],
                       {(): stats.get("repairs", 0)})
        yield _counter("zmqmodels_relay_fetches", "Fetch requests served downstream, by kind", ["kind"],
                       {("manifest",): stats.get("fetch_manifest", 0),
                        ("chunks",): stats.get("fetch_chunks", 0)})
        yield _counter("zmqmodels_relay_refused", "Releases refused, by code", ["code"],
                       {(k.removeprefix("refused_"),): v for k, v in stats.items()
                        if k.startswith("refused_")})
        yield _counter("zmqmodels_relay_releases", "Releases received whole", [],
                       {(): stats.get("complete", 0)})
        yield _gauge("zmqmodels_relay_latest_seq", "The newest complete seq held per model", ["model"],
                     {(name,): float(seq) for name, seq in snap["held"].items()})


COLLECTORS = {"hub": HubMetrics, "relay": RelayMetrics, "node": NodeMetrics}
