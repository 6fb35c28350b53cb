"""The Open Inference Protocol (KServe v2) <-> a node's protocol: parse a v2 request (HTTP JSON,
HTTP with the binary tensor data extension, gRPC) into the tensors of an ``INFER``; turn the
node's ``OK`` or ``ERROR`` and its ``MODELS_REPLY`` into v2 responses and metadata. No I/O and
no torch: every function takes bytes or decoded messages and returns data or raises
:class:`V2Error` (an HTTP status, a gRPC status name and one line).

Naming (as Triton's PyTorch backend does): the positional arguments of ``forward`` are
``INPUT__0``, ``INPUT__1``, ...; the outputs are ``OUTPUT__0``... for a tensor or a tuple/list of
them, or the keys of a dict of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from .. import protocol as P
from ..protocol.codes import Code

__all__ = ["V2Error", "Tensor", "Call", "DATATYPES", "error_for", "parse_http", "http_response",
           "parse_grpc", "outputs_of", "model_metadata", "find_version", "v2_name", "parse_version"]

# v2 datatype -> (wire dtype, item size); numpy dtype per wire dtype (bfloat16: raw uint16)
DATATYPES = {"BOOL": ("bool", 1), "UINT8": ("uint8", 1), "INT8": ("int8", 1), "INT16": ("int16", 2),
             "INT32": ("int32", 4), "INT64": ("int64", 8), "FP16": ("float16", 2), "FP32": ("float32", 4),
             "FP64": ("float64", 8), "BF16": ("bfloat16", 2)}
_V2_NAME = {wire: v2 for v2, (wire, _) in DATATYPES.items()}
_NOT_CARRIED = ("UINT16", "UINT32", "UINT64", "BYTES")
_NP = {"bool": "?", "uint8": "u1", "int8": "i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
       "float16": "<f2", "float32": "<f4", "float64": "<f8", "bfloat16": "<u2"}
_MAX_RANK = 32

# node error code -> (HTTP status, gRPC status name)


class V2Error(Exception):
    """A request answered with an error: ``status`` (HTTP), ``grpc`` (a ``grpc.StatusCode``
    name) and the one-line message."""

    def __init__(self, status: int, grpc: str, message: str) -> None:
        super().__init__(message)
        self.status, self.grpc = status, grpc


def error_for(code: str, message: str) -> V2Error:
    """The v2 error for a node's error ``code`` (its message passed on unchanged)."""
    c = Code.of(code)
    return V2Error(c.http, c.grpc, message)


def bad(message: str) -> V2Error:
    return V2Error(400, "INVALID_ARGUMENT", message)


def v2_name(dtype: str) -> str:
    """The v2 datatype of a wire dtype (``float32`` -> ``FP32``)."""
    return _V2_NAME[dtype]


@dataclass
class Tensor:
    """One input: its wire dtype, shape and raw little-endian bytes."""

    dtype: str
    shape: list[int]
    data: Any  # bytes-like, exactly prod(shape) * itemsize bytes


@dataclass
class Call:
    """A parsed v2 inference request."""

    model: str
    seq: int  # 0: the newest the node serves
    id: str
    inputs: list[Tensor]  # in positional order
    outputs: list[str] | None = None  # the names asked for (None: all)
    binary: set[str] = field(default_factory=set)  # outputs to send as binary data (HTTP)
    binary_default: bool = False  # binary_data_output: every output not named otherwise

    def spec(self) -> tuple[Any, list[Any]]:
        """The ``INFER`` header's ``inputs`` and its tensor frames."""
        items = [{"t": "tensor", "dtype": t.dtype, "shape": t.shape, "f": i}
                 for i, t in enumerate(self.inputs)]
        return {"t": "tuple", "items": items}, [t.data for t in self.inputs]


def parse_version(version: str | None) -> int:
    if not version:
        return 0
    if not version.isdigit() or int(version) < 1:
        raise bad(f"model version {version[:40]!r}: a version is a release's seq, a positive integer")
    return int(version)


