"""``--metrics``: a shell's Prometheus endpoint, started after the shell and stopped before it.

One helper for the hub, the relay and the node. The collectors (:mod:`zmqmodels.transport.metrics`) ask
the shell's I/O thread for a snapshot of its state at each scrape; prometheus-client is
imported only when metrics are asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ZmqModelsError

__all__ = ["MetricsServer"]


class MetricsServer:
    """``spec``: ``PORT`` or ``HOST:PORT`` (None: no metrics); ``kind``: "hub", "relay" or
    "node"; ``shell``: what the collector reads."""

    def __init__(self, spec: str | None, kind: str, shell: Any) -> None:
        self.spec, self.kind, self.shell = spec, kind, shell
        self.collector: Any = None
        self._server: Any = None

    def start(self, on_fail: Callable[[], None]) -> None:
        """Serve ``/metrics``, ``/health/live`` and ``/health/ready``; if the port cannot be
        had, ``on_fail()`` (close the shell) and raise the one-line reason."""
        if not self.spec:
            return
        from .health import READY
        from .metrics import COLLECTORS, serve_metrics

        self.collector = COLLECTORS[self.kind](self.shell)
        try:
            self._server = serve_metrics(self.collector.registry, self.spec,
                                         lambda: READY[self.kind](self.shell))
        except ZmqModelsError:
            on_fail()
            raise

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
