"""Tensor trees on the wire: dtype + shape + raw little-endian bytes, never pickle.

A *tree* is a tensor, a scalar (bool, int, float, str, None), or a tuple, list or
str-keyed dict of trees. :func:`encode` turns one into a *spec* (plain msgpack-able data)
plus one buffer per tensor; :func:`decode` is the inverse and validates everything it
reads. Spec nodes (``docs/protocol.md`` §Tensors)::

    {"t": "tensor", "dtype": "float32", "shape": [2, 3], "f": 0}   # f: buffer index
    {"t": "tuple" | "list", "items": [node, ...]}
    {"t": "dict", "keys": ["a", ...], "items": [node, ...]}
    {"t": "bool" | "int" | "float" | "str" | "none", "v": value}

Decoding is zero-copy: the tensor shares the received buffer (read-only frames yield
read-only tensors; treat request tensors as inputs, not scratch space).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from ..errors import ProtocolError

__all__ = ["DTYPE_NAMES", "torch_dtype", "dtype_name", "encode", "decode", "signature",
           "tensor_bytes", "parse_shape_spec", "random_arrays", "join_rows", "split_rows"]

# wire name -> item size. numpy has no bfloat16: in numpy mode it decodes to float32 (exact).
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
DTYPE_NAMES = tuple(_ITEMSIZE)
_NUMPY = {n: np.dtype(n).newbyteorder("<") for n in DTYPE_NAMES if n != "bfloat16"}
_NUMPY_NAMES = {v: k for k, v in _NUMPY.items()}
_MAX_DEPTH = 16


_SPEC = re.compile(r"^(\d+(?:x\d+)*|scalar)(?::(\w+))?$")


def parse_shape_spec(spec: str) -> list[tuple[list[int], str]]:
    """``1x3x224x224[:dtype]``, comma-joined per argument -> ``[(shape, dtype name), ...]``;
    :class:`ProtocolError` naming the bad part."""
    out = []
    for part in spec.split(","):
        m = _SPEC.match(part.strip())
        name = (m.group(2) or "float32") if m else ""
        if not m or name not in _ITEMSIZE:
            raise ProtocolError(
                f"bad input spec {part!r}: use DIMxDIM...[:dtype], e.g. 1x3x224x224:float32")
        out.append(([] if m.group(1) == "scalar" else [int(d) for d in m.group(1).split("x")], name))
    return out


def random_arrays(spec: str, *, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Seeded random numpy arrays for a spec (floats standard normal, integers in [0, 10),
    bools random) without importing torch; bfloat16 is not a numpy dtype and is refused."""
    rng = np.random.default_rng(seed)
    out = []
    for shape, name in parse_shape_spec(spec):
        if name == "bfloat16":
            raise ProtocolError("bfloat16 inputs need torch: pass a torch.save'd file instead")
        dt = _NUMPY[name]
        if dt.kind in "fc":
            a = rng.standard_normal(shape).astype(dt)
        elif dt.kind == "b":
            a = rng.integers(0, 2, shape).astype(bool)
        else:
            a = rng.integers(0, 10, shape).astype(dt)
        out.append(np.asarray(a))
    return tuple(out)


