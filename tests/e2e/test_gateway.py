"""The Open Inference Protocol gateway with real parts: a hub, a node's worker processes (or the
C++ node), the gateway's HTTP and gRPC servers, and NVIDIA's unmodified ``tritonclient`` as the
judge; a hand-written KServe v2 client (urllib, raw sockets) as a second one. Bad input and
faults: each answered with the protocol's status and one line, nothing crashes."""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from tests.helpers import CppNode, built_binary, wait_until
from tests.models import Rows
from zmqmodels import Gateway, Node, build_release, compile_model

pytestmark = pytest.mark.timeout(240)
SCALES = {"v1": 2.0, "v2": 3.0}


def rows_release(label: str):
    return build_release(compile_model(Rows(SCALES[label]), [torch.ones(1, 4), torch.full((2, 4), 0.5)]),
                         "rows", label)


def publish(hub, label: str) -> int:
    m = hub.publish(rows_release(label))
    ok, status = hub.wait_for("rows", m.seq, 1, 120)
    assert ok, status
    return m.seq


def start_node(hub, tmp_path, kind: str = "python", bind: str = "tcp://127.0.0.1:0", workers: int = 2):
    if kind == "cpp":
        binary = built_binary()
        if binary is None:
            pytest.skip("the C++ node is not built: scripts/test builds it first (or run scripts/build_cpp)")
        return CppNode(binary, hub.address, tmp_path / "cache", "--threads", str(workers), models=("rows",))
    return Node(hub.address, ["rows"], bind, cache=tmp_path / "cache", workers=workers).start()


@pytest.fixture
def served(hub, tmp_path, request):
    """A node (Python; ``indirect`` "cpp": the C++ node) serving rows v1 and a gateway in front
    of it: (hub, node, gateway, seq)."""
    node = start_node(hub, tmp_path, getattr(request, "param", "python"))
    seq = publish(hub, "v1")
    with Gateway(node.address, http="127.0.0.1:0", grpc_listen="127.0.0.1:0", poll_s=0.1,
                 max_request_bytes=1 << 20) as gw:
        wait_until(lambda: gw.view.up and not gw.view.ready(), 30, what="the gateway to see the node ready")
        yield hub, node, gw, seq
    node.close()


def clients(gw):
    return (th.InferenceServerClient(f"127.0.0.1:{gw.http_port}"),
            tg.InferenceServerClient(f"127.0.0.1:{gw.grpc_port}"))


def http_input(x, binary=True):
    i = th.InferInput("INPUT__0", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def grpc_input(x):
    i = tg.InferInput("INPUT__0", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def x_rows(n: int = 3, value: float = 1.5) -> np.ndarray:
    return np.full((n, 4), value, dtype=np.float32) + np.arange(n, dtype=np.float32)[:, None]


@pytest.mark.parametrize("kind", ["python", "cpp"])
def test_tritonclient_sees_live_ready_metadata_and_infers_json_binary_and_grpc(hub, tmp_path, kind) -> None:
    node = start_node(hub, tmp_path, kind)
    try:
        with Gateway(node.address, http="127.0.0.1:0", grpc_listen="127.0.0.1:0", poll_s=0.1) as gw:
            h, g = clients(gw)
            wait_until(lambda: gw.view.up, 60, what="the node to answer MODELS")
            # live but not ready: no release yet, and both clients are told so
            assert h.is_server_live() and g.is_server_live()
            assert not h.is_server_ready() and not g.is_server_ready()
            assert not h.is_model_ready("rows") and not g.is_model_ready("rows")
            with pytest.raises(InferenceServerException, match="model rows is not ready"):
                h.get_model_metadata("rows")
            seq = publish(hub, "v1")
            wait_until(lambda: h.is_server_ready() and g.is_model_ready("rows"), 30, what="ready")
            assert g.is_model_ready("rows", str(seq)) and not g.is_model_ready("rows", str(seq + 5))
            assert h.get_server_metadata()["extensions"] == ["binary_tensor_data"]
            meta = h.get_model_metadata("rows")
            assert meta["versions"] == [str(seq)] and meta["platform"] == "pytorch_torchscript"
            assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 4]}]
            assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 4]}]
            gmeta = g.get_model_metadata("rows", as_json=True)
            assert gmeta["inputs"][0] == {"name": "INPUT__0", "datatype": "FP32", "shape": ["-1", "4"]}
            x = x_rows()
            want = x * SCALES["v1"]
            binary = h.infer("rows", [http_input(x)])
            assert np.array_equal(binary.as_numpy("OUTPUT__0"), want)
            assert binary.get_response()["model_version"] == str(seq)
            as_json = h.infer("rows", [http_input(x, binary=False)],
                              outputs=[th.InferRequestedOutput("OUTPUT__0", binary_data=False)])
            assert as_json.get_response()["outputs"][0]["data"] == want.reshape(-1).tolist()
            over_grpc = g.infer("rows", [grpc_input(x)], request_id="q7")
            assert np.array_equal(over_grpc.as_numpy("OUTPUT__0"), want)
            assert over_grpc.get_response().id == "q7"
    finally:
        node.close()


