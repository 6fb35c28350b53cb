"""Dynamic batching without processes: the batching core (keys, evidence, the broker's
joins and holds), the publish-time proof, the node's check of a claim at load, and a worker
answering random batches exactly as it answers each request alone (hypothesis)."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.models import CenterBatch, Positive, Rows, make_rows
from zmqmodels import build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.core.batching import batch_key
from zmqmodels.core.broker import Broker
from zmqmodels.core.swap import Version
from zmqmodels.core.work import Dispatch, Expire, Refuse, Request
from zmqmodels.errors import ParityError
from zmqmodels.model.batching import prove_batching
from zmqmodels.model.loader import load_release
from zmqmodels.node.worker import Worker
from zmqmodels.protocol.tensors import encode

pytestmark = pytest.mark.timeout(300)

KEY = (("float32", (4,)),)


def spec(*shapes, dtype="float32"):
    return {"t": "tuple", "items": [{"t": "tensor", "dtype": dtype, "shape": list(s), "f": i}
                                    for i, s in enumerate(shapes)]}


def test_a_key_is_the_inputs_but_their_leading_dimension() -> None:
    assert batch_key(spec((3, 4))) == (KEY, 3)
    assert batch_key(spec((2, 4), (2, 8, 8))) == ((("float32", (4,)), ("float32", (8, 8))), 2)
    assert batch_key(spec((1, 4)))[0] == batch_key(spec((5, 4)))[0] != batch_key(spec((1, 5)))[0]
    assert batch_key(spec((1, 4), dtype="float64"))[0] != KEY
    for never in (spec((2, 4), (3, 4)), spec(()), spec((0, 4)), {"t": "list", "items": []},
                  {"t": "tuple", "items": [{"t": "int", "v": 3}]}, None, "x"):
        assert batch_key(never) is None, never


_rid = iter(range(1, 1 << 30))


def req(now: float, *, rows: int = 1, key=KEY, seq: int = 0, timeout: float = math.inf) -> Request:
    rid = str(next(_rid))
    return Request(rid.encode(), "m", rid, now, now + 10, seq, now + timeout, key=key, rows=rows)


def broker(workers: int = 1, cap: int = 64, **kw) -> Broker:
    b = Broker(["m"], [f"w{i}" for i in range(workers)], path_for=lambda n, s: f"/c/{n}/{s}",
               max_batch=kw.pop("max_batch", 32), batch_delay_s=kw.pop("delay", 0.001), **kw)
    for w in b.workers:
        b.worker_ready(w, {"m": Version(1)}, 0.0, batch={"m": cap})
    return b


def dispatches(actions):
    return [a for a in actions if isinstance(a, Dispatch)]


def test_one_request_at_a_time_is_never_held() -> None:
    """At 1 in flight the last batch was one request: nothing says more are coming."""
    b, now = broker(), 0.0
    for _ in range(50):
        (d,) = dispatches(b.request(req(now), now))
        assert len(d.requests) == 1 and d.waited == 0
        now += 0.0002  # a fast client: arrivals closer together than the delay
        b.done("w0", now)
        now += 0.0001
    assert math.isinf(b.wake_at)


def test_queued_requests_join_up_to_the_cap_by_key_and_pin() -> None:
    b = broker(max_batch=8)
    (first,) = dispatches(b.request(req(0, rows=2), 0))  # w0 busy from here
    queued = [req(0, rows=3), req(0, key=None), req(0, rows=4), req(0, seq=1), req(0, rows=2),
              req(0, key=(("float32", (5,)),)), req(0, rows=1)]
    for r in queued:
        assert not dispatches(b.request(r, 0))
    (d,) = dispatches(b.done("w0", 0.001))
    # the oldest and those that fit with it: 3 + 4 + 1 rows (the 2-row one would make 9)
    assert [r.rid for r in d.requests] == [queued[0].rid, queued[2].rid, queued[6].rid]
    left = [r.rid for r in b.pending]
    assert left == [queued[i].rid for i in (1, 3, 4, 5)]  # order kept
    (d,) = dispatches(b.done("w0", 0.002))
    assert [r.rid for r in d.requests] == [queued[1].rid]  # no key: alone
    (d,) = dispatches(b.done("w0", 0.003))
    assert [r.rid for r in d.requests] == [queued[3].rid]  # pinned: not with the unpinned


def test_a_worker_without_a_proven_release_takes_one_at_a_time() -> None:
    b = broker(cap=1)
    b.request(req(0), 0)
    for _ in range(5):
        b.request(req(0), 0)
    assert [len(d.requests) for d in dispatches(b.done("w0", 0.001))] == [1]


def test_a_batch_is_held_while_more_are_coming_and_never_past_the_delay() -> None:
    b = broker(delay=0.001)
    now = 0.0
    b.request(req(now), now)  # busy
    for _ in range(9):
        b.request(req(now), now)
    (d,) = dispatches(b.done("w0", 0.0005))
    assert len(d.requests) == 9  # evidence: batches of 9
    now = 0.0006
    r1 = req(now)
    assert not dispatches(b.request(r1, now))  # w0 busy
    b.done("w0", 0.0007)  # free; one queued, the last batch had 9, arrivals are close: hold
    assert b.wake_at == pytest.approx(r1.received + 0.001)
    r2 = req(0.0008)
    assert not dispatches(b.request(r2, 0.0008))  # still fewer than 9: keep holding
    (d,) = dispatches(b.tick(b.wake_at))
    assert [r.rid for r in d.requests] == [r1.rid, r2.rid]
    assert d.waited == pytest.approx(0.0016 - 0.0007)
    assert math.isinf(b.wake_at)


def test_a_request_whose_client_gave_up_while_held_is_dropped() -> None:
    b = broker(delay=0.01)
    b.request(req(0), 0)
    for _ in range(4):
        b.request(req(0), 0)
    b.done("w0", 0.001)  # evidence: batches of 4
    b.request(req(0.002), 0.002)
    b.done("w0", 0.003)
    late = req(0.004, timeout=0.002)
    b.request(late, 0.004)
    out = b.tick(0.0065)
    assert [a.request.rid for a in out if isinstance(a, Expire)] == [late.rid]
    assert late.rid not in [r.rid for d in dispatches(out) for r in d.requests]


def test_a_hold_that_ends_without_a_dispatch_leaves_no_state() -> None:
    """Groups are keyed by client-chosen shapes: a held group whose requests expired must not
    stay in the broker (it grew without bound, and a later batch of it reported the old hold)."""
    b = broker(delay=0.01)
    b.request(req(0), 0)
    for _ in range(4):
        b.request(req(0), 0)
    b.done("w0", 0.001)  # evidence: batches of 4
    b.request(req(0.002), 0.002)
    b.done("w0", 0.003)
    for k in range(50):  # a different shape each time, each held, each given up on
        key = (("float32", (k,)),)
        b.request(req(0.004, key=key, timeout=0.001), 0.004)
        b.tick(0.0055)
    b.tick(1.0)
    assert not b.pending and not b._held_since


def test_a_worker_lost_mid_batch_refuses_each_of_its_requests_once() -> None:
    b = broker()
    b.request(req(0), 0)
    for _ in range(5):
        b.request(req(0), 0)
    (d,) = dispatches(b.done("w0", 0.001))
    out = b.worker_lost("w0", 0.002)
    lost = [a.request.rid for a in out if isinstance(a, Refuse) and a.code == "worker_lost"]
    assert sorted(lost) == sorted(r.rid for r in d.requests) and len(lost) == 5


# -- the proof at publish --------------------------------------------------------------------
def test_the_proof_finds_a_row_wise_model_batchable_and_records_it() -> None:
    model, examples = make_rows()
    release = build_release(compile_model(model, examples), "rows", "v1")
    assert release.manifest.batch == 64 and release.manifest.batch_dim == 0
    assert release.notes == ("rows: batchable along dim 0, proven up to 64 rows",)


@pytest.mark.parametrize("model", [CenterBatch(), Positive()],
                         ids=["batch-statistics", "data-dependent-shape"])
def test_the_proof_refuses_what_is_not_batch_invariant(model) -> None:
    compiled = compile_model(model, [torch.randn(1, 4), torch.randn(1, 4).abs()])
    auto = build_release(compiled, "m", "v1")
    assert auto.manifest.batch == 0
    assert len(auto.notes) == 1 and auto.notes[0].startswith("m: served unbatched: ")
    with pytest.raises(ParityError, match="declared batchable, but its examples say otherwise"):
        build_release(compiled, "m", "v1", batching="on")


def test_off_records_it_unbatched_and_one_example_row_is_enough_to_prove() -> None:
    model, _ = make_rows()
    compiled = compile_model(model, torch.ones(1, 4))
    assert build_release(compiled, "m", batching="off").manifest.batch == 0
    assert prove_batching(compiled.module, compiled.examples, max_batch=8).batch == 8
    # derived samples catch a reduction across rows that identical samples would hide
    assert prove_batching(compile_model(CenterBatch(), torch.ones(1, 4)).module,
                          ((torch.ones(1, 4),),)).batch == 0


def test_a_node_joins_nothing_for_a_claim_its_own_check_refutes(tmp_path) -> None:
    """A manifest that claims batching for a model that is not (built unbatched, claim forged:
    the release is unsigned) is loaded and served, one request per forward, with the reason."""
    compiled = compile_model(CenterBatch(), [torch.randn(1, 4), torch.randn(2, 4)])
    release = build_release(compiled, "m", batching="off")
    forged = msgspec.structs.replace(release.manifest, batch=64)
    path = tmp_path / "m.pt"
    path.write_bytes(release.archive())
    loaded = load_release(forged, str(path))
    assert loaded.batch == 1 and "did not hold" in loaded.batch_note
    honest = build_release(compile_model(*make_rows()), "r")
    path.write_bytes(honest.archive())
    assert load_release(honest.manifest, str(path)).batch == 64


# -- a worker's batch equals its requests alone (hypothesis) ----------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w")
    release = build_release(compile_model(*make_rows(3.0)), "m", "v1")
    m = msgspec.structs.replace(release.manifest, seq=1)
    (tmp / "a.pt").write_bytes(release.archive())
    w = Worker("ipc://unused", "w0", "cpu", ["m"], str(tmp / "cache"))
    w.held.slots["m"].swap(load_release(m, str(tmp / "a.pt")))
    assert w.held.slots["m"].current().batch == 64
    return w


def frames_for(kind: str, rows: int, rid: str) -> list[bytes]:
    x = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) / 7 + 1
    if kind == "raises":
        x[rows - 1, 0] = -1.0
    s, bufs = encode((x,))
    if kind == "short":  # a frame shorter than its shape says
        bufs = [bytes(bufs[0])[:-4]]
    if kind == "pinned-elsewhere":
        return P.pack(P.InferRequest("m", rid, s, 7), *[bytes(b) for b in bufs])
    return P.pack(P.InferRequest("m", rid, s), *[bytes(b) for b in bufs])


class F:
    """A received frame, as the worker sees one."""

    def __init__(self, b: bytes) -> None:
        self.bytes = b
        self.buffer = memoryview(b)

    def __len__(self) -> int:
        return len(self.bytes)


KINDS = st.sampled_from(["ok", "ok", "ok", "ok", "raises", "short", "pinned-elsewhere", "expired"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(KINDS, st.integers(1, 5)), min_size=1, max_size=12))
def test_a_batch_answers_each_request_as_it_would_be_answered_alone(worker, items) -> None:
    """Random batches of good, raising, malformed, wrongly pinned and expired requests: each
    is answered once, with exactly the reply it gets alone (outputs bit for bit, or the same
    error code); the good ones share one forward unless one of them made the model raise."""
    jobs, alone = [], []
    for n, (kind, rows) in enumerate(items):
        raw = frames_for(kind, rows, f"r{n}")
        expires = 1 if kind == "expired" else 0  # 1 ns after boot: long past
        jobs.append((P.Job(b"c%d" % n, 0, expires, len(raw)), [F(b) for b in raw]))
        alone.append(None if kind == "expired" else worker.infer([F(b) for b in raw], 0))
    with torch.inference_mode():
        got = worker.infer_batch(jobs)
    assert len(got) == len(items)
    good = [k for k, _ in items if k == "ok"]
    raised = any(k == "raises" for k, _ in items)
    for (kind, rows), (reply, code, served), want in zip(items, got, alone, strict=True):
        if kind == "expired":
            assert (reply, served) == ([], False)
            continue
        assert served and code == want[1]
        hdr, tensors = P.unpack([F(bytes(b)) for b in reply])
        ref, ref_tensors = P.unpack([F(bytes(b)) for b in want[0]])
        if isinstance(ref, P.ErrorReply):
            assert isinstance(hdr, P.ErrorReply) and hdr.code == ref.code and hdr.id == ref.id
            continue
        assert [bytes(t.buffer) for t in tensors] == [bytes(t.buffer) for t in ref_tensors]
        assert hdr.id == ref.id and hdr.seq == 1
        total = sum(r for k, r in items if k in ("ok", "raises"))
        if not raised and len(good) > 1:
            assert hdr.batch == sum(r for k, r in items if k == "ok") <= total
        else:
            assert hdr.batch == rows


def test_rows_is_deterministic_so_the_property_can_compare_bytes() -> None:
    m = torch.jit.script(Rows(3.0))
    x = torch.randn(5, 4)
    assert torch.equal(m(x)[2:3], m(x[2:3]))


def test_a_timer_a_handler_sets_is_kept_though_the_next_tick_is_far() -> None:
    """A batch held back inside a message handler must go at its wake time: the loop used to
    sleep until its next periodic tick (0.1 s in a node), so a closed-loop client population
    whose requests were all held waited for that tick with nothing else to wake the loop."""
    import threading
    import time

    import zmq

    from zmqmodels.transport.ioloop import IOThread

    class Loop(IOThread):
        kind = "probe"

        def __init__(self) -> None:
            super().__init__(zmq.Context.instance())
            self.wake, self.ticks, self.ticked = math.inf, [], threading.Event()

        def _open(self):
            s = self._socket(zmq.PULL)
            s.bind("inproc://wake-probe")
            return [(s, self._on)]

        def _on(self, frames) -> None:
            self.wake = time.monotonic() + 0.05  # like a broker holding a batch

        def _wake_at(self) -> float:
            return self.wake

        def _tick(self, now: float) -> float:
            self.ticks.append(now)
            if now >= self.wake:
                self.wake = math.inf
                self.ticked.set()
            return 30.0  # the periodic tick is far away

    loop = Loop().start()
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    try:
        push.connect("inproc://wake-probe")
        sent = time.monotonic()
        push.send(b"x")
        assert loop.ticked.wait(10), "the held timer waited for the periodic tick"
        assert loop.ticks[-1] - sent >= 0.05
    finally:
        push.close()
        loop.close()


@pytest.mark.cuda
def test_a_cuda_worker_joins_in_pinned_buffers_and_answers_as_alone(tmp_path) -> None:
    release = build_release(compile_model(*make_rows(3.0)), "m", "v1")
    m = msgspec.structs.replace(release.manifest, seq=1)
    (tmp_path / "a.pt").write_bytes(release.archive())
    w = Worker("ipc://unused", "w0", "cuda:0", ["m"], str(tmp_path / "cache"))
    w.held.slots["m"].swap(load_release(m, str(tmp_path / "a.pt"), "cuda:0"))
    assert w.held.slots["m"].current().batch == 64
    raws = [frames_for("ok", rows, f"r{n}") for n, rows in enumerate([1, 3, 2])]
    jobs = [(P.Job(b"c", 0, 0, len(r)), [F(b) for b in r]) for r in raws]
    with torch.inference_mode():
        got = w.infer_batch(jobs)
    assert all(buf.is_pinned() for buf in w._pinned.values())
    for (reply, code, served), raw in zip(got, raws, strict=True):
        alone = w.infer([F(b) for b in raw], 0)
        hdr, tensors = P.unpack([F(bytes(b)) for b in reply])
        _, ref = P.unpack([F(bytes(b)) for b in alone[0]])
        assert served and not code and hdr.batch == 6
        assert torch.allclose(torch.frombuffer(bytearray(tensors[0].buffer), dtype=torch.float32),
                              torch.frombuffer(bytearray(ref[0].buffer), dtype=torch.float32))



def test_the_proof_costs_a_bounded_share_of_compile_and_parity_and_is_timed_apart() -> None:
    """The proof ran the model on up to 64 joined rows whatever its cost: `build 1.66 s` of a
    12.8 s publish of a ~100 MB model, inside `build`. It is now its own step (`batching`)
    and its joined runs shrink to fit PROOF_SHARE of compile + parity, reusing the parity
    run's outputs for the examples' samples."""
    from zmqmodels.defaults import PROOF_MIN_S, PROOF_SHARE

    torch.manual_seed(0)
    slow = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(24)]).eval()
    compiled = compile_model(slow, [(torch.randn(1, 1024),)])
    timings: dict[str, float] = {}
    release = build_release(compiled, "slow", "v1", codec="none", timings=timings)
    budget = max(PROOF_MIN_S, PROOF_SHARE * (compiled.compile_s + compiled.parity_s))
    print(f"proof {timings['batching']:.3f}s, budget {budget:.3f}s, claim {release.manifest.batch}")
    assert timings["batching"] <= budget + 0.05  # the scheduler's noise on a busy machine
    assert release.manifest.batch == 0 or release.manifest.batch >= 2
    forced = build_release(compiled, "slow", "v1", codec="none", batching="on")
    assert forced.manifest.batch == 64  # asked for outright: proven in full
