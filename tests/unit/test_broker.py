"""The broker and rollout cores without sockets or processes: scheduling, fairness, monotonic
versions, deadlines and verdicts, including property tests over random event orders."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqmodels.core.broker import Broker
from zmqmodels.core.swap import SwapPolicy, Target, Version
from zmqmodels.core.verdicts import older_in_flight
from zmqmodels.core.work import Changed, Dispatch, Expire, Load, Refuse, Rejected, Request

pytestmark = pytest.mark.timeout(120)


def make(workers: int = 1, policy: SwapPolicy = SwapPolicy.AVAILABILITY, **kw) -> Broker:
    return Broker(["m"], [f"w{i}" for i in range(workers)], path_for=lambda n, s: f"/cache/{n}/{s}",
                  policy=policy, **kw)


_rid = iter(range(1, 1 << 30))


def req(now: float, seq: int = 0, timeout: float = math.inf, queue_s: float = 10.0, key=None,
        rows: int = 1) -> Request:
    rid = str(next(_rid))
    return Request(rid.encode(), "m", rid, now, now + queue_s, seq, now + timeout, key=key, rows=rows)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def ready_all(b: Broker, seq: int = 1, now: float = 0.0) -> None:
    for wid in b.workers:
        b.worker_ready(wid, {"m": Version(seq, f"v{seq}")} if seq else {}, now)


def test_saturated_single_worker_loads_as_soon_as_its_request_ends() -> None:
    """Milestone 1: with a request always queued, a freed worker took the next request before
    the load was scheduled, forever. Now the first worker to finish is taken for the load."""
    b = make(1)
    ready_all(b)
    first = of(b.request(req(0), 0), Dispatch)
    assert first and first[0].wid == "w0"
    for _ in range(5):
        assert not of(b.request(req(0), 0), Dispatch)  # queued behind it
    assert not of(b.target(Target("m", 2, "/cache/m/2", "v2"), 0.1), Load)  # busy: wait
    actions = b.done("w0", 0.2)
    assert of(actions, Load) == [Load("w0", Target("m", 2, "/cache/m/2", "v2"), False)]
    assert not of(actions, Dispatch)  # the queue waits for the load, not the other way round
    after = b.loaded("w0", "m", 2, "v2", True, "", 0.5)
    assert [d.wid for d in of(after, Dispatch)] == ["w0"]
    assert b.workers["w0"].busy_seq == 2


def test_two_workers_roll_one_at_a_time_and_never_step_back() -> None:
    b = make(2)
    ready_all(b)
    for _ in range(6):
        b.request(req(0), 0)  # both busy, four queued
    b.target(Target("m", 2, "/cache/m/2", "v2"), 0)
    load = of(b.done("w0", 0.1), Load)
    assert [x.wid for x in load] == ["w0"]  # w0 loads; w1 keeps serving v1
    out = b.done("w1", 0.2)
    assert not of(out, Load) and [d.wid for d in of(out, Dispatch)] == ["w1"]  # one load at a time
    assert b.workers["w1"].busy_seq == 1
    # w0 holds v2 now; w1 still runs an unpinned v1 request: v2 waits for it, so no v1 reply
    # can follow a v2 reply
    assert not of(b.loaded("w0", "m", 2, "v2", True, "", 0.3), Dispatch)
    out = b.done("w1", 0.4)  # the last v1 request ends: w1 loads, w0 serves v2
    assert [x.wid for x in of(out, Load)] == ["w1"]
    assert [(d.wid, b.workers[d.wid].busy_seq) for d in of(out, Dispatch)] == [("w0", 2)]
    out = b.loaded("w1", "m", 2, "v2", True, "", 0.6)
    assert Changed("m") in out and b.report("m") == ("serving", 2, "v2")


def test_pinned_requests_go_to_their_seq_only() -> None:
    b = make(2)
    b.worker_ready("w0", {"m": Version(1)}, 0)
    b.worker_ready("w1", {"m": Version(1)}, 0)
    b.target(Target("m", 2, "/p", "v2"), 0)
    b.loaded("w0", "m", 2, "v2", True, "", 0.1)  # w1 is loading now
    assert b.workers["w1"].loading is not None
    b.workers["w1"].loading = None  # (pretend it has not started: pinned v1 still served)
    b.loading = None
    got = of(b.request(req(0.2, seq=1), 0.2), Dispatch)
    assert got == [] or got[0].wid == "w1"
    refused = of(b.request(req(0.3, seq=7), 0.3), Refuse)
    assert refused and refused[0].code == "version_unavailable"


def test_client_deadline_drops_queued_request_unanswered() -> None:
    b = make(1)
    ready_all(b)
    b.request(req(0), 0)  # busy
    r = req(0, timeout=0.5)
    b.request(r, 0)
    out = b.tick(0.6)
    assert out == [Expire(r)] and not b.pending


def test_queue_timeout_refuses_with_unavailable() -> None:
    b = make(1, queue_timeout_s=1.0)
    ready_all(b)
    b.request(req(0), 0)
    r = req(0, queue_s=1.0)
    b.request(r, 0)
    refused = of(b.tick(1.1), Refuse)
    assert [(x.request, x.code) for x in refused] == [(r, "unavailable")]


def test_verdicts() -> None:
    b = make(1, queue_max=2)
    assert of(b.request(req(0), 0), Refuse) == []  # worker starting: wait
    ready_all(b, seq=0)
    refused = of(b.tick(0.1), Refuse)
    assert [x.code for x in refused] == ["not_ready"]  # up, nothing loaded, nothing coming
    assert of(b.request(Request(b"c", "other", "1", 0, 1), 0), Refuse)[0].code == "unknown_model"
    b.target(Target("m", 1, "/p"), 0.2)  # loading now
    assert of(b.request(req(0.3), 0.3), Refuse) == [] and of(b.request(req(0.3), 0.3), Refuse) == []
    assert of(b.request(req(0.3), 0.3), Refuse)[0].code == "unavailable"  # queue full


def test_unload_first_single_worker_refuses_during_reload() -> None:
    b = make(1, SwapPolicy.UNLOAD_FIRST)
    ready_all(b)
    assert of(b.target(Target("m", 2, "/p"), 0), Load)[0].unload_first
    assert of(b.request(req(0.1), 0.1), Refuse)[0].code == "unavailable"


def test_failed_load_is_rejected_once_and_the_old_version_keeps_serving() -> None:
    b = make(2)
    ready_all(b)
    b.target(Target("m", 2, "/p", "v2"), 0)
    out = b.loaded("w0", "m", 2, "v2", False, "example 0 differs", 0.1)
    assert Rejected("m", 2, "example 0 differs") in out
    assert not b.target(Target("m", 2, "/p", "v2"), 0.2)  # a rejected seq never comes back
    assert b.report("m") == ("serving", 1, "v1")
    assert [d.wid for d in of(b.request(req(0.3), 0.3), Dispatch)]


def test_a_second_workers_failure_on_a_rejected_seq_keeps_the_first_reason() -> None:
    """Two workers take seq 2; the first refuses it (NaN) and the node discards its cache
    entry, so the second fails on the missing file: the reason the hub hears stays the first."""
    b = make(2, SwapPolicy.AVAILABILITY)
    ready_all(b)
    b.target(Target("m", 2, "/p", "v2"), 0)
    first = b.loaded("w0", "m", 2, "v2", False, "example 0 out: NaN or Inf in the output", 0.1)
    assert of(first, Rejected) == [Rejected("m", 2, "example 0 out: NaN or Inf in the output")]
    again = b.loaded("w1", "m", 2, "v2", False, "[Errno 2] No such file or directory: '/p'", 0.2)
    assert of(again, Rejected) == []


def test_worker_lost_answers_its_request_and_restarted_worker_catches_up() -> None:
    b = make(2)
    ready_all(b)
    r = req(0)
    d = of(b.request(r, 0), Dispatch)[0]
    out = b.worker_lost(d.wid, 0.1)
    assert [(x.request, x.code) for x in of(out, Refuse)] == [(r, "worker_lost")]
    b.target(Target("m", 2, "/p"), 0.2)
    other = "w1" if d.wid == "w0" else "w0"
    b.loaded(other, "m", 2, "", True, "", 0.3)
    out = b.worker_ready(d.wid, {"m": Version(1)}, 0.4)  # came back on the old cache entry
    assert of(out, Load) == [Load(d.wid, Target("m", 2, "/cache/m/2", ""), False)]


# -- properties --------------------------------------------------------------------------------
EVENTS = st.lists(st.tuples(st.sampled_from(["arrive", "arrive", "arrive", "pinned", "done", "done",
                                             "done", "target", "loaded", "loaded", "fail", "lost",
                                             "ready", "tick"]),
                            st.integers(0, 7), st.floats(0, 0.05)), max_size=150)
KEYS = [None, (("float32", (4,)),), (("float32", (8,)),)]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS, workers=st.integers(1, 3), policy=st.sampled_from(list(SwapPolicy)),
       max_batch=st.sampled_from([1, 1, 4, 16]), delay=st.sampled_from([0.0, 0.002, 0.03]),
       cap=st.sampled_from([1, 3, 64]))
def test_properties_over_random_event_orders(events, workers, policy, max_batch, delay, cap) -> None:
    """No request lost or answered twice; a load is issued as soon as a stale worker is free
    (never a request first); at most one load at a time; no unpinned reply older than one
    already sent; every refusal uses a documented code. With batching: a batch shares one
    model, key and pin, fits the caps, and a request a free worker could take is held back
    no longer than the batch delay."""
    b = make(workers, policy, queue_max=16, queue_timeout_s=2.0, max_batch=max_batch, batch_delay_s=delay)
    now, next_seq = 0.0, 2
    outcome: dict[str, str] = {}
    inflight: dict[str, tuple[tuple[Request, ...], int]] = {}
    loading: dict[str, Target] = {}
    cache = 1  # the newest good seq in the node's cache
    newest_unpinned_reply = 0
    for wid in b.workers:
        b.worker_ready(wid, {"m": Version(1)}, now, batch={"m": cap})

    def carry(actions) -> None:
        if b.loading is None:  # fairness: nothing went to a stale worker while no load was running
            for a in actions:
                if isinstance(a, Dispatch):
                    assert not b.swaps.stale("m", b.workers[a.wid].serving.get("m")), "request before load"
        for a in actions:
            match a:
                case Dispatch(wid, batch, waited):
                    assert wid not in inflight and 0 <= waited <= delay + 1e-9
                    assert len({r.rid for r in batch}) == len(batch)
                    seq = b.workers[wid].busy_seq
                    assert b.workers[wid].serving["m"].seq == seq
                    if len(batch) > 1:
                        assert sum(r.rows for r in batch) <= min(max_batch, cap)
                        assert len({(r.model, r.key, r.seq) for r in batch}) == 1 and batch[0].key is not None
                    for r in batch:
                        assert r.rid not in outcome and (not r.seq or r.seq == seq)
                    inflight[wid] = (batch, seq)
                case Refuse(r, code, _):
                    assert code in {"unavailable", "not_ready", "version_unavailable", "worker_lost"}
                    assert r.rid not in outcome
                    outcome[r.rid] = code
                case Expire(r):
                    assert r.rid not in outcome
                    outcome[r.rid] = "expired"
                case Load(wid, t, _):
                    assert not loading, "two loads at once"
                    assert wid not in inflight
                    loading[wid] = t

    for kind, pick, dt in events:
        now += dt
        if kind in ("arrive", "pinned"):
            seq = 1 + pick % next_seq if kind == "pinned" else 0
            r = req(now, seq=seq, timeout=1.0 + pick, key=KEYS[pick % 3], rows=1 + pick % 3)
            carry(b.request(r, now))
        elif kind == "done" and inflight:
            wid = sorted(inflight)[pick % len(inflight)]
            batch, seq = inflight.pop(wid)
            for r in batch:
                outcome[r.rid] = f"ok {seq}"
                if not r.seq:
                    assert seq >= newest_unpinned_reply, "an unpinned reply stepped back"
                    newest_unpinned_reply = seq
            carry(b.done(wid, now))
        elif kind == "target":
            cache = next_seq
            carry(b.target(Target("m", next_seq, f"/cache/m/{next_seq}"), now))
            next_seq += 1
        elif kind in ("loaded", "fail") and loading:
            wid = sorted(loading)[0]
            t = loading.pop(wid)
            # a release fails for the first worker that tries it (a bad release), not later
            ok = kind == "loaded" or t.seq <= b.swaps.floor["m"]
            if not ok and cache == t.seq:
                cache = max((s for s in range(1, t.seq) if s not in b.swaps.rejected["m"]), default=1)
            carry(b.loaded(wid, "m", t.seq, "", ok, "" if ok else "bad", now, batch=cap))
        elif kind == "lost":
            wid = sorted(b.workers)[pick % workers]
            if b.workers[wid].ready:
                if wid in inflight:
                    batch, _ = inflight.pop(wid)
                    for r in batch:  # every request of its batch, once
                        assert r.rid not in outcome
                        outcome[r.rid] = "worker_lost (pending)"
                loading.pop(wid, None)
                actions = b.worker_lost(wid, now)
                # its request is answered worker_lost by the broker
                carry([a for a in actions if not (isinstance(a, Refuse) and a.code == "worker_lost")])
        elif kind == "ready":
            down = [w for w, s in b.workers.items() if not s.ready]
            if down:
                carry(b.worker_ready(down[pick % len(down)], {"m": Version(cache)}, now, batch={"m": cap}))
        else:
            carry(b.tick(now))
        # invariants after every event
        assert len([w for w in b.workers.values() if w.loading]) <= 1
        for w in b.workers.values():
            assert not (w.busy and w.loading)
        if b.loading is None:  # fairness: a free stale worker is never left without its load
            assert not [w for w in b.workers.values() if w.free and b.swaps.stale("m", w.serving.get("m"))]
        free = [w for w in b.workers.values() if w.free]
        older = older_in_flight("m", b.workers, b.swaps)
        for r in b.pending:  # held for a batch, never past the delay (the shell ticks at wake_at)
            if any(b.swaps.eligible("m", w.serving.get("m"), r.seq, older) for w in free):
                assert now < r.received + delay and b.wake_at <= r.received + delay + 1e-9
    # nothing lost: every request has one outcome, or is still queued or running
    open_ids = {r.rid for r in b.pending} | {r.rid for batch, _ in inflight.values() for r in batch}
    assert not open_ids & set(outcome)