def test_a_pinned_version_an_unknown_model_and_a_wrong_shape_show_the_nodes_reasons(served) -> None:
    hub, _node, gw, seq = served
    h, g = clients(gw)
    x = x_rows(2)
    pinned = h.infer("rows", [http_input(x)], model_version=str(seq))
    assert np.array_equal(pinned.as_numpy("OUTPUT__0"), x * 2)
    assert g.infer("rows", [grpc_input(x)], model_version=str(seq)).get_response().model_version == str(seq)
    with pytest.raises(InferenceServerException, match=f"rows seq {seq + 7} is not served") as err:
        h.infer("rows", [http_input(x)], model_version=str(seq + 7))
    assert err.value.status() == "404"
    with pytest.raises(InferenceServerException, match="not served") as err:
        g.infer("rows", [grpc_input(x)], model_version=str(seq + 7))
    assert err.value.status() == "StatusCode.NOT_FOUND"
    for call in (lambda: h.infer("nope", [http_input(x)]), lambda: g.infer("nope", [grpc_input(x)])):
        with pytest.raises(InferenceServerException, match="nope"):
            call()
    wrong = np.zeros((2, 5), np.float32)
    with pytest.raises(InferenceServerException, match=r"expected float32 \[\*, 4\], got float32 \[2, 5\]") \
            as err:
        h.infer("rows", [http_input(wrong)])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match=r"got float32 \[2, 5\]") as err:
        g.infer("rows", [grpc_input(wrong)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    raising = x_rows(2)
    raising[1, 0] = -1.0  # Rows raises on it: the model's own line comes back as a 500
    with pytest.raises(InferenceServerException, match="a row asked to fail") as err:
        h.infer("rows", [http_input(raising)])
    assert err.value.status() == "500"
    assert np.array_equal(h.infer("rows", [http_input(x)]).as_numpy("OUTPUT__0"), x * 2)  # still serving


@pytest.mark.parametrize("served", ["python", "cpp"], indirect=True)
def test_a_swap_under_four_tritonclient_threads_fails_nothing_and_never_steps_back(served) -> None:
    hub, _node, gw, seq1 = served
    stop, errors, seen, latest = threading.Event(), [], {}, {}

    def loop(k: int, use_grpc: bool) -> None:
        h, g = clients(gw)
        mine, i = [], 0
        while not stop.is_set():
            x = x_rows(1 + i % 3, value=float(k + i % 7))
            i += 1
            try:
                if use_grpc:
                    r = g.infer("rows", [grpc_input(x)])
                    out, version = r.as_numpy("OUTPUT__0"), int(r.get_response().model_version)
                else:
                    r = h.infer("rows", [http_input(x)])
                    out, version = r.as_numpy("OUTPUT__0"), int(r.get_response()["model_version"])
                scale = SCALES["v1"] if version == seq1 else SCALES["v2"]
                if not np.array_equal(out, x * scale):
                    errors.append(f"thread {k}: wrong output for version {version}")
                mine.append(version)
                latest[k] = version
            except Exception as exc:  # every failure counts, whatever its kind
                errors.append(f"thread {k}: {exc}")
        seen[k] = mine

    threads = [threading.Thread(target=loop, args=(k, k % 2 == 1)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(latest) == 4, 30, what="every thread answered")
        seq2 = publish(hub, "v2")
        wait_until(lambda: all(latest[k] == seq2 for k in range(4)), 60, what="every thread on v2")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert all(seen[k] for k in range(4)), {k: len(v) for k, v in seen.items()}
    versions = [v for k in range(4) for v in seen[k]]
    assert {seq1, seq2} <= set(versions), set(versions)
    for k in range(4):
        assert seen[k] == sorted(seen[k]), f"thread {k} was answered by an older version after a newer one"


# -- a hand-written KServe v2 client ---------------------------------------------------------------
def http(gw, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{gw.http_port}{path}", data=body, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_a_hand_written_v2_client_from_the_published_spec(served) -> None:
    _hub, _node, gw, seq = served
    assert http(gw, "GET", "/v2/health/live")[0] == 200
    assert http(gw, "GET", "/v2/health/ready")[0] == 200
    assert http(gw, "GET", "/v2/models/rows/ready")[0] == 200
    assert http(gw, "GET", f"/v2/models/rows/versions/{seq}/ready")[0] == 200
    status, _, meta = http(gw, "GET", "/v2/models/rows")
    assert status == 200 and json.loads(meta)["inputs"][0]["shape"] == [-1, 4]
    request = {"id": "42", "inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32",
                                       "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}]}
    status, headers, out = http(gw, "POST", "/v2/models/rows/infer", json.dumps(request).encode(),
                                {"Content-Type": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(out)
    assert doc == {"model_name": "rows", "model_version": str(seq), "id": "42",
                   "outputs": [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [2, 4],
                                "data": [2.0 * v for v in range(1, 9)]}]}
    # the binary tensor data extension, by hand
    x = x_rows(2)
    head = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [2, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "OUTPUT__0", "parameters": {"binary_data": True}}]}).encode()
    status, headers, out = http(gw, "POST", f"/v2/models/rows/versions/{seq}/infer", head + x.tobytes(),
                                {"Inference-Header-Content-Length": str(len(head))})
    assert status == 200
    n = int(headers["inference-header-content-length"])
    assert json.loads(out[:n])["outputs"][0]["parameters"] == {"binary_data_size": x.nbytes}
    assert np.array_equal(np.frombuffer(out[n:], "<f4").reshape(2, 4), x * 2)


def one_input(datatype="FP32", shape=(1, 4), **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "INPUT__0", "shape": list(shape), "datatype": datatype,
                                   **extra}]}).encode()


