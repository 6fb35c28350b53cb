"""Load a verified archive, check it on the manifest's examples, warm it up.

Loads from a file path when there is one: ``torch.jit.load`` from a path is 2-8x faster than
from a ``BytesIO`` and it holds the GIL throughout, stalling every thread of the process.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any

from .errors import CheckError, ZmqModelsError
from .release import Manifest, unpack_tensors
from .slot import Loaded

__all__ = ["load_release", "to_device", "CheckError", "check_finite"]


def to_device(tree: Any, device: str) -> Any:
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=False)
    if isinstance(tree, tuple | list):
        return type(tree)(to_device(x, device) for x in tree)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree


def check_finite(tree: Any, path: str = "out") -> None:
    import torch

    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(torch.isfinite(tree).all()):
            raise CheckError(f"{path}: NaN or Inf in the output")
    elif isinstance(tree, tuple | list):
        for i, x in enumerate(tree):
            check_finite(x, f"{path}[{i}]")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, f"{path}[{k!r}]")


def load_release(manifest: Manifest, source: str | os.PathLike[str] | Any, device: str = "cpu",
                 *, warmup: int = 2) -> Loaded:
    """Load ``source`` (a path, or the archive bytes) onto ``device`` and check it.

    Raises :class:`CheckError` if the model raises on an example, returns NaN/Inf, or differs
    from the expected outputs beyond the tolerance for its dtype and device.
    """
    import torch

    from .compile import compare_outputs

    t0 = time.perf_counter()
    try:
        if isinstance(source, str | os.PathLike):
            module = torch.jit.load(os.fspath(source), map_location=device)
        else:
            module = torch.jit.load(io.BytesIO(source), map_location=device)
    except Exception as exc:
        raise CheckError(f"torch.jit.load failed: {str(exc).strip().splitlines()[0]}") from exc
    module.eval()
    t1 = time.perf_counter()
    examples = unpack_tensors(manifest.examples) if manifest.examples else []
    expected = unpack_tensors(manifest.expected) if manifest.expected else []
    gpu = not device.startswith("cpu")
    # GPU kernels (TF32, other reductions) differ from the CPU that recorded the outputs
    tol: dict[str, float] = {"rtol": 1e-3, "atol": 1e-3} if gpu else {}
    with torch.inference_mode():
        for i, (ex, want) in enumerate(zip(examples, expected, strict=False)):
            try:
                got = module(*to_device(tuple(ex), device))
            except Exception as exc:
                raise CheckError(f"example {i}: model raised: {str(exc).strip()[:300]}") from None
            got = to_device(got, "cpu")
            check_finite(got, f"example {i} out")
            try:
                compare_outputs(want, got, path=f"example {i} out", **tol)
            except ZmqModelsError as exc:
                raise CheckError(str(exc)) from None
        for _ in range(warmup if examples else 0):
            module(*to_device(tuple(examples[0]), device))
        if gpu:
            torch.cuda.synchronize(device)
    from .tensors import torch_dtype

    # (dtype, rank, dtype name, shape): -1 where the examples differ, and always for the
    # leading (batch) dimension, which one example cannot be taken to fix
    sig = tuple((torch_dtype(w.get("dtype")), w.get("rank", -1), w.get("dtype", ""),
                 tuple([-1, *list(w.get("shape") or [])[1:]]) if w.get("shape") else ())
                for w in manifest.inputs)
    return Loaded(module, manifest, device, t1 - t0, time.perf_counter() - t1, sig)