def _position(name: str, count: int) -> int:
    if name.startswith("INPUT__") and name[7:].isdigit() and int(name[7:]) < count:
        return int(name[7:])
    raise bad(f"input {name[:64]!r}: inputs are INPUT__0..INPUT__{count - 1}, "
              "the positional arguments of forward")


def _dtype(datatype: str, name: str) -> tuple[str, int]:
    got = DATATYPES.get(datatype)
    if got is None:
        why = "not carried by zmqmodels" if datatype in _NOT_CARRIED else "not a v2 datatype"
        raise bad(f"input {name}: datatype {datatype[:32]!r} is {why} (use one of {', '.join(DATATYPES)})")
    return got


def _elements(shape: list[int], name: str) -> int:
    if len(shape) > _MAX_RANK or any(d < 0 for d in shape):
        raise bad(f"input {name}: bad shape {shape[:8]}")
    return math.prod(shape)


def _ordered(tensors: list[tuple[str, Tensor]]) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(tensors)
    for name, t in tensors:
        at = _position(name, len(tensors))
        if out[at] is not None:
            raise bad(f"input {name} given twice")
        out[at] = t
    return out  # type: ignore[return-value]


# -- HTTP/REST -------------------------------------------------------------------------------
class _In(msgspec.Struct):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class _Out(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = {}


class _Req(msgspec.Struct):
    inputs: list[_In]
    id: str = ""
    parameters: dict[str, Any] = {}
    outputs: list[_Out] | None = None


_REQ = msgspec.json.Decoder(_Req)


def _from_json(data: Any, dtype: str, shape: list[int], name: str) -> bytes:
    """A v2 JSON ``data`` (flat or nested, row-major) as raw bytes of ``dtype``."""
    if data is None:
        raise bad(f"input {name}: no 'data' and no 'binary_data_size' parameter")
    try:
        a = np.asarray(data)
    except ValueError:
        raise bad(f"input {name}: 'data' is not a regular array") from None
    kind = a.dtype.kind
    want = "b" if dtype == "bool" else "f" if dtype.startswith(("float", "bfloat")) else "i"
    if kind not in {"b": "b", "i": "iu", "f": "iuf"}[want] and a.size:
        raise bad(f"input {name}: 'data' holds {a.dtype.name if kind != 'U' else 'strings'}, "
                  f"not values of {_V2_NAME[dtype]}")
    if a.size != math.prod(shape):
        raise bad(f"input {name}: shape {shape} holds {math.prod(shape)} elements, 'data' has {a.size}")
    if want == "i" and a.size:
        info = np.iinfo(np.dtype(_NP[dtype]))
        if a.min() < info.min or a.max() > info.max:
            raise bad(f"input {name}: a value is out of range for {_V2_NAME[dtype]}")
    if dtype == "bfloat16":  # round to nearest even from float32
        u = a.astype("<f4").reshape(-1).view("<u4").astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
    return a.astype(_NP[dtype]).tobytes()


def parse_http(body: bytes, model: str, version: str | None, header_length: int | None) -> Call:
    """A ``POST /v2/models/{model}[/versions/{version}]/infer`` body: JSON, or JSON of
    ``header_length`` bytes (``Inference-Header-Content-Length``) followed by binary data."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise bad(f"Inference-Header-Content-Length {header_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    head = view if header_length is None else view[:header_length]
    try:
        req = _REQ.decode(head)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise bad(f"malformed inference request: {exc}") from None
    binary, at, tensors = view[len(head):], 0, []
    for i in req.inputs:
        dtype, size = _dtype(i.datatype, i.name)
        count = _elements(i.shape, i.name)
        nbytes = i.parameters.get("binary_data_size")
        if nbytes is None:
            data: Any = _from_json(i.data, dtype, i.shape, i.name)
        else:
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise bad(f"input {i.name}: binary_data_size must be a non-negative integer")
            if at + nbytes > len(binary):
                raise bad(f"input {i.name}: binary data [{at}, {at + nbytes}) runs past the "
                          f"{len(binary)} bytes after the JSON header")
            data, at = binary[at:at + nbytes], at + nbytes
        if len(data) != count * size:
            raise bad(f"input {i.name}: shape {i.shape} of {i.datatype} needs {count * size} bytes, "
                      f"got {len(data)}")
        tensors.append((i.name, Tensor(dtype, list(i.shape), data)))
    if at != len(binary):
        raise bad(f"{len(binary) - at} bytes of binary data after the last input's")
    call = Call(model, parse_version(version), req.id, _ordered(tensors),
                binary_default=req.parameters.get("binary_data_output") is True)
    if req.outputs is not None:
        call.outputs = [o.name for o in req.outputs]
        call.binary = {o.name for o in req.outputs if o.parameters.get("binary_data", call.binary_default)}
    elif call.binary_default:
        call.binary = {"*"}
    return call


def _json_data(raw: Any, dtype: str) -> list[Any]:
    if dtype == "bfloat16":
        return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").tolist()
    return np.frombuffer(raw, _NP[dtype]).tolist()


def http_response(call: Call, reply: P.InferReply, frames: list[Any]) -> tuple[bytes, int | None]:
    """The response body for ``call`` and the ``Inference-Header-Content-Length`` to send
    (None: plain JSON)."""
    entries, blobs = [], []
    for name, dtype, shape, raw in outputs_of(reply.outputs, frames, call.outputs):
        e: dict[str, Any] = {"name": name, "datatype": _V2_NAME[dtype], "shape": shape}
        if name in call.binary or ("*" in call.binary):
            e["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            e["data"] = _json_data(raw, dtype)
        entries.append(e)
    head = msgspec.json.encode({"model_name": reply.model, "model_version": str(reply.seq), "id": call.id,
                                "outputs": entries})
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


# -- gRPC --------------------------------------------------------------------------------------
_CONTENTS = {"bool": "bool_contents", "int8": "int_contents", "int16": "int_contents",
             "int32": "int_contents", "int64": "int64_contents", "uint8": "uint_contents",
             "float32": "fp32_contents", "float64": "fp64_contents"}


def parse_grpc(req: Any) -> Call:
    """A ``ModelInferRequest`` (raw_input_contents, or the typed ``contents``)."""
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise bad(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    tensors = []
    for k, i in enumerate(req.inputs):
        dtype, size = _dtype(i.datatype, i.name)
        shape = list(i.shape)
        count = _elements(shape, i.name)
        if raw:
            data: Any = raw[k]
        else:
            field_name = _CONTENTS.get(dtype)
            if field_name is None:
                raise bad(f"input {i.name}: {i.datatype} travels in raw_input_contents only")
            values = getattr(i.contents, field_name)
            if len(values) != count:
                raise bad(f"input {i.name}: shape {shape} holds {count} elements, "
                          f"contents has {len(values)}")
            data = np.asarray(values).astype(_NP[dtype]).tobytes()
        if len(data) != count * size:
            raise bad(f"input {i.name}: shape {shape} of {i.datatype} needs {count * size} bytes, "
                      f"got {len(data)}")
        tensors.append((i.name, Tensor(dtype, shape, data)))
    call = Call(req.model_name, parse_version(req.model_version), req.id, _ordered(tensors))
    if req.outputs:
        call.outputs = [o.name for o in req.outputs]
    return call


# -- outputs and metadata -----------------------------------------------------------------------
def _named(spec: Any) -> list[tuple[str, Any]]:
    """``(name, leaf spec)`` for a tensor, a tuple/list of leaves, or a dict of leaves."""
    kind = spec.get("t") if isinstance(spec, dict) else None
    if kind in ("tuple", "list"):
        return [(f"OUTPUT__{k}", leaf) for k, leaf in enumerate(spec.get("items", []))]
    if kind == "dict":
        return list(zip(spec.get("keys", []), spec.get("items", []), strict=False))
    return [("OUTPUT__0", spec)]


def _leaf(name: str, leaf: Any) -> tuple[str, list[int]]:
    kind = leaf.get("t") if isinstance(leaf, dict) else None
    if kind == "tensor" and leaf.get("dtype") in _V2_NAME:
        return leaf["dtype"], list(leaf.get("shape", []))
    if kind in ("bool", "int", "float"):
        return {"bool": "bool", "int": "int64", "float": "float64"}[kind], []
    what = leaf.get("dtype", kind) if isinstance(leaf, dict) else type(leaf).__name__
    raise V2Error(500, "INTERNAL", f"output {name}: a {what} has no v2 tensor form (outputs must be "
                                   "tensors, or a tuple, list or dict of tensors)")


def outputs_of(spec: Any, frames: list[Any],
               wanted: list[str] | None) -> list[tuple[str, str, list[int], Any]]:
    """The node reply's outputs as ``(name, wire dtype, shape, raw bytes)``, only ``wanted``
    (all when None) in the order asked."""
    out = {}
    for name, leaf in _named(spec):
        dtype, shape = _leaf(name, leaf)
        if leaf["t"] == "tensor":
            raw = frames[leaf["f"]]
            raw = raw.buffer if hasattr(raw, "buffer") else raw
        else:
            raw = np.asarray(leaf["v"], dtype=_NP[dtype]).tobytes()
        out[name] = (name, dtype, shape, raw)
    if wanted is None:
        return list(out.values())
    missing = [w for w in wanted if w not in out]
    if missing:
        raise bad(f"output {missing[0]!r} is not an output of this model (it has {', '.join(out)})")
    return [out[w] for w in wanted]


def find_version(models: P.ModelsReply | None, name: str, seq: int) -> tuple[P.ServedModel, P.ServedVersion]:
    """The served model and version (newest when ``seq`` is 0); :class:`V2Error` if none."""
    served = {m.name: m for m in models.models} if models is not None else {}
    m = served.get(name)
    if m is None:
        raise V2Error(404, "NOT_FOUND", f"unknown model {name[:64]!r}: this node serves "
                                        f"{', '.join(served) or 'nothing'}")
    versions = [v for v in m.versions if v.workers and (not seq or v.seq == seq)]
    if not versions:
        if seq:
            have = ", ".join(str(v.seq) for v in m.versions) or "none"
            raise V2Error(404, "NOT_FOUND", f"model {name} version {seq} is not served here "
                                            f"(versions: {have})")
        raise V2Error(503, "UNAVAILABLE", f"model {name} is not ready: no worker holds a release of it yet")
    return m, versions[-1]


def model_metadata(models: P.ModelsReply | None, name: str, seq: int) -> dict[str, Any]:
    """v2 model metadata: inputs from the manifest's ``inputs`` (the leading, batch dimension
    and every dimension the examples left varying are -1), outputs from the first example's."""
    m, v = find_version(models, name, seq)
    inputs = []
    for k, sig in enumerate(v.inputs):
        if "dtype" not in sig:
            raise V2Error(500, "INTERNAL", f"model {name}: argument {k} is a {sig.get('kind')}, not a tensor")
        shape = list(sig.get("shape", []))
        inputs.append({"name": f"INPUT__{k}", "datatype": _V2_NAME.get(sig["dtype"], sig["dtype"]),
                       "shape": [-1, *shape[1:]] if shape else []})
    outputs = []
    for oname, leaf in (_named(v.outputs) if v.outputs is not None else []):
        dtype, shape = _leaf(oname, leaf)
        outputs.append({"name": oname, "datatype": _V2_NAME[dtype],
                        "shape": [-1, *shape[1:]] if shape else []})
    return {"name": name, "versions": [str(x.seq) for x in m.versions if x.workers],
            "platform": "pytorch_torchscript", "inputs": inputs, "outputs": outputs}