BAD = [
    ("POST", "/v2/models/rows/infer", b"{\"inputs\": [", {}, 400, "malformed inference request"),
    ("POST", "/v2/models/rows/infer", one_input("FLOAT32", data=[1, 2, 3, 4]), {}, 400,
     "'FLOAT32' is not a v2 datatype"),
    ("POST", "/v2/models/rows/infer", one_input(shape=(2, 4), data=[1, 2, 3, 4]), {}, 400,
     "shape [2, 4] holds 8 elements, 'data' has 4"),
    ("POST", "/v2/models/rows/infer", one_input(parameters={"binary_data_size": 16}) + b"\0" * 8,
     {"Inference-Header-Content-Length": "-"}, 400, "not a number"),
    ("POST", "/v2/models/nope/infer", json.dumps({"inputs": []}).encode(), {}, 404, "nope"),
    ("GET", "/v2/models/rows/versions/99", None, {}, 404, "version 99 is not served here"),
    ("GET", "/v2/models/rows/versions/x/ready", None, {}, 400, "positive integer"),
    ("GET", "/v2/models/rows/infer", None, {}, 405, "use POST"),
    ("GET", "/v3/anything", None, {}, 404, "no endpoint"),
]


@pytest.mark.parametrize("method, path, body, headers, status, why", BAD, ids=[b[-1][:20] for b in BAD])
def test_bad_requests_get_the_protocols_status_and_one_line(served, method, path, body, headers, status,
                                                            why) -> None:
    _hub, _node, gw, _seq = served
    got, _, out = http(gw, method, path, body, headers)
    assert got == status, out
    message = json.loads(out)["error"]
    assert why in message and "\n" not in message


