"""What Triton's users drive load and read state with, through both ways the gateway runs
(``serve --http/--grpc``: a child process of the node over ipc; ``zmqmodels gateway``: a process
of its own over TCP), judged by NVIDIA's unmodified ``tritonclient``: async and streaming calls
with hundreds in flight, a swap under 64 in flight, the model configuration, statistics and
repository index, the gateway's metrics, and a bad port said in one line (issue 31)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th

from tests.e2e.test_gateway import SCALES, grpc_input, http_input, rows_release
from tests.helpers import alive, free_port, scrape, wait_until

pytestmark = pytest.mark.timeout(300)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class Served:
    """A node serving rows v1 and a gateway in front of it, all ``zmqmodels`` processes."""

    def __init__(self, hub, tmp_path: Path, way: str, metrics: bool = False) -> None:
        self.hub, self.way, self.procs = hub, way, []
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port() if metrics else 0
        node_port = free_port()
        self.seq = hub.publish(rows_release("v1")).seq
        listen = ["--http", f"127.0.0.1:{self.http}", "--grpc", f"127.0.0.1:{self.grpc}"]
        serve = ["serve", "--hub", hub.address, "--model", "rows", "--bind", f"tcp://127.0.0.1:{node_port}",
                 "--workers", "2", "--cache", str(tmp_path / "cache")]
        if way == "serve":
            serve += listen
        self.logs = [tmp_path / "serve.log", tmp_path / "gateway.log"]
        self._start(serve, self.logs[0])
        if way == "gateway":
            self._start(["gateway", "--node", f"tcp://127.0.0.1:{node_port}", *listen,
                         *(["--metrics", f"127.0.0.1:{self.metrics}"] if metrics else [])], self.logs[1])
        self.h = th.InferenceServerClient(f"127.0.0.1:{self.http}", concurrency=32)
        self.g = tg.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        try:
            wait_until(self.ready, 120, interval=0.2, what="the gateway ready")
        except BaseException:
            self.close()  # nothing outlives the test
            raise

    def _start(self, args: list[str], log: Path) -> None:
        with open(log, "w") as err:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "zmqmodels", *args], stderr=err,
                                               env=ENV))

    def ready(self) -> bool:
        try:
            return self.h.is_server_ready() and self.g.is_model_ready("rows")
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(params=["serve", "gateway"])
def served(hub, tmp_path, request):
    s = Served(hub, tmp_path, request.param)
    yield s
    s.close()


def x_of(k: int) -> np.ndarray:
    return np.full((1, 4), float(k), dtype=np.float32)


def test_async_and_streaming_calls_with_hundreds_in_flight_all_come_back_right(served) -> None:
    """tritonclient's gRPC async_infer never called back through either gateway (20 had not
    after 6 s; 400 hung for 10 minutes); ModelStreamInfer was UNIMPLEMENTED."""
    n, got, lock, done = 300, {}, threading.Lock(), threading.Event()

    def callback(k: int):
        def cb(result, error) -> None:
            with lock:
                got[k] = error if error is not None else result.as_numpy("OUTPUT__0")
                if len(got) == n:
                    done.set()
        return cb

    for k in range(n):
        served.g.async_infer("rows", [grpc_input(x_of(k))], callback=callback(k), client_timeout=60)
    assert done.wait(90), f"{len(got)} of {n} async gRPC calls came back"
    assert all(np.array_equal(got[k], x_of(k) * SCALES["v1"]) for k in range(n)), \
        [got[k] for k in range(n) if not isinstance(got[k], np.ndarray)][:3]

    stream, sdone = {}, threading.Event()

    def on_stream(result, error) -> None:
        with lock:
            if error is not None:
                stream[f"error {len(stream)}"] = error
            else:
                stream[result.get_response().id] = result.as_numpy("OUTPUT__0")
            if len(stream) == 200:
                sdone.set()

    served.g.start_stream(callback=on_stream)
    try:
        for k in range(200):
            served.g.async_stream_infer("rows", [grpc_input(x_of(k))], request_id=str(k))
        assert sdone.wait(90), f"{len(stream)} of 200 streamed answers came back"
    finally:
        served.g.stop_stream()
    assert all(np.array_equal(stream[str(k)], x_of(k) * SCALES["v1"]) for k in range(200)), \
        [v for k, v in stream.items() if k.startswith("error")][:3]

    pending = [served.h.async_infer("rows", [http_input(x_of(k))]) for k in range(200)]
    outs = [p.get_result(timeout=90).as_numpy("OUTPUT__0") for p in pending]
    assert all(np.array_equal(o, x_of(k) * SCALES["v1"]) for k, o in enumerate(outs))


def test_64_in_flight_through_a_swap_fail_nothing_step_back_never_and_match_eager(served) -> None:
    """Issue 31's end-to-end bar, on both ways the gateway runs: 64 logical clients, each
    sending its next request when its last came back (async gRPC), through a publish."""
    per_slot: dict[int, list[int]] = {k: [] for k in range(64)}
    errors, wrong, lock = [], [], threading.Lock()
    stop_at = [time.monotonic() + 600]
    v2_seen, finished = threading.Event(), threading.Semaphore(0)

    def send(k: int) -> None:
        x = x_of(k + len(per_slot[k]))
        def cb(result, error) -> None:
            with lock:
                if error is not None:
                    errors.append(str(error))
                else:
                    seq = int(result.get_response().model_version)
                    scale = SCALES["v1"] if seq == served.seq else SCALES["v2"]
                    if not np.array_equal(result.as_numpy("OUTPUT__0"), x * scale):
                        wrong.append((seq, x.tolist()))
                    per_slot[k].append(seq)
                    if seq != served.seq:
                        v2_seen.set()
            if time.monotonic() < stop_at[0] and error is None:
                send(k)
            else:
                finished.release()
        served.g.async_infer("rows", [grpc_input(x)], callback=cb, client_timeout=60)

    for k in range(64):
        send(k)
    time.sleep(1.0)
    seq2 = served.hub.publish(rows_release("v2")).seq
    assert v2_seen.wait(120), "no reply from v2 within 120 s"
    time.sleep(1.0)
    stop_at[0] = 0.0
    for _ in range(64):
        assert finished.acquire(timeout=60)
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    for k, seqs in per_slot.items():
        assert seqs == sorted(seqs), f"client {k} stepped back: {seqs}"
        assert set(seqs) <= {served.seq, seq2}
    assert sum(len(s) for s in per_slot.values()) > 64 * 3


def test_triton_tools_read_the_config_statistics_and_repository_index(served) -> None:
    """/v2/models/NAME/config (get_model_config, which perf_analyzer needs), /stats,
    /v2/repository/index and gRPC ModelConfig were missing (404 / UNIMPLEMENTED)."""
    h, g, seq = served.h, served.g, served.seq
    config = h.get_model_config("rows")
    assert config["name"] == "rows" and config["max_batch_size"] >= 2
    assert config["input"] == [{"name": "INPUT__0", "data_type": "TYPE_FP32", "dims": [4]}]
    assert config["output"] == [{"name": "OUTPUT__0", "data_type": "TYPE_FP32", "dims": [4]}]
    gconfig = g.get_model_config("rows", as_json=True)["config"]
    assert gconfig["max_batch_size"] == config["max_batch_size"]
    assert gconfig["input"][0]["data_type"] == "TYPE_FP32" and gconfig["input"][0]["dims"] == ["4"]

    for k in range(7):
        h.infer("rows", [http_input(x_of(k))])
    for k in range(5):
        g.infer("rows", [grpc_input(x_of(k))])
    stats = h.get_inference_statistics("rows")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("rows", str(seq))]
    s = stats[0]
    assert s["inference_count"] == 12 and s["inference_stats"]["success"]["count"] == 12
    assert s["inference_stats"]["success"]["ns"] > 0 and s["inference_stats"]["queue"]["count"] == 12
    assert sum(b["compute_infer"]["count"] for b in s["batch_stats"]) == 12
    gstats = g.get_inference_statistics("rows", str(seq), as_json=True)["model_stats"][0]
    assert int(gstats["inference_count"]) == 12
    with pytest.raises(Exception, match="unknown model"):
        h.get_inference_statistics("nope")

    assert h.get_model_repository_index() == [{"name": "rows", "version": str(seq), "state": "READY",
                                               "reason": ""}]
    gindex = g.get_model_repository_index(as_json=True)["models"]
    assert gindex == [{"name": "rows", "version": str(seq), "state": "READY"}]


def test_the_gateway_has_metrics_with_bounded_labels(hub, tmp_path) -> None:
    """`zmqmodels gateway` had no --metrics (/metrics was 404)."""
    s = Served(hub, tmp_path, "gateway", metrics=True)
    try:
        for k in range(4):
            s.g.infer("rows", [grpc_input(x_of(k))])
        s.h.infer("rows", [http_input(x_of(1))])
        with pytest.raises(Exception, match="expected"):
            s.g.infer("rows", [grpc_input(np.ones((1, 5), np.float32))])
        m = scrape(s.metrics)
        assert m["zmqmodels_gateway_requests_total{model=rows,protocol=grpc,status=ok}"] == 4
        assert m["zmqmodels_gateway_requests_total{model=rows,protocol=http,status=ok}"] == 1
        assert m["zmqmodels_gateway_requests_total{model=rows,protocol=grpc,status=invalid_argument}"] == 1
        assert m["zmqmodels_gateway_request_seconds_count{protocol=grpc}"] == 5
        assert list(v for k, v in m.items() if k.startswith("zmqmodels_gateway_node_up")) == [1.0]
    finally:
        s.close()


@pytest.mark.parametrize("how", ["gateway", "serve"])
def test_a_grpc_port_in_use_is_one_line_and_nothing_else(hub, tmp_path, how) -> None:
    """A bad gRPC port printed gRPC's C log line (E1204 ... add_port.cc:83) and a dangling
    'Exception in thread' after the one-line error."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["gateway", "--node", "tcp://127.0.0.1:9"] if how == "gateway" else \
            ["serve", "--model", "rows", "--bind", f"tcp://127.0.0.1:{free_port()}", "--workers", "1",
             "--cache", str(tmp_path / "cache")]
        p = subprocess.run([sys.executable, "-m", "zmqmodels", *args, "--grpc", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=120, env=ENV)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and " zmqmodels." not in ln]  # log lines
    assert p.returncode != 0
    why = f"--grpc 127.0.0.1:{port}: cannot listen: Address already in use"
    said = "gateway failed to start" if how == "gateway" else "the gateway did not start"
    assert lines == [f"error: {said}: {why}"], p.stderr
    for noise in ("add_port", "Exception in thread", "Traceback"):
        assert noise not in p.stderr


def _gateway_children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if b"gateway" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_serve_runs_its_gateway_in_a_process_of_its_own_and_restarts_it(hub, tmp_path) -> None:
    """`serve --http/--grpc` ran the gateway on a thread of the node's front, sharing its GIL."""
    s = Served(hub, tmp_path, "serve")
    try:
        serve = s.procs[0].pid
        first = _gateway_children(serve)
        assert len(first) == 1, first
        os.kill(first[0], signal.SIGKILL)
        wait_until(lambda: (k := _gateway_children(serve)) and k != first and s.ready(), 90, interval=0.2,
                   what="the gateway restarted and ready")
        assert np.array_equal(s.g.infer("rows", [grpc_input(x_of(3))]).as_numpy("OUTPUT__0"), x_of(3) * 2)
        (gateway,) = _gateway_children(serve)
        os.kill(serve, signal.SIGKILL)  # nothing left holding the node's ports
        wait_until(lambda: not alive(gateway), 30, what="the gateway to stop with its node")
    finally:
        s.close()
    assert "the gateway exited" in s.logs[0].read_text()