@cache
def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {n: getattr(torch, n) for n in DTYPE_NAMES}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a wire dtype name, or None (imports torch)."""
    return _torch_dtypes().get(name)


def dtype_name(dtype: Any) -> str:
    """The wire name of a torch or numpy dtype."""
    if isinstance(dtype, np.dtype):
        name = _NUMPY_NAMES.get(dtype.newbyteorder("<"))
        if name is not None:
            return name
    else:
        name = str(dtype).removeprefix("torch.")
        if _torch_dtypes().get(name) == dtype:
            return name
    raise ProtocolError(f"dtype {dtype} cannot travel on the wire")


def _is_torch_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a caller with tensors has it
    return torch is not None and isinstance(x, torch.Tensor)


def _little(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


def tensor_bytes(t: Any) -> memoryview:
    """A torch tensor's or numpy array's bytes as a memoryview (a copy only if it is not
    contiguous or not on the CPU)."""
    if isinstance(t, np.ndarray):
        return _little(t).reshape(-1).view(np.uint8).data
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    import torch

    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def encode(tree: Any) -> tuple[Any, list[memoryview]]:
    """Return ``(spec, buffers)`` for a tree of tensors and scalars."""
    buffers: list[memoryview] = []

    def walk(x: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ProtocolError("tensor tree nested too deeply")
        if isinstance(x, np.ndarray) or _is_torch_tensor(x):
            buffers.append(tensor_bytes(x))
            return {"t": "tensor", "dtype": dtype_name(x.dtype), "shape": list(x.shape),
                    "f": len(buffers) - 1}
        if isinstance(x, bool):
            return {"t": "bool", "v": x}
        if isinstance(x, int):
            return {"t": "int", "v": x}
        if isinstance(x, float):
            return {"t": "float", "v": x}
        if isinstance(x, str):
            return {"t": "str", "v": x}
        if x is None:
            return {"t": "none"}
        if isinstance(x, tuple | list):
            return {"t": "tuple" if isinstance(x, tuple) else "list",
                    "items": [walk(i, depth + 1) for i in x]}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise ProtocolError("only str dict keys can travel on the wire")
            return {"t": "dict", "keys": list(x), "items": [walk(v, depth + 1) for v in x.values()]}
        raise ProtocolError(f"cannot encode {type(x).__name__} on the wire")

    return walk(tree, 0), buffers


_SCALARS: dict[str, type | tuple[type, ...]] = {"bool": bool, "int": int, "float": (float, int), "str": str}

def decode(spec: Any, buffers: Sequence[Any], *, copy: bool = False, arrays: str = "torch") -> Any:
    """Rebuild a tree from ``spec`` and ``buffers``; raise :class:`ProtocolError` if invalid.

    Every buffer must be used exactly once and hold exactly ``prod(shape) * itemsize`` bytes.
    ``arrays``: ``"torch"`` (tensors; imports torch) or ``"numpy"`` (arrays; bfloat16 widens
    to float32, which is exact).
    """
    if arrays not in ("torch", "numpy"):
        raise ValueError(f"arrays must be 'torch' or 'numpy', not {arrays!r}")
    d = _Decoding(buffers, copy, arrays)
    tree = d.walk(spec, 0)
    if len(d.used) != len(buffers):
        raise ProtocolError(f"{len(buffers) - len(d.used)} tensor buffer(s) not referenced by the spec")
    return tree


class _Decoding:
    """One :func:`decode`: the buffers, which of them the spec used, what to build."""

    def __init__(self, buffers: Sequence[Any], copy: bool, arrays: str) -> None:
        self.buffers, self.copy, self.arrays = buffers, copy, arrays
        self.used: set[int] = set()

    def walk(self, node: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH or not isinstance(node, dict):
            raise ProtocolError("malformed tensor spec")
        kind = node.get("t")
        if kind == "tensor":
            return self.tensor(node)
        if kind in ("tuple", "list"):
            items = node.get("items")
            if not isinstance(items, list):
                raise ProtocolError(f"{kind} node without items")
            out = [self.walk(i, depth + 1) for i in items]
            return tuple(out) if kind == "tuple" else out
        if kind == "dict":
            keys, items = node.get("keys"), node.get("items")
            if not (isinstance(keys, list) and isinstance(items, list) and len(keys) == len(items)
                    and all(isinstance(k, str) for k in keys)):
                raise ProtocolError("malformed dict node")
            return {k: self.walk(v, depth + 1) for k, v in zip(keys, items, strict=True)}
        if kind == "none":
            return None
        scalar = _SCALARS.get(str(kind))
        if scalar is None:
            raise ProtocolError(f"unknown tensor-spec node {kind!r}")
        v: Any = node.get("v")
        if not isinstance(v, scalar) or (kind == "int" and isinstance(v, bool)):
            raise ProtocolError(f"{kind} node with a {type(v).__name__} value")
        return float(node["v"]) if kind == "float" else v

    def tensor(self, node: dict[str, Any]) -> Any:
        name = node.get("dtype")
        shape, idx = node.get("shape"), node.get("f")
        if not isinstance(name, str) or name not in _ITEMSIZE:
            raise ProtocolError(f"unknown dtype {name!r}")
        if not (isinstance(shape, list) and len(shape) <= 32
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ProtocolError(f"bad shape {shape!r}")
        if not (isinstance(idx, int) and 0 <= idx < len(self.buffers)) or idx in self.used:
            raise ProtocolError(f"bad or reused buffer index {idx!r}")
        self.used.add(idx)
        buf = memoryview(self.buffers[idx]).cast("B")
        count = 1
        for d in shape:
            count *= d
        itemsize = _ITEMSIZE[name]
        if count * itemsize != buf.nbytes:
            raise ProtocolError(
                f"tensor {node.get('dtype')}{shape} needs {count * itemsize} bytes, got {buf.nbytes}"
            )
        make = self.array if self.arrays == "numpy" else self.torch
        return make(name, shape, count, buf)

    def array(self, name: str, shape: list[int], count: int, buf: memoryview) -> Any:
        if name == "bfloat16":  # the high half of a float32
            wide = np.zeros(count, dtype="<u4")
            wide[:] = np.frombuffer(buf, dtype="<u2")
            return (wide << 16).view("<f4").reshape(shape)
        a = np.frombuffer(buf, dtype=_NUMPY[name]).reshape(shape)
        return a.copy() if self.copy else a

    def torch(self, name: str, shape: list[int], count: int, buf: memoryview) -> Any:
        import torch

        dtype = _torch_dtypes()[name]
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(buf) if self.copy else buf, dtype=dtype).reshape(shape)


def _row_nodes(spec: Any) -> list[dict[str, Any]] | None:
    """The tensor nodes of a tuple of tensors with well-formed shapes (a request's
    ``inputs``), else None."""
    if not isinstance(spec, dict) or spec.get("t") != "tuple" or not isinstance(spec.get("items"), list):
        return None
    nodes = spec["items"]
    ok = all(isinstance(n, dict) and n.get("t") == "tensor" and n.get("dtype") in _ITEMSIZE
             and isinstance(n.get("f"), int) and isinstance(n.get("shape"), list) and n["shape"]
             and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in n["shape"])
             for n in nodes)
    return nodes if ok and nodes else None


def join_rows(spec: Any, buffers: Sequence[Sequence[Any]]) -> tuple[Any, list[bytearray]] | None:
    """Several requests of one ``inputs`` spec (a tuple of tensors) as one: the spec with the
    leading dimensions summed and each input's buffers concatenated (one copy, the one a
    ``torch.cat`` would make). ``None`` when the spec is not a tuple of tensors or a request's
    buffers are not the ones the spec says: the caller then reads each request on its own (and
    answers the malformed one alone)."""
    nodes = _row_nodes(spec)
    if nodes is None or any(len(bufs) != len(nodes) for bufs in buffers):
        return None
    joined = []
    for node in nodes:
        idx, nbytes = node["f"], _ITEMSIZE[node["dtype"]] * math.prod(node["shape"])
        if not 0 <= idx < len(nodes) or any(memoryview(bufs[idx]).nbytes != nbytes for bufs in buffers):
            return None
        joined.append(bytearray().join(bufs[idx] for bufs in buffers))
    rows = nodes[0]["shape"][0] * len(buffers)
    items = [{**n, "shape": [rows, *n["shape"][1:]], "f": k} for k, n in enumerate(nodes)]
    return {"t": "tuple", "items": items}, joined


def split_rows(spec: Any, buffers: Sequence[memoryview], rows: Sequence[int]
               ) -> list[tuple[Any, list[memoryview]]] | None:
    """An encoded output tree of ``sum(rows)`` rows as one ``(spec, buffers)`` per request,
    ``rows[i]`` rows each, the buffers views of ``buffers`` (no copy); ``None`` if a leaf is
    not a tensor whose leading dimension is the batch's (the caller then splits the tree)."""
    total = sum(rows)
    if not total or not _follows(spec, total):
        return None
    per_row = [memoryview(b).nbytes // total for b in buffers]
    out, start = [], 0
    for n in rows:
        views = [b[start * r:(start + n) * r] for b, r in zip(buffers, per_row, strict=True)]
        out.append((_with_rows(spec, n), views))
        start += n
    return out


def _follows(node: Any, total: int) -> bool:
    """Every leaf of an encoded tree is a tensor whose leading dimension is ``total``."""
    kind = node.get("t") if isinstance(node, dict) else None
    if kind == "tensor":
        return bool(node["shape"]) and node["shape"][0] == total
    return kind in ("tuple", "list", "dict") and all(_follows(i, total) for i in node["items"])


def _with_rows(node: dict[str, Any], rows: int) -> dict[str, Any]:
    """A copy of an encoded tree whose tensors' leading dimension is ``rows``."""
    if node["t"] == "tensor":
        return {**node, "shape": [rows, *node["shape"][1:]]}
    return {**node, "items": [_with_rows(i, rows) for i in node["items"]]}


def signature(tree: Any) -> Any:
    """The spec of a tree with tensor buffers left out: dtype and shape only."""
    spec, _ = encode(tree)

    def strip(node: dict[str, Any]) -> dict[str, Any]:
        node = dict(node)
        node.pop("f", None)
        node.pop("v", None)
        if "items" in node:
            node["items"] = [strip(i) for i in node["items"]]
        return node

    return strip(spec)
