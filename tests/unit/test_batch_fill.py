"""The broker's batch fill rule under a closed loop, simulated without sockets: N clients each
send their next request a moment after their last reply; a worker's forward costs a fixed part
(reading the weights) and a part per row. Issue 31: on the ~100 MB model the batches
alternated in size (a full one, then the stragglers alone), each straggler forward costing as
much as a full one."""

from __future__ import annotations

import heapq
import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqmodels.core.broker import Broker
from zmqmodels.core.swap import Version
from zmqmodels.core.work import Dispatch, Request

pytestmark = pytest.mark.timeout(120)
KEY = (("float32", (4,)),)


def simulate(clients: int, workers: int, fixed_s: float, per_row_s: float, turnaround_s: float,
             seconds: float = 3.0, delay_s: float = 0.0002,
             reply_s: float = 0.00002) -> tuple[list[int], list[float]]:
    """Forward sizes in dispatch order and every request's latency. ``reply_s``: the front's
    time per reply sent (the replies of a forward reach their clients one after another)."""
    b = Broker(["m"], [f"w{i}" for i in range(workers)], path_for=lambda n, s: "", max_batch=32,
               batch_delay_s=delay_s)
    for wid in b.workers:
        b.worker_ready(wid, {"m": Version(1, "v1")}, 0.0, batch={"m": 32})
    events: list[tuple[float, int, str, object]] = []
    order = itertools.count()
    sizes, latency = [], []

    def push(t: float, kind: str, what: object) -> None:
        heapq.heappush(events, (t, next(order), kind, what))

    def carry(actions: list, now: float) -> None:
        for a in actions:
            if isinstance(a, Dispatch):
                sizes.append(len(a.requests))
                push(now + fixed_s + per_row_s * len(a.requests), "done", a)

    for c in range(clients):
        push(c * 1e-5, "arrive", c)
    now = 0.0
    while events and now < seconds:
        now, _, kind, what = heapq.heappop(events)
        if kind == "arrive":
            r = Request(str(what).encode(), "m", str(what), now, now + 10, key=KEY, rows=1)
            carry(b.request(r, now), now)
        elif kind == "done":
            carry(b.done(what.wid, now), now)
            for k, r in enumerate(what.requests):
                back = now + (k + 1) * reply_s
                latency.append(back - r.received)
                push(back + turnaround_s, "arrive", int(r.client))
        elif kind == "tick":
            carry(b.tick(now), now)
        if b.wake_at < math.inf and not any(k == "tick" and t == b.wake_at for t, _, k, _ in events):
            push(b.wake_at, "tick", None)
    return sizes, latency


def test_a_memory_bound_model_under_a_closed_loop_runs_full_batches_not_a_straggler_each_time() -> None:
    """16 clients, one worker, a forward of 10 ms whatever its rows: every other forward was one
    straggler (sizes 15, 1, 15, 1, ...), halving what the worker answers."""
    sizes, _ = simulate(clients=16, workers=1, fixed_s=0.010, per_row_s=0.0001, turnaround_s=0.0003)
    steady = sizes[5:]
    small = sum(1 for s in steady if s < 8)
    assert small <= len(steady) // 10, f"forward sizes alternate: {steady[:20]}"
    assert sum(steady) / len(steady) >= 14


@settings(max_examples=40, deadline=None)
@given(clients=st.integers(1, 64), workers=st.integers(1, 3), fixed_ms=st.floats(0.05, 20),
       per_row_us=st.floats(1, 500), turnaround_us=st.floats(20, 2000))
def test_a_fill_never_leaves_a_request_waiting_more_than_a_forward_and_the_delay(
        clients, workers, fixed_ms, per_row_us, turnaround_us) -> None:
    """Whatever the load and the model's cost, waiting for more is bounded: no request waits
    longer than one forward of the largest batch plus the hold limit before its own starts
    (measured end to end: at most three full forwards and the hold)."""
    fixed, per_row = fixed_ms / 1e3, per_row_us / 1e6
    sizes, latency = simulate(clients, workers, fixed, per_row, turnaround_us / 1e6, seconds=0.5)
    full = fixed + per_row * 32
    assert sizes and max(sizes) <= 32
    assert max(latency) <= 3 * full + 0.02 + 32 * 0.00002, (max(latency), full)


def test_one_client_is_never_held() -> None:
    """Batching never delays a lone client: each of its requests goes at once."""
    _, latency = simulate(clients=1, workers=1, fixed_s=0.005, per_row_s=0.0001, turnaround_s=0.0003,
                          seconds=0.5)
    assert max(latency) <= 0.0051 + 0.00002 + 1e-9
