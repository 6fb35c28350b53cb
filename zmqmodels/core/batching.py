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
and the recent arrival gap is shorter than what is left of the wait. A wait lasts until
``delay_s`` after the oldest request arrived or, if later, until a share of one forward
(:data:`FILL_FRACTION` of the model's recent forward time, :data:`FILL_MAX_S` at most) after the
worker became free: under a closed loop the requests of the batch just answered come back
within about a round trip, and a forward whose cost is mostly fixed (reading 100 MB of weights)
costs as much for one straggler as for a full batch, so the straggler waits for them rather than
running alone (the sizes alternated full, one, full, one). One client with one request in
flight is never delayed (its last batch was itself).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["batch_key", "Evidence", "FILL_FRACTION", "FILL_MAX_S"]

EVIDENCE_S = 1.0  # batches older than this say nothing about the load now
GAP_WEIGHT = 0.2  # EWMA weight of the newest inter-arrival gap
SERVICE_WEIGHT = 0.3  # EWMA weight of the newest forward's duration
FILL_FRACTION = 0.5  # a freed worker waits for more at most this share of a forward
FILL_MAX_S = 0.05  # and never longer than this


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
    service: float = 0.0  # EWMA of a forward's duration, dispatch to done (0: none seen)


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

    def served(self, model: str, seconds: float) -> None:
        """A forward of ``model`` took ``seconds`` from dispatch to its worker's answer."""
        s = self.seen.setdefault(model, _Seen())
        s.service = seconds if not s.service else (1 - SERVICE_WEIGHT) * s.service + SERVICE_WEIGHT * seconds

    def hold_until(self, model: str, count: int, rows: int, cap: int, oldest: float,
                   now: float, free_since: float = -math.inf) -> float | None:
        """When a batch of ``count`` requests and ``rows`` rows (``cap`` at most) whose oldest
        request arrived at ``oldest`` should go if it waits for more, on a worker free since
        ``free_since``; ``None``: go now."""
        if self.delay_s <= 0 or rows >= cap:
            return None
        s = self.seen.get(model)
        if s is None or now - s.last_batch > EVIDENCE_S:
            return None
        until = max(oldest + self.delay_s, free_since + min(FILL_FRACTION * s.service, FILL_MAX_S))
        left = until - now
        if left <= 0:
            return None
        if count >= s.last_count or s.gap > left:
            return None
        return until
