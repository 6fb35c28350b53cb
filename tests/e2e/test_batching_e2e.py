"""Dynamic batching with real processes: a hub, a node's worker processes, pipelined clients.
64 requests in flight through a swap; a malformed request and a raising sample inside a
batch; a worker killed mid-batch; the pipelined client and ``infer --inputs-file``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import zmq

from tests.helpers import CppNode, built_binary, wait_until
from tests.models import Rows
from zmqmodels import AsyncClient, DeadlineError, Node, RemoteError, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.protocol.tensors import encode

pytestmark = pytest.mark.timeout(300)
SCALES = {"v1": 2.0, "v2": 3.0}


def rows_release(label: str):
    return build_release(compile_model(Rows(SCALES[label]), [torch.ones(1, 4), torch.full((2, 4), 0.5)]),
                         "rows", label)


def serve(hub, tmp_path, workers: int = 2, kind: str = "python", **kw):
    """A Python node (``workers`` processes) or the C++ node (``workers`` serving threads)."""
    if kind == "cpp":
        binary = built_binary()
        if binary is None:
            pytest.skip("the C++ node is not built: scripts/test builds it first (or run scripts/build_cpp)")
        delay = kw.pop("batch_delay_s", None)
        extra = [] if delay is None else ["--batch-delay", f"{delay * 1e6:g}"]
        return CppNode(binary, hub.address, tmp_path / "cache", "--threads", str(workers), *extra,
                       models=("rows",))
    return Node(hub.address, ["rows"], "tcp://127.0.0.1:0", cache=tmp_path / "cache", workers=workers,
                **kw).start()


def publish(hub, label: str, nodes: int = 1) -> int:
    m = hub.publish(rows_release(label))
    ok, status = hub.wait_for("rows", m.seq, nodes, 120)
    assert ok, status
    return m.seq


def x_for(i: int, rows: int = 1) -> torch.Tensor:
    return torch.full((rows, 4), 1.0 + (i % 97) / 8)


@pytest.mark.parametrize("kind", ["python", "cpp"])
def test_64_in_flight_through_a_swap_fail_nothing_step_back_never_and_match_eager(hub, tmp_path,
                                                                                 kind) -> None:
    node = serve(hub, tmp_path, workers=2, kind=kind, batch_delay_s=0.0005)
    try:
        publish(hub, "v1")
        seen: list[tuple[float, float, int, str, int]] = []  # sent, received, seq, label, rows joined
        errors: list[BaseException] = []

        async def client(c: AsyncClient, stop: asyncio.Event, k: int) -> None:
            i = k
            while not stop.is_set():
                x = x_for(i, 1 + i % 3)
                sent = time.monotonic()
                try:
                    r = await c.infer("rows", x, timeout=30)
                except BaseException as exc:  # recorded and asserted below
                    errors.append(exc)
                    return
                assert torch.equal(r.outputs, x * SCALES[r.label]), (r.label, x[0, 0])
                seen.append((sent, time.monotonic(), r.seq, r.label, r.batch - x.shape[0]))
                i += 64

        async def run() -> None:
            async with AsyncClient(node.address, retries=0) as c:
                stop = asyncio.Event()
                tasks = [asyncio.create_task(client(c, stop, k)) for k in range(64)]
                await asyncio.sleep(1.0)
                m = await asyncio.to_thread(hub.publish, rows_release("v2"))
                ok, status = await asyncio.to_thread(hub.wait_for, "rows", m.seq, 1, 120)
                assert ok, status
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*tasks)

        asyncio.run(run())
    finally:
        node.close()
    assert not errors, errors[:3]
    labels = {label for _, _, _, label, _ in seen}
    assert labels == {"v1", "v2"} and len(seen) > 200
    # no step-back: a request sent after a reply came back is served by that seq or newer
    by_received = sorted(seen, key=lambda s: s[1])
    newest, j = 0, 0
    for sent, _, seq, _, _ in sorted(seen):
        while j < len(by_received) and by_received[j][1] <= sent:
            newest = max(newest, by_received[j][2])
            j += 1
        assert seq >= newest, "an unpinned reply stepped back"
    # requests were joined: replies from a forward with rows beyond the request's own (how many
    # depends on how busy the machine is: 20 % idle, more under load; 5 % asks only that it happens)
    batched = [extra for *_, extra in seen if extra > 0]
    assert len(batched) > len(seen) // 20, f"only {len(batched)} of {len(seen)} answered in a batch"


def raw(sock: zmq.Socket, rid: str, x: torch.Tensor, *, short: bool = False) -> None:
    spec, bufs = encode((x,))
    data = [bytes(b) for b in bufs]
    if short:
        data = [data[0][:-4]]
    sock.send_multipart([b"", *P.pack(P.InferRequest("rows", rid, spec, timeout_ms=30_000), *data)])


def collect(sock: zmq.Socket, n: int, linger: float = 0.0, timeout: float = 60) -> dict[str, list]:
    """Replies by id until ``n`` came (and ``linger`` s more, to catch a duplicate)."""
    got: dict[str, list] = {}
    deadline = time.monotonic() + timeout
    until = None
    while time.monotonic() < (until or deadline):
        if not sock.poll(100):
            if sum(map(len, got.values())) >= n and until is None:
                until = time.monotonic() + linger
            continue
        frames = sock.recv_multipart()
        assert frames[0] == b""
        hdr, tensors = P.unpack(frames[1:])
        got.setdefault(hdr.id, []).append((hdr, tensors))
    return got


def dealer() -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    return sock


@pytest.mark.parametrize("kind", ["python", "cpp"])
def test_a_malformed_request_and_a_raising_sample_fail_alone_inside_a_batch(hub, tmp_path, kind) -> None:
    node, sock = serve(hub, tmp_path, workers=1, kind=kind, batch_delay_s=0.002), dealer()
    try:
        publish(hub, "v1")
        sock.connect(node.address)
        raw(sock, "slow", torch.full((1, 4), -2.0))  # holds the worker ~1 s: the rest queue
        time.sleep(0.3)
        for i in range(40):
            x = x_for(i)
            if i == 17:
                x[0, 0] = -1.0  # the model raises on this sample
            raw(sock, f"r{i}", x, short=i == 23)  # a frame shorter than its shape
        got = collect(sock, 41, linger=0.5)
    finally:
        sock.close()
        node.close()
    assert all(len(v) == 1 for v in got.values()) and len(got) == 41
    for i in range(40):
        hdr = got[f"r{i}"][0][0]
        if i == 17:
            assert isinstance(hdr, P.ErrorReply) and hdr.code == "model_error", hdr
            assert "a row asked to fail" in hdr.message
        elif i == 23:
            assert isinstance(hdr, P.ErrorReply) and hdr.code == "bad_request", hdr
            assert "bytes" in hdr.message
        else:
            assert isinstance(hdr, P.InferReply), hdr
    batches = {got[f"r{i}"][0][0].batch for i in range(40) if i not in (17, 23)}
    assert max(batches) > 1  # the good ones were joined


def test_a_worker_killed_mid_batch_answers_each_request_worker_lost_once(hub, tmp_path) -> None:
    node, sock = serve(hub, tmp_path, workers=1), dealer()
    try:
        publish(hub, "v1")
        sock.connect(node.address)
        raw(sock, "first", x_for(0))
        assert "first" in collect(sock, 1)
        raw(sock, "slow0", torch.full((1, 4), -2.0))  # alone: the worker was free
        time.sleep(0.2)
        ids = [f"b{i}" for i in range(6)]
        raw(sock, ids[0], torch.full((1, 4), -2.0))  # this batch takes ~1 s too
        for rid in ids[1:]:
            raw(sock, rid, x_for(3))
        wid = next(iter(node.broker.workers))
        wait_until(lambda: len(node.broker.workers[wid].busy) == len(ids), 20, what="the batch in hand")
        os.kill(node.worker_pids()[wid], signal.SIGKILL)
        got = collect(sock, 7, linger=2.0)
    finally:
        sock.close()
        node.close()
    assert isinstance(got["slow0"][0][0], P.InferReply)
    for rid in ids:
        assert len(got[rid]) == 1, (rid, got[rid])  # answered once
        hdr = got[rid][0][0]
        assert isinstance(hdr, P.ErrorReply) and hdr.code == "worker_lost" and hdr.retryable


def test_the_async_client_retries_and_reports_a_node_that_is_gone(hub, tmp_path) -> None:
    node = serve(hub, tmp_path, workers=1)
    try:
        publish(hub, "v1")

        async def run() -> None:
            async with AsyncClient(node.address, timeout=10) as c:
                rs = await c.infer_many("rows", [x_for(i) for i in range(100)], in_flight=32)
                assert [r.outputs[0, 0].item() for r in rs] == [x_for(i)[0, 0].item() * 2 for i in range(100)]
                with pytest.raises(RemoteError, match="unknown_model|does not serve"):
                    await c.infer("nope", x_for(0))
            async with AsyncClient("tcp://127.0.0.1:1", timeout=0.2, retries=2) as c:
                with pytest.raises(DeadlineError, match="3 attempt"):
                    await c.infer("rows", x_for(0))

        asyncio.run(run())
    finally:
        node.close()


def test_infer_sends_a_file_of_inputs_pipelined(hub, tmp_path) -> None:
    node = serve(hub, tmp_path, workers=1)
    try:
        publish(hub, "v1")
        path = tmp_path / "inputs.pt"
        torch.save([x_for(i) for i in range(50)], path)
        out = subprocess.run([sys.executable, "-m", "zmqmodels", "infer", "--server", node.address,
                              "--model", "rows", "--inputs-file", str(path), "--in-flight", "16"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("50 of 50 answered in "), out.stdout
        both = subprocess.run([sys.executable, "-m", "zmqmodels", "infer", "--server", node.address,
                               "--model", "rows", "--inputs-file", str(path), "--input", "1x4"],
                              capture_output=True, text=True, timeout=120)
        assert both.returncode != 0 and "not both or neither" in both.stderr
    finally:
        node.close()


def test_metrics_count_rows_per_forward_and_the_wait_for_a_batch(hub, tmp_path) -> None:
    from tests.helpers import free_port, scrape

    port = free_port()
    node = serve(hub, tmp_path, workers=1, metrics=f"127.0.0.1:{port}")
    try:
        publish(hub, "v1")

        async def burst() -> None:
            async with AsyncClient(node.address, timeout=30) as c:
                await c.infer("rows", torch.full((1, 4), -2.0))  # warm: one forward of 1 row
                slow = asyncio.create_task(c.infer("rows", torch.full((1, 4), -2.0)))
                await asyncio.sleep(0.3)  # the worker is busy: these queue and join
                await c.infer_many("rows", [x_for(i) for i in range(20)], in_flight=20)
                await slow

        asyncio.run(burst())
        m = scrape(port)
    finally:
        node.close()
    forwards = m["zmqmodels_batch_rows_count{model=rows}"]
    rows = m["zmqmodels_batch_rows_sum{model=rows}"]
    assert rows == 22 and forwards < rows  # every row counted once, some forwards joined
    assert m["zmqmodels_batch_wait_seconds_count{model=rows}"] == forwards

