"""Dynamic batching, sans I/O: which queued requests may share one forward, and whether to
wait for more.

Two requests may be joined when they name the same model, pin the same seq (or none) and
their inputs differ only in the leading (batch) dimension: :func:`batch_key` reads that from
a request's tensor spec (docs/protocol.md §Tensors) without touching the tensors. The worker
then concatenates along that dimension, runs one forward and splits the outputs by each
request's rows, but only for a release whose examples proved it batch-invariant at publish
(the manifest's ``batch``) and up to the node's ``max_batch``.

:class:`Evidence` decides whether a free worker waits for more requests before it runs a
short batch. It waits only while two things say more are coming: requests of the model were
recently served in batches of more requests than the one in hand (clients have that many in flight),
and the recent arrival gap is shorter than what is left of the wait. A wait never outlasts
``delay_s`` after the oldest request arrived, so a request that already queued that long
goes at once, and one client with one request in flight is never delayed (its last batch
was itself).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["batch_key", "Evidence"]

EVIDENCE_S = 1.0  # batches older than this say nothing about the load now
GAP_WEIGHT = 0.2  # EWMA weight of the newest inter-arrival gap


def batch_key(spec: Any) -> tuple[Hashable, int] | None:
    """``(key, rows)`` for a request whose inputs are a tuple of tensors sharing their leading
    dimension (``rows``); requests with equal keys may be concatenated. ``None``: never
    joined (a scalar, a nested tree, mismatched leading dimensions, a 0-d tensor)."""
    if not isinstance(spec, dict) or spec.get("t") != "tuple":
        return None
    items = spec.get("items")
    if not isinstance(items, list) or not items:
        return None
    key, rows = [], -1
    for node in items:
        if not isinstance(node, dict) or node.get("t") != "tensor":
            return None
        shape, dtype = node.get("shape"), node.get("dtype")
        if not isinstance(shape, list) or not shape or not isinstance(dtype, str):
            return None
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            return None
        if rows not in (-1, shape[0]) or shape[0] == 0:
            return None
        rows = shape[0]
        key.append((dtype, tuple(shape[1:])))
    return tuple(key), rows


@dataclass
class _Seen:
    last_arrival: float = -math.inf
    gap: float = math.inf  # EWMA of the gaps between arrivals
    last_count: int = 0  # requests in the newest batch dispatched
    last_batch: float = -math.inf  # when it went


@dataclass
class Evidence:
    """Per model: how requests have been arriving and how large recent batches were."""

    delay_s: float
    seen: dict[str, _Seen] = field(default_factory=dict)

    def arrived(self, model: str, now: float) -> None:
        s = self.seen.setdefault(model, _Seen())
        if s.last_arrival > -math.inf:
            g = max(0.0, now - s.last_arrival)
            s.gap = g if math.isinf(s.gap) else (1 - GAP_WEIGHT) * s.gap + GAP_WEIGHT * g
        s.last_arrival = now

    def dispatched(self, model: str, count: int, now: float) -> None:
        s = self.seen.setdefault(model, _Seen())
        s.last_count, s.last_batch = count, now

    def hold_until(self, model: str, count: int, rows: int, cap: int, oldest: float,
                   now: float) -> float | None:
        """When a batch of ``count`` requests and ``rows`` rows (``cap`` at most) whose oldest
        request arrived at ``oldest`` should go if it waits for more; ``None``: go now."""
        if self.delay_s <= 0 or rows >= cap:
            return None
        until = oldest + self.delay_s
        left = until - now
        s = self.seen.get(model)
        if left <= 0 or s is None or now - s.last_batch > EVIDENCE_S:
            return None
        if count >= s.last_count or s.gap > left:
            return None
        return until
