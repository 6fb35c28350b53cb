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

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ProtocolError

__all__ = ["DTYPES", "dtype_name", "encode", "decode", "signature", "tensor_bytes"]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
_NAMES = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}
_MAX_DEPTH = 16


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot travel on the wire") from None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes as a memoryview (a copy only if it is not contiguous or not on CPU)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def encode(tree: Any) -> tuple[Any, list[memoryview]]:
    """Return ``(spec, buffers)`` for a tree of tensors and scalars."""
    buffers: list[memoryview] = []

    def walk(x: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ProtocolError("tensor tree nested too deeply")
        if isinstance(x, torch.Tensor):
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


def decode(spec: Any, buffers: Sequence[Any], *, copy: bool = False) -> Any:
    """Rebuild a tree from ``spec`` and ``buffers``; raise :class:`ProtocolError` if invalid.

    Every buffer must be used exactly once and hold exactly ``prod(shape) * itemsize`` bytes.
    """
    used: set[int] = set()

    def walk(node: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH or not isinstance(node, dict):
            raise ProtocolError("malformed tensor spec")
        kind = node.get("t")
        if kind == "tensor":
            return _tensor(node)
        if kind in ("tuple", "list"):
            items = node.get("items")
            if not isinstance(items, list):
                raise ProtocolError(f"{kind} node without items")
            out = [walk(i, depth + 1) for i in items]
            return tuple(out) if kind == "tuple" else out
        if kind == "dict":
            keys, items = node.get("keys"), node.get("items")
            if not (isinstance(keys, list) and isinstance(items, list) and len(keys) == len(items)
                    and all(isinstance(k, str) for k in keys)):
                raise ProtocolError("malformed dict node")
            return {k: walk(v, depth + 1) for k, v in zip(keys, items, strict=True)}
        if kind == "none":
            return None
        scalar = {"bool": bool, "int": int, "float": (float, int), "str": str}.get(kind)
        if scalar is None:
            raise ProtocolError(f"unknown tensor-spec node {kind!r}")
        v = node.get("v")
        if not isinstance(v, scalar) or (kind == "int" and isinstance(v, bool)):
            raise ProtocolError(f"{kind} node with a {type(v).__name__} value")
        return float(v) if kind == "float" else v

    def _tensor(node: dict) -> torch.Tensor:
        name = node.get("dtype")
        dtype = DTYPES.get(name)  # type: ignore[arg-type]
        shape, idx = node.get("shape"), node.get("f")
        if dtype is None:
            raise ProtocolError(f"unknown dtype {name!r}")
        if not (isinstance(shape, list) and len(shape) <= 32
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ProtocolError(f"bad shape {shape!r}")
        if not (isinstance(idx, int) and 0 <= idx < len(buffers)) or idx in used:
            raise ProtocolError(f"bad or reused buffer index {idx!r}")
        used.add(idx)
        buf = memoryview(buffers[idx]).cast("B")
        count = 1
        for d in shape:
            count *= d
        itemsize = _ITEMSIZE[name]  # type: ignore[index]
        if count * itemsize != buf.nbytes:
            raise ProtocolError(
                f"tensor {node.get('dtype')}{shape} needs {count * itemsize} bytes, got {buf.nbytes}"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(bytearray(buf) if copy else buf, dtype=dtype)
        return t.reshape(shape)

    tree = walk(spec, 0)
    if len(used) != len(buffers):
        raise ProtocolError(f"{len(buffers) - len(used)} tensor buffer(s) not referenced by the spec")
    return tree


def signature(tree: Any) -> Any:
    """The spec of a tree with tensor buffers left out: dtype and shape only."""
    spec, _ = encode(tree)

    def strip(node: dict) -> dict:
        node = dict(node)
        node.pop("f", None)
        node.pop("v", None)
        if "items" in node:
            node["items"] = [strip(i) for i in node["items"]]
        return node

    return strip(spec)
