"""The node front's share of a request, without processes (issue 31: the single front thread
capped serving): a worker is handed its next batch before the front spends its time on the
last batch's replies, and multipart frames go through libzmq without pyzmq's per-frame Python
overhead but with the same meaning."""

from __future__ import annotations

from collections import Counter

import zmq

from zmqmodels import protocol as P
from zmqmodels.core.broker import Broker
from zmqmodels.core.supervisor import Supervisor
from zmqmodels.core.swap import Version
from zmqmodels.core.work import Dispatch, Request
from zmqmodels.node.pool import WorkerMessages
from zmqmodels.transport.wire import NOBLOCK, recv_frames, send_frames

KEY = (("float32", (4,)),)


class FakeReports:
    class ledger:  # noqa: N801 - the attribute the pool reads
        @staticmethod
        def answer(model: str, seq: int, code: str) -> None:
            pass


def test_a_worker_gets_its_next_batch_before_the_front_sends_the_last_ones_replies() -> None:
    """One worker: while the front sent 32 replies the worker sat idle, its next batch queued."""
    broker = Broker(["m"], ["w0"], path_for=lambda n, s: "", max_batch=32)
    broker.worker_ready("w0", {"m": Version(1, "v1")}, 0.0, batch={"m": 32})
    events: list[str] = []

    def carry(actions: list) -> None:
        events.extend("dispatch" for a in actions if isinstance(a, Dispatch))

    supervisor = Supervisor(["w0"], ttl_s=5, request_timeout_s=30, load_timeout_s=60)
    pool = WorkerMessages("n", ["w0"], broker, supervisor, FakeReports(), Counter(), carry=carry,
                          send_reply=lambda frames: events.append("reply"), metrics=lambda: None)
    reqs = [Request(str(i).encode(), "m", str(i), 0.0, 10.0, key=KEY) for i in range(8)]
    carry(broker.request(reqs[0], 0.0))  # w0 busy with one
    for r in reqs[1:]:
        carry(broker.request(r, 0.0))  # queued behind it
    assert events == ["dispatch"]
    frames = P.pack(P.Answers([P.Answer(b"0", True, "", 1)]), b"reply-0")
    msg, payload = P.unpack(frames)
    pool._answered("w0", msg, payload, 0.001)
    assert events == ["dispatch", "dispatch", "reply"], events  # the next batch first
    assert [r.rid for r in broker.workers["w0"].busy] == [r.rid for r in reqs[1:]]


def test_frames_go_through_as_pyzmq_would_send_and_receive_them() -> None:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire")
        b.connect("inproc://wire")
        frames = [b"client", b"", memoryview(b"INFER"), zmq.Frame(b"header"), bytearray(3000)]
        send_frames(a, frames, copy=False)
        got = recv_frames(b)
        assert [bytes(f.buffer) for f in got] == [b"client", b"", b"INFER", b"header", bytes(3000)]
        send_frames(a, [b"one"])
        assert recv_frames(b, copy=True) == [b"one"]
        try:
            recv_frames(b, NOBLOCK)
            raise AssertionError("nothing was there")
        except zmq.Again:
            pass
        a.send_multipart([b"x", b"y"])  # pyzmq's own, read back by ours
        assert recv_frames(b, copy=True) == [b"x", b"y"]
    finally:
        a.close(0)
        b.close(0)
        ctx.term()
