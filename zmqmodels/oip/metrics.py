"""``zmqmodels gateway --metrics``: the gateway's Prometheus endpoint (``/metrics``, and
``/health/live`` and ``/health/ready`` for probes). Labels are bounded: model, protocol, the
answer's gRPC status name, node address: none grows with publishes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..transport.metrics import serve_metrics
from .codec import V2Error

__all__ = ["GatewayMetrics"]

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class GatewayMetrics(Collector):
    """Requests by model, protocol and status; their latency through the gateway by protocol;
    whether each node answered ``MODELS`` within the gateway's ``down_after_s``."""

    def __init__(self, gateway: Any, spec: str) -> None:
        self.gateway = gateway
        self.requests: Counter[tuple[str, str, str]] = Counter()  # the gateway's loop writes
        self.registry = CollectorRegistry()
        self.latency = Histogram("zmqmodels_gateway_request_seconds", "Inference through the gateway, "
                                 "request read to reply written", ["protocol"], buckets=_BUCKETS,
                                 registry=self.registry)
        self.registry.register(self)
        self._server = serve_metrics(self.registry, spec, self._ready)

    def counted(self, model: str, protocol: str, status: str, seconds: float) -> None:
        self.requests[(model, protocol, status)] += 1
        self.latency.labels(protocol).observe(seconds)

    def _ready(self) -> str:
        try:
            return self.gateway.view.ready()
        except V2Error as exc:
            return str(exc)

    def collect(self) -> Iterator[Any]:
        reqs = CounterMetricFamily("zmqmodels_gateway_requests", "Inference requests answered by the "
                                   "gateway, by model, protocol and status (ok or the gRPC status name)",
                                   labels=["model", "protocol", "status"])
        for key, n in list(self.requests.items()):
            reqs.add_metric(list(key), n)
        yield reqs
        up = GaugeMetricFamily("zmqmodels_gateway_node_up", "1 while the node answers MODELS",
                               labels=["node"])
        for v in self.gateway.view.nodes:
            up.add_metric([v.address], 1.0 if v.up else 0.0)
        yield up

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
