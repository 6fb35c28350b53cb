"""Readiness of each shell, as an orchestrator's probe asks it (``/health/ready`` on the
``--metrics`` port; a node's ``--http`` port answers ``/v2/health/ready`` the v2 way): "" when
ready, else the one-line reason. Each is measured when asked, never remembered."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..core.broker import Broker
from ..errors import ZmqModelsError
from .ioloop import LoopState

__all__ = ["READY", "hub_ready", "node_ready", "relay_ready", "node_health", "hub_down", "NodeView"]


class NodeView(Protocol):
    """What probes and metrics read of a node (:class:`~zmqmodels.node.node.Node`), named:
    its broker and identity, read on its I/O thread (:meth:`call`)."""

    state: LoopState
    node_id: str
    hub: str | None
    hub_unreachable_s: float
    models: Sequence[str]
    broker: Broker

    def hub_silence(self, now: float | None = None) -> float: ...
    def call(self, fn: Callable[[], Any], timeout: float) -> Any: ...


def _running(shell: Any, what: str) -> str:
    if shell.state is LoopState.RUNNING:
        return ""
    return f"{what} is {shell.state.value}, its sockets are not bound"


def hub_ready(hub: Any) -> str:
    """Its sockets are bound (the I/O loop runs) and its store takes a write."""
    return _running(hub, "hub") or hub.store.writable()


def node_ready(node: NodeView) -> str:
    """Every model it serves is held by a ready worker."""
    why = _running(node, "node")
    if why:
        return why

    def waiting() -> list[str]:
        return [m for m in node.models
                if not any(w.ready and m in w.serving for w in node.broker.workers.values())]

    try:
        missing = node.call(waiting, 5.0)
    except ZmqModelsError as exc:
        return f"node's I/O thread did not answer: {exc}"
    return f"no worker holds {', '.join(missing)} yet" if missing else ""


def hub_down(node: NodeView, now: float | None = None) -> str:
    """"" while the node's hub is heard from, else ``hub ADDR not heard from for Ns``."""
    silent = node.hub_silence(now)
    if not node.hub or silent <= node.hub_unreachable_s:
        return ""
    return f"hub {node.hub} not heard from for {silent:.0f}s"


def node_health(node: NodeView) -> dict[str, Any]:
    """Is the node's hub reachable, are its workers up, what does it serve (on its I/O thread)."""
    silent = node.hub_silence()
    return {"node": node.node_id, "hub": node.hub or "", "hub_silent_s": round(silent, 1),
            "hub_unreachable": bool(node.hub) and silent > node.hub_unreachable_s,
            "workers_ready": sum(w.ready for w in node.broker.workers.values()),
            "workers": len(node.broker.workers),
            "serving": {m: node.broker.report(m)[1] for m in node.models}}


def relay_ready(relay: Any) -> str:
    return _running(relay, "relay")


READY = {"hub": hub_ready, "node": node_ready, "relay": relay_ready}
