"""Serving with real worker processes: swap under load, rejection, crashes, every error code."""

from __future__ import annotations

import os
import signal
import threading
import time

import msgspec
import pytest
import torch
import zmq

from tests.helpers import wait_until
from tests.models import Probe, explodes_on_nodes, probe_examples
from zmqmodels import Client, Node, RemoteError, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.defaults import Limits

pytestmark = pytest.mark.timeout(240)


def probe_release(scale: float, label: str, ballast_mb: int = 0):
    torch.manual_seed(0)
    return build_release(compile_model(Probe(scale, ballast_mb), probe_examples()), "probe", label)


def start_node(hub, tmp_path, **kw) -> Node:
    kw.setdefault("workers", 2)
    return Node(hub.address if hub else None, kw.pop("models", ["probe"]), "tcp://127.0.0.1:0",
                cache=tmp_path / "cache", **kw).start()


def ask(node: Node, *inputs, **kw):
    with Client(node.address, timeout=10) as c:
        return c.infer("probe", *inputs, **kw)


def publish_and_wait(hub, release, nodes: int = 1, timeout: float = 60) -> int:
    m = hub.publish(release, reuse_label=True)  # swap tests publish the same two releases in turn
    ok, status = hub.wait_for(m.name, m.seq, nodes, timeout)
    assert ok, status
    return m.seq


def test_twenty_swaps_under_load_no_errors_and_outputs_match_versions(hub, tmp_path) -> None:
    scales = {"a": 2.0, "b": 3.0}
    releases = {k: probe_release(s, k) for k, s in scales.items()}
    node = start_node(hub, tmp_path)
    try:
        publish_and_wait(hub, releases["a"])
        stop = threading.Event()
        errors: list[BaseException] = []
        seen: list[tuple[str, int]] = []

        def client_loop(i: int) -> None:
            x = torch.full((1, 4), 1.0 + i)
            with Client(node.address, timeout=10, retries=0) as c:
                while not stop.is_set():
                    try:
                        r = c.infer("probe", x)
                        assert torch.equal(r.outputs, x * scales[r.label]), (r.label, r.outputs)
                        seen.append((r.label, r.seq))
                    except BaseException as exc:  # recorded and asserted below
                        errors.append(exc)
                        return

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            for n in range(20):
                publish_and_wait(hub, releases["b" if n % 2 == 0 else "a"])
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert not errors, errors[:3]
        assert len({seq for _, seq in seen}) >= 10  # replies came from many versions
        assert len(seen) > 100
    finally:
        node.close()


def test_k2_no_request_waits_for_a_load(hub, tmp_path) -> None:
    # The second example takes the model's slow path (~1.3 s), so each worker is busy ~1.3 s
    # per load (example check). A request routed to a loading worker would wait that long.
    def slow_release(scale: float, label: str):
        ex = [torch.ones(1, 4), torch.tensor([[-2.0, 0, 0, 0]])]
        return build_release(compile_model(Probe(scale), ex), "probe", label)

    releases = {"a": slow_release(2.0, "a"), "b": slow_release(3.0, "b")}
    node = start_node(hub, tmp_path, workers=2)
    try:
        publish_and_wait(hub, releases["a"])
        lat: list[tuple[float, float]] = []  # (start, latency s)
        windows: list[tuple[float, float]] = []
        stop = threading.Event()

        def client_loop() -> None:
            with Client(node.address, timeout=10, retries=0) as c:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    c.infer("probe", torch.ones(1, 4))
                    lat.append((t0, time.perf_counter() - t0))

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            for n in range(2):
                t0 = time.perf_counter()
                publish_and_wait(hub, releases["b" if n % 2 == 0 else "a"])
                windows.append((t0, time.perf_counter()))
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        in_swap = [d for t0, d in lat if any(a <= t0 + d and t0 <= b for a, b in windows)]
        # each window holds two loads, one after the other, each with a ~1 s example check: a
        # request that waited for a load would take about half a window or more
        assert len(in_swap) > 100
        assert max(in_swap) < min(b - a for a, b in windows) / 4, (max(in_swap), windows)
    finally:
        node.close()


