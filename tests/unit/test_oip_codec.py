"""The Open Inference Protocol codec on its own (no sockets): v2 HTTP JSON and binary bodies,
gRPC requests, outputs and metadata; every bad input one ``V2Error`` with a status and one
line, fuzzed with hypothesis."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqmodels import protocol as P
from zmqmodels.oip import codec
from zmqmodels.oip.codec import V2Error
from zmqmodels.oip.pb import message


def body(inputs, **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def bin_in(nbytes, name="INPUT__0", shape=(2, 3), datatype="FP32"):
    return {"name": name, "shape": list(shape), "datatype": datatype,
            "parameters": {"binary_data_size": nbytes}}


def x_json(shape=(2, 3), datatype="FP32", data=None):
    n = int(np.prod(shape))
    return {"name": "INPUT__0", "shape": list(shape), "datatype": datatype,
            "data": list(range(n)) if data is None else data}


def test_json_inputs_become_the_tensors_of_an_infer_in_positional_order() -> None:
    second = {"name": "INPUT__1", "shape": [2], "datatype": "INT64", "data": [[7], [8]]}
    call = codec.parse_http(body([second, x_json()], id="r1"), "m", "4", None)
    assert (call.model, call.seq, call.id) == ("m", 4, "r1")
    spec, bufs = call.spec()
    assert [i["dtype"] for i in spec["items"]] == ["float32", "int64"]
    assert np.frombuffer(bufs[0], "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    assert np.frombuffer(bufs[1], "<i8").tolist() == [7, 8]


def test_binary_inputs_are_taken_in_order_after_the_json_header_without_a_copy() -> None:
    a, b = np.arange(6, dtype="<f4"), np.array([1, 0, 1], dtype=bool)
    head = body([bin_in(24, shape=[2, 3]), bin_in(3, name="INPUT__1", shape=[3], datatype="BOOL")],
                parameters={"binary_data_output": True})
    call = codec.parse_http(head + a.tobytes() + b.tobytes(), "m", None, len(head))
    assert isinstance(call.inputs[0].data, memoryview)
    assert bytes(call.inputs[0].data) == a.tobytes() and bytes(call.inputs[1].data) == b.tobytes()
    assert call.binary == {"*"}


BAD_HTTP = [
    (b"{not json", None, "malformed inference request"),
    (body([x_json(datatype="FLOAT")]), None, "'FLOAT' is not a v2 datatype"),
    (body([x_json(datatype="UINT32")]), None, "'UINT32' is not carried by zmqmodels"),
    (body([x_json(datatype="BYTES", data=["a"] * 6)]), None, "'BYTES' is not carried"),
    (body([x_json(data=[1, 2, 3])]), None, "shape [2, 3] holds 6 elements, 'data' has 3"),
    (body([x_json(data=["a"] * 6)]), None, "'data' holds strings, not values of FP32"),
    (body([x_json(data=[[1, 2], [3]])]), None, "not a regular array"),
    (body([x_json(datatype="INT8", data=[300] * 6)]), None, "out of range for INT8"),
    (body([{**x_json(), "name": "x"}]), None, "inputs are INPUT__0..INPUT__0"),
    (body([x_json(), x_json()]), None, "INPUT__0 given twice"),
    (body([{**x_json(), "shape": [-1, 3]}]), None, "bad shape"),
    (body([{k: v for k, v in x_json().items() if k != "data"}]), None, "no 'data'"),
    (body([bin_in(24)]) + b"\0" * 8, 0, "malformed"),
    (body([bin_in(24)]), None, "runs past the 0 bytes after the JSON header"),
    (body([bin_in(20)]), -20, "needs 24 bytes, got 20"),
    (body([bin_in("24")]), None, "binary_data_size must be a non-negative integer"),
    (body([x_json()]), 10_000, "Inference-Header-Content-Length 10000 but the body has"),
]


@pytest.mark.parametrize("raw, header, why", BAD_HTTP, ids=[w[:24] for _, _, w in BAD_HTTP])
def test_a_bad_http_request_is_a_400_with_one_line_naming_the_fault(raw, header, why) -> None:
    if header is not None and header < 0:  # binary data shorter than the header says
        raw, header = raw + b"\0" * -header, len(raw)
    with pytest.raises(V2Error) as err:
        codec.parse_http(raw, "m", None, header)
    assert err.value.status == 400 and err.value.grpc == "INVALID_ARGUMENT"
    assert why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("version", ["x", "0", "-1", "1.5"])
def test_a_version_is_a_positive_seq(version) -> None:
    with pytest.raises(V2Error, match="positive integer"):
        codec.parse_http(body([x_json()]), "m", version, None)


def reply(outputs) -> P.InferReply:
    return P.InferReply("r", "m", "v2", 7, "w0", outputs)


def test_outputs_json_binary_and_by_name() -> None:
    spec = {"t": "dict", "keys": ["logits", "n"],
            "items": [{"t": "tensor", "dtype": "float16", "shape": [1, 2], "f": 0}, {"t": "int", "v": 3}]}
    frames = [np.array([[1.5, -2]], "<f2").tobytes()]
    call = codec.parse_http(body([x_json()], id="q", outputs=[{"name": "n"},
                                 {"name": "logits", "parameters": {"binary_data": True}}]), "m", None, None)
    out, head = codec.http_response(call, reply(spec), frames)
    doc = json.loads(out[:head])
    assert doc["model_version"] == "7" and doc["id"] == "q"
    assert doc["outputs"][0] == {"name": "n", "datatype": "INT64", "shape": [], "data": [3]}
    assert doc["outputs"][1]["parameters"] == {"binary_data_size": 4} and out[head:] == frames[0]
    call.outputs = ["nope"]
    with pytest.raises(V2Error, match="'nope' is not an output of this model"):
        codec.http_response(call, reply(spec), frames)


def test_an_output_with_no_tensor_form_is_a_500_that_says_so() -> None:
    call = codec.parse_http(body([x_json()]), "m", None, None)
    with pytest.raises(V2Error, match="a str has no v2 tensor form") as err:
        codec.http_response(call, reply({"t": "tuple", "items": [{"t": "str", "v": "x"}]}), [])
    assert err.value.status == 500


def test_bfloat16_travels_as_bf16_and_reads_back_as_floats() -> None:
    call = codec.parse_http(body([x_json(shape=(3,), datatype="BF16", data=[1.0, -2.5, 3.140625])]),
                            "m", None, None)
    raw = call.inputs[0].data
    assert np.frombuffer(raw, "<u2").tolist() == [0x3F80, 0xC020, 0x4049]
    spec = {"t": "tensor", "dtype": "bfloat16", "shape": [3], "f": 0}
    out, _ = codec.http_response(call, reply(spec), [raw])
    assert json.loads(out)["outputs"][0]["data"] == [1.0, -2.5, 3.140625]


def test_grpc_requests_raw_and_typed_contents() -> None:
    req = message("ModelInferRequest")(model_name="m", model_version="2", id="g")
    t = req.inputs.add(name="INPUT__0", datatype="INT32", shape=[2])
    t.contents.int_contents.extend([5, -6])
    call = codec.parse_grpc(req)
    assert call.seq == 2 and np.frombuffer(call.inputs[0].data, "<i4").tolist() == [5, -6]
    req.raw_input_contents.append(b"\0" * 7)
    with pytest.raises(V2Error, match="needs 8 bytes, got 7"):
        codec.parse_grpc(req)
    req.raw_input_contents.append(b"")
    with pytest.raises(V2Error, match="2 raw_input_contents for 1 inputs"):
        codec.parse_grpc(req)


def test_node_error_codes_map_to_protocol_statuses() -> None:
    unknown = codec.error_for("unknown_model", "x")
    assert (unknown.status, unknown.grpc) == (404, "NOT_FOUND")
    assert codec.error_for("bad_input", "x").status == 400
    assert codec.error_for("too_large", "x").status == 413
    assert codec.error_for("model_error", "x").status == 500
    for code in ("unavailable", "worker_lost", "not_ready"):
        assert codec.error_for(code, "x").grpc == "UNAVAILABLE"


def served(*versions: P.ServedVersion) -> P.ModelsReply:
    return P.ModelsReply("n", [P.ServedModel("m", list(versions)), P.ServedModel("idle")])


def test_metadata_comes_from_the_manifest_and_readiness_from_what_workers_hold() -> None:
    sig = [{"dtype": "float32", "rank": 2, "shape": [1, 4]}, {"dtype": "int64", "rank": 1, "shape": [-1]}]
    out = {"t": "tuple", "items": [{"t": "tensor", "dtype": "float32", "shape": [1, 10]}]}
    models = served(P.ServedVersion(3, "a", 0, 1, sig, out), P.ServedVersion(4, "b", 2, 16, sig, out))
    meta = codec.model_metadata(models, "m", 0)
    assert meta["versions"] == ["4"] and meta["platform"] == "pytorch_torchscript"
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "INPUT__1", "datatype": "INT64", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "OUTPUT__0", "datatype": "FP32", "shape": [-1, 10]}]
    with pytest.raises(V2Error, match="version 3 is not served here") as err:
        codec.find_version(models, "m", 3)  # listed, but no worker holds it
    assert err.value.status == 404
    with pytest.raises(V2Error, match="model idle is not ready") as err:
        codec.find_version(models, "idle", 0)
    assert err.value.status == 503
    with pytest.raises(V2Error, match="unknown model 'x': this node serves m, idle"):
        codec.find_version(models, "x", 0)


# -- fuzz: nothing but a V2Error (or a Call) comes out of any body --------------------------------
_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
_json_values = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4)
                            | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
_sizes = st.fixed_dictionaries({"binary_data_size": st.integers(-4, 64) | st.text(max_size=3)})
_datatypes = st.sampled_from([*codec.DATATYPES, "UINT64", "BYTES", "F32", ""])
_input = st.fixed_dictionaries({"name": st.sampled_from(["INPUT__0", "INPUT__1", "x", ""]),
                                "shape": st.lists(st.integers(-2, 5), max_size=4), "datatype": _datatypes},
                               optional={"data": _json_values, "parameters": _sizes})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(_input, max_size=3), tail=st.binary(max_size=80),
       head=st.one_of(st.none(), st.integers(-5, 400)), junk=st.one_of(st.none(), st.binary(max_size=60)))
def test_fuzzed_http_bodies_give_a_call_or_a_400(inputs, tail, head, junk) -> None:
    raw = junk if junk is not None else msgspec.json.encode({"inputs": inputs})
    if head is not None and junk is None:
        head = len(raw)
        raw += tail
    try:
        call = codec.parse_http(raw, "m", None, head)
    except V2Error as exc:
        assert exc.status == 400 and str(exc) and "\n" not in str(exc)
        return
    sizes = dict(codec.DATATYPES.values())
    for t in call.inputs:
        assert len(t.data) == int(np.prod(t.shape)) * sizes[t.dtype]


def test_gateway_statistics_count_per_version_and_stay_bounded_over_publishes() -> None:
    """Every publish is a new version: the statistics keep the most recently answered ones."""
    from zmqmodels.oip.triton import KEPT_VERSIONS, Statistics

    s = Statistics()
    for seq in range(1, KEPT_VERSIONS + 50):
        for _ in range(2):
            s.answered("m", P.InferReply("i", "m", "", seq, "w", None, 1.5, 2.0, batch=4), 0.001)
    s.failed("m", str(KEPT_VERSIONS + 49), 0.002)
    rows = s.report(None)["model_stats"]
    assert len(rows) == KEPT_VERSIONS
    newest = rows[-1]
    assert newest["version"] == str(KEPT_VERSIONS + 49) and newest["inference_count"] == 2
    assert newest["inference_stats"]["queue"] == {"count": 2, "ns": 3_000_000}
    assert newest["inference_stats"]["fail"]["count"] == 1
    assert newest["batch_stats"] == [{"batch_size": 4, "compute_input": {"count": 0, "ns": 0},
                                      "compute_infer": {"count": 2, "ns": 4_000_000},
                                      "compute_output": {"count": 0, "ns": 0}}]
