"""What a node's broker concludes from its workers and its swap policy, without changing
either: the state the hub is told for a model, whether an older version still answers
requests, and what becomes of a request no worker takes now."""

from __future__ import annotations

from collections.abc import Mapping

from ..protocol import ModelState
from .swap import SwapPolicy, Swaps, Version
from .work import Refuse, Request, WorkerSlot

__all__ = ["model_report", "older_in_flight", "verdict"]


def model_report(name: str, workers: Mapping[str, WorkerSlot], swaps: Swaps) -> tuple[ModelState, int, str]:
    """``(state, seq, label)`` of ``name`` as the hub should see it: loading while a version
    rolls through the workers, else the oldest version a ready worker serves."""
    loading = swaps.targets.get(name)
    if loading is None:
        loading = next((w.loading for w in workers.values()
                        if w.loading is not None and w.loading.name == name), None)
    if loading is not None:
        return ModelState.LOADING, loading.seq, loading.label
    held = [w.serving[name] for w in workers.values() if w.ready and name in w.serving]
    if held:
        low = min(held)
        return ModelState.SERVING, low.seq, low.label
    return ModelState.IDLE, 0, ""


def older_in_flight(name: str, workers: Mapping[str, WorkerSlot], swaps: Swaps) -> bool:
    """A worker still answers an unpinned request of ``name`` on a version below the floor."""
    floor = swaps.floor[name]
    return any(r.model == name and not r.seq and w.busy_seq < floor
               for w in workers.values() for r in w.busy)


def verdict(req: Request, workers: Mapping[str, WorkerSlot], swaps: Swaps, loading: str | None
            ) -> Refuse | None:
    """None: keep ``req`` queued (a worker will take it soon); else its refusal. ``loading``:
    the worker loading now, if any."""
    name, live = req.model, [w for w in workers.values() if w.ready]
    if req.seq:
        held = any(w.serving.get(name) == Version(req.seq) for w in live)
        t = swaps.targets.get(name)
        if not held and not (t is not None and t.seq == req.seq):
            return Refuse(req, "version_unavailable", f"{name} seq {req.seq} is not served by this node")
    unloaded = [w for w in live if w.loading is not None and w.loading.name == name
                and swaps.policy is SwapPolicy.UNLOAD_FIRST]  # holds nothing now
    if any(swaps.eligible(name, w.serving.get(name), req.seq, False) for w in live if w not in unloaded):
        return None  # all busy, or the swap is settling: one will take it
    if unloaded:
        return Refuse(req, "unavailable", f"{name} is reloading (unload-first); retry shortly")
    if (len(live) < len(workers) or loading is not None
            or any(swaps.stale(name, w.serving.get(name)) for w in live)):
        return None
    return Refuse(req, "not_ready", f"no version of {name!r} is loaded on this node yet")