def test_release_failing_its_example_check_is_rejected_old_keeps_serving(hub, tmp_path) -> None:
    node = start_node(hub, tmp_path)
    try:
        good = publish_and_wait(hub, probe_release(2.0, "good"))
        m = hub.publish(explodes_on_nodes("probe", "nan"))
        ok, status = hub.wait_for("probe", m.seq, 1, 60)
        assert not ok
        row = next(n for n in status.nodes if n.model == "probe")
        assert row.rejected_seq == m.seq and "NaN or Inf" in row.last_error
        wait_until(lambda: hub.status().nodes[0].state == "serving", 20, what="serving again")
        r = ask(node, torch.ones(1, 4))
        assert (r.seq, r.label) == (good, "good") and torch.equal(r.outputs, torch.full((1, 4), 2.0))
        # a tampered manifest (expected outputs that the archive does not produce) fails too
        wrong = probe_release(5.0, "lies")
        lie = msgspec.structs.replace(wrong.manifest, expected=probe_release(6.0, "x").manifest.expected)
        m2 = hub.publish(type(wrong)(lie, wrong.chunks))
        ok2, status2 = hub.wait_for("probe", m2.seq, 1, 60)
        assert not ok2 and "max abs diff" in status2.nodes[0].last_error
        assert ask(node, torch.ones(1, 4)).label == "good"
    finally:
        node.close()


def test_killed_worker_is_restarted_and_no_client_hangs(hub, tmp_path) -> None:
    node = start_node(hub, tmp_path)
    try:
        publish_and_wait(hub, probe_release(2.0, "v1"))
        # a request in flight on the worker that dies gets `worker_lost` (retryable)
        slow = torch.tensor([[-2.0, 0, 0, 0]])
        result: list[BaseException | object] = []

        def slow_call() -> None:
            try:
                with Client(node.address, timeout=20, retries=0) as c:
                    result.append(c.infer("probe", slow))
            except BaseException as exc:  # asserted below
                result.append(exc)

        t = threading.Thread(target=slow_call)
        t.start()
        wait_until(lambda: any(w.busy for w in node.broker.workers.values()), 10,
                   what="the slow request to start")
        victim = next(wid for wid, w in node.broker.workers.items() if w.busy)
        old_pid = node.worker_pids()[victim]
        os.kill(old_pid, signal.SIGKILL)
        t.join(20)
        assert isinstance(result[0], RemoteError) and result[0].code == "worker_lost"
        assert result[0].retryable
        # clients with retries never see the crash; the worker comes back
        with Client(node.address, timeout=10, retries=3) as c:
            for _ in range(50):
                assert torch.equal(c.infer("probe", torch.ones(1, 4)).outputs, torch.full((1, 4), 2.0))
        wait_until(lambda: node.broker.workers[victim].ready and node.worker_pids()[victim] != old_pid,
                   30, what="the restart")
        assert node.stats["worker_restarts"] == 1
    finally:
        node.close()