def test_binary_data_past_the_body_and_after_the_last_input_are_refused(served) -> None:
    _hub, _node, gw, _seq = served
    head = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    hdr = {"Inference-Header-Content-Length": str(len(head))}
    status, _, out = http(gw, "POST", "/v2/models/rows/infer", head + b"\0" * 8, hdr)
    assert status == 400 and "runs past the 8 bytes after the JSON header" in json.loads(out)["error"]
    status, _, out = http(gw, "POST", "/v2/models/rows/infer", head + b"\0" * 20, hdr)
    assert status == 400 and "4 bytes of binary data after the last input" in json.loads(out)["error"]


def raw_http(gw, data: bytes, read: bool = True, timeout: float = 20.0) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        out = b""
        while b"\r\n\r\n" not in out or len(out) < out.index(b"\r\n\r\n") + 4 + _length(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def _length(out: bytes) -> int:
    for line in out.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_an_oversized_body_is_refused_before_it_is_sent_and_a_vanishing_client_harms_nothing(served) -> None:
    _hub, _node, gw, _seq = served
    # announced at 64 MiB against a 1 MiB limit: the 413 comes back with not one body byte sent
    out = raw_http(gw, b"POST /v2/models/rows/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413") and b"over the node's limit of 1048576 bytes" in out
    # chunked, no length: refused as soon as the chunks pass the limit
    chunk = b"%x\r\n%s\r\n" % (1 << 19, b"x" * (1 << 19))
    out = raw_http(gw, b"POST /v2/models/rows/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + chunk * 3)
    assert out.startswith(b"HTTP/1.1 413")
    # clients that leave mid-body and right after a whole request
    raw_http(gw, b"POST /v2/models/rows/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"inp",
             read=False)
    body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 4], "datatype": "FP32",
                                   "data": [1, 2, 3, 4]}]}).encode()
    for _ in range(20):
        raw_http(gw, b"POST /v2/models/rows/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body), read=False)
    h, _ = clients(gw)
    assert np.array_equal(h.infer("rows", [http_input(x_rows(1))]).as_numpy("OUTPUT__0"), x_rows(1) * 2)


def test_fuzzed_bodies_over_http_get_4xx_and_the_gateway_and_node_keep_serving(served) -> None:
    _hub, _node, gw, _seq = served
    rng = random.Random(7)
    good = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    for i in range(150):
        body = bytearray(good + bytes(16))
        for _ in range(rng.randint(1, 6)):  # flip, cut or insert bytes
            at = rng.randrange(len(body))
            op = rng.random()
            if op < 0.5:
                body[at] = rng.randrange(256)
            elif op < 0.75:
                del body[at:at + rng.randint(1, 8)]
            else:
                body[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        head = {"Inference-Header-Content-Length": str(min(len(good), len(body)))} if i % 2 else {}
        status, _, out = http(gw, "POST", "/v2/models/rows/infer", bytes(body), head)
        if status != 200:
            assert 400 <= status < 500, (status, out)
            assert json.loads(out)["error"]
    h, g = clients(gw)
    x = x_rows(2)
    assert np.array_equal(h.infer("rows", [http_input(x)]).as_numpy("OUTPUT__0"), x * 2)
    assert np.array_equal(g.infer("rows", [grpc_input(x)]).as_numpy("OUTPUT__0"), x * 2)


def test_a_grpc_message_over_the_limit_is_refused_by_grpc(served) -> None:
    _hub, _node, gw, _seq = served
    _, g = clients(gw)
    big = np.zeros((1 << 17, 4), np.float32)  # 2 MiB: over the gateway's 1 MiB
    with pytest.raises(InferenceServerException) as err:
        g.infer("rows", [grpc_input(big)])
    assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert g.infer("rows", [grpc_input(x_rows(1))]).as_numpy("OUTPUT__0") is not None


def test_a_gateway_whose_node_is_down_answers_503_with_the_reason_and_recovers(hub, tmp_path,
                                                                              short_tmp) -> None:
    bind = f"ipc://{short_tmp}/node"
    node = start_node(hub, tmp_path, bind=bind, workers=1)
    seq = publish(hub, "v1")
    with Gateway(bind, http="127.0.0.1:0", grpc_listen="127.0.0.1:0", poll_s=0.1, down_after_s=1.0) as gw:
        h, g = clients(gw)
        wait_until(lambda: h.is_server_ready(), 30, what="ready")
        node.close()
        wait_until(lambda: not gw.view.up, 10, what="the gateway to see the node gone")
        status, _, out = http(gw, "GET", "/v2/health/ready")
        assert status == 503 and f"node {bind} is not answering" in json.loads(out)["error"]
        assert http(gw, "GET", "/v2/health/live")[0] == 200  # the gateway itself is alive
        with pytest.raises(InferenceServerException, match="is not answering") as err:
            h.infer("rows", [http_input(x_rows(1))])
        assert err.value.status() == "503"
        with pytest.raises(InferenceServerException, match="is not answering") as err:
            g.infer("rows", [grpc_input(x_rows(1))])
        assert err.value.status() == "StatusCode.UNAVAILABLE"
        assert not g.is_server_ready()
        node = start_node(hub, tmp_path, bind=bind, workers=1)  # back, from its cache
        try:
            wait_until(lambda: h.is_server_ready(), 60, interval=0.1, what="the node back")
            r = h.infer("rows", [http_input(x_rows(1))])
            assert r.get_response()["model_version"] == str(seq)
        finally:
            node.close()


def test_the_cli_serve_http_grpc_and_the_gateway_command(hub, tmp_path) -> None:
    import subprocess
    import sys

    from tests.helpers import free_port

    node_port, http_port, grpc_port, gw_port = free_port(), free_port(), free_port(), free_port()
    seq = hub.publish(rows_release("v1")).seq
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / "serve.log", tmp_path / "gateway.log"]
    serve_cmd = ["serve", "--hub", hub.address, "--model", "rows", "--bind", f"tcp://127.0.0.1:{node_port}",
                 "--workers", "1", "--cache", str(tmp_path / "cache"), "--http", f"127.0.0.1:{http_port}",
                 "--grpc", f"127.0.0.1:{grpc_port}"]
    gateway_cmd = ["gateway", "--node", f"tcp://127.0.0.1:{node_port}", "--http", f"127.0.0.1:{gw_port}"]
    procs = []
    for cmd, log in zip((serve_cmd, gateway_cmd), logs, strict=True):
        with open(log, "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "zmqmodels", *cmd], stderr=err, env=env))
    serve, gateway = procs
    try:
        for port in (http_port, gw_port):
            h = th.InferenceServerClient(f"127.0.0.1:{port}")

            def ready(h=h) -> bool:
                try:
                    return h.is_server_ready()
                except Exception:  # not listening yet
                    return False

            wait_until(ready, 90, interval=0.2, what=f"port {port} ready")
            r = h.infer("rows", [http_input(x_rows(2))])
            assert r.get_response()["model_version"] == str(seq)
        g = tg.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert np.array_equal(g.infer("rows", [grpc_input(x_rows(1))]).as_numpy("OUTPUT__0"), x_rows(1) * 2)
    finally:
        for p in (gateway, serve):
            p.terminate()
        codes = [p.wait(30) for p in (gateway, serve)]
    err = logs[1].read_text()
    assert codes == [0, 0], (codes, err, logs[0].read_text()[-2000:])
    assert f"Open Inference Protocol (KServe v2) for tcp://127.0.0.1:{node_port} on HTTP :{gw_port}" in err


def test_an_inference_gets_504_once_the_gateways_timeout_has_passed_in_all(hub, tmp_path) -> None:
    """--timeout is end to end: the attempts the gateway makes are inside it, not each given it."""
    node = start_node(hub, tmp_path, workers=1)
    try:
        publish(hub, "v1")
        with Gateway(node.address, http="127.0.0.1:0", poll_s=0.1, timeout=0.5) as gw:
            wait_until(lambda: gw.view.up and not gw.view.ready(), 30, what="ready")
            slow = x_rows(1)
            slow[0, 0] = -2.0  # Rows spins for about a second on it
            t0 = time.monotonic()
            status, _, out = http(gw, "POST", "/v2/models/rows/infer", one_input(data=slow.tolist()))
            took = time.monotonic() - t0
            assert status == 504 and "within 0.5s" in json.loads(out)["error"]
            assert took < 1.4, f"answered after {took:.2f}s: the timeout was given to each attempt"
    finally:
        node.close()