def test_every_serving_error_code(hub, tmp_path) -> None:
    node = start_node(hub, tmp_path, models=["probe", "later"],
                      limits=Limits(max_request_bytes=10_000, max_request_tensors=4))
    try:
        seq = publish_and_wait(hub, probe_release(2.0, "v1"))
        c = Client(node.address, timeout=10, retries=0)

        def code_of(*args, **kw) -> str:
            with pytest.raises(RemoteError) as err:
                c.infer(*args, **kw)
            return err.value.code

        assert code_of("nope", torch.ones(1, 4)) == "unknown_model"
        assert code_of("later", torch.ones(1, 4)) == "not_ready"
        assert code_of("probe", torch.ones(1, 4), seq=seq + 7) == "version_unavailable"
        assert c.infer("probe", torch.ones(1, 4), seq=seq).seq == seq
        assert code_of("probe", torch.ones(4)) == "bad_input"  # rank
        assert code_of("probe", torch.ones(1, 4, dtype=torch.int32)) == "bad_input"  # dtype
        assert code_of("probe", torch.ones(1, 4), torch.ones(1, 4)) == "bad_input"  # count
        assert code_of("probe", torch.ones(100, 100)) == "too_large"
        assert code_of("probe", *[torch.ones(1)] * 5) == "too_large"
        assert code_of("probe", torch.tensor([[-1.0, 0, 0, 0]])) == "model_error"
        with pytest.raises(RemoteError, match="probe asked to fail"):
            c.infer("probe", torch.tensor([[-1.0, 0, 0, 0]]))
        # milestone 1: wrong shapes came back as 25-40-line TorchScript tracebacks with the
        # first word cut off; now one line naming what was expected and what came
        with pytest.raises(RemoteError) as err:
            c.infer("probe", torch.ones(2, 5))
        assert err.value.code == "bad_input"
        assert err.value.message == "input 0: expected float32 [*, 4], got float32 [2, 5]"
        assert c.infer("probe", torch.ones(7, 4)).outputs.shape == (7, 4)  # any batch size
        with pytest.raises(RemoteError) as err:
            c.infer("probe", torch.tensor([[-1.0, 0, 0, 0]]))
        msg = err.value.message
        assert "\n" not in msg and msg.startswith("RuntimeError: probe asked to fail"), msg
        assert "(at code/" in msg and "in forward)" in msg, msg
        # malformed frames from a raw REQ socket
        raw = zmq.Context.instance().socket(zmq.REQ)
        raw.linger = 0
        raw.connect(node.address)
        try:
            for frames in ([b"HELLO"], [b"INFER", b"\xc1"], [b"INFER", P.encode(P.InferRequest(
                    "probe", "1", {"t": "tuple", "items": [{"t": "tensor", "dtype": "float32",
                                                           "shape": [1, 4], "f": 0}]})), b"short"]):
                raw.send_multipart(frames)
                assert raw.poll(5000)
                kind, hdr = raw.recv_multipart()
                assert kind == b"ERROR" and P.decode_header(kind, hdr).code == "bad_request"
        finally:
            raw.close()
        # and the node still serves
        assert torch.equal(c.infer("probe", torch.ones(1, 4)).outputs, torch.full((1, 4), 2.0))
        c.close()
    finally:
        node.close()


def test_unload_first_with_one_worker_answers_unavailable_not_a_hang(hub, tmp_path) -> None:
    node = start_node(hub, tmp_path, workers=1, swap_policy="unload-first")
    try:
        publish_and_wait(hub, probe_release(2.0, "a", ballast_mb=200))
        codes: list[str] = []
        stop = threading.Event()

        def hammer() -> None:
            with Client(node.address, timeout=10, retries=0) as c:
                while not stop.is_set():
                    try:
                        c.infer("probe", torch.ones(1, 4))
                    except RemoteError as exc:
                        codes.append(exc.code)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            publish_and_wait(hub, probe_release(3.0, "b", ballast_mb=200))
        finally:
            stop.set()
            t.join(20)
        assert codes and set(codes) == {"unavailable"}
        assert ask(node, torch.ones(1, 4)).label == "b"
    finally:
        node.close()


def test_k1_availability_queues_requests_during_the_load(hub, tmp_path) -> None:
    node = start_node(hub, tmp_path, workers=1)
    try:
        publish_and_wait(hub, probe_release(2.0, "a", ballast_mb=100))
        failures: list[BaseException] = []
        stop = threading.Event()
        labels: set[str] = set()

        def loop() -> None:
            with Client(node.address, timeout=20, retries=0) as c:
                while not stop.is_set():
                    try:
                        labels.add(c.infer("probe", torch.ones(1, 4)).label)
                    except BaseException as exc:  # asserted below
                        failures.append(exc)

        t = threading.Thread(target=loop)
        t.start()
        try:
            publish_and_wait(hub, probe_release(3.0, "b", ballast_mb=100))
            time.sleep(0.2)
        finally:
            stop.set()
            t.join(30)
        assert not failures and labels == {"a", "b"}
    finally:
        node.close()


@pytest.mark.cuda
def test_cuda_worker_serves_and_swaps(hub, tmp_path) -> None:
    node = start_node(hub, tmp_path, workers=2, devices=["cuda:0"])
    try:
        publish_and_wait(hub, probe_release(2.0, "a"))
        assert torch.equal(ask(node, torch.ones(1, 4)).outputs, torch.full((1, 4), 2.0))
        publish_and_wait(hub, probe_release(3.0, "b"))
        assert ask(node, torch.ones(1, 4)).label == "b"
        assert hub.status().nodes[0].device == "cuda:0"
    finally:
        node.close()
