"""Batching with torch: the publish-time proof that a model is batch-invariant, the node's
check of that claim at load, and joining requests into one forward and splitting its outputs.

A model is *batch-invariant* along dimension 0 when running samples together gives each the
output it gets alone: no batch statistics, no reduction across samples, no shape that
depends on the data. :func:`prove_batching` runs the examples' samples alone and joined (with
a few derived samples when the examples hold fewer than :data:`MIN_SAMPLES`, since identical
samples hide a reduction across them), compares each sample's rows with the example-check
tolerances, and records the largest batch proven in the manifest (``batch``; 0: serve one
request per forward). The node trusts nothing it did not see: a worker joins requests only up
to the manifest's claim, and only after :func:`check_batched` passed on its own device.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..defaults import PROOF_MAX_BATCH
from ..errors import ParityError, ZmqModelsError
from .compile import clone_tree, compare_outputs

__all__ = ["BatchProof", "prove_batching", "check_batched", "join_inputs", "split_outputs",
           "DEFAULT_MAX_BATCH", "MIN_SAMPLES"]

DEFAULT_MAX_BATCH = PROOF_MAX_BATCH  # the largest batch the proof runs (publish --max-batch)
MIN_SAMPLES = 4  # distinct samples the proof joins (derived ones fill up the examples')
CHECK_ROWS = 16  # rows a node joins to check a claim at load


@dataclass(frozen=True)
class BatchProof:
    """``batch``: the largest batch proven (0: not batchable, ``reason`` says why)."""

    batch: int
    dim: int = 0
    reason: str = ""

    def line(self, name: str) -> str:
        if self.batch:
            return f"{name}: batchable along dim {self.dim}, proven up to {self.batch} rows"
        return f"{name}: served unbatched: {self.reason}"


def _rows(args: tuple[Any, ...]) -> int:
    """The shared leading dimension of a tuple of tensors; ZmqModelsError if there is none."""
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ZmqModelsError("its inputs are not all tensors")
    if any(a.dim() == 0 for a in args):
        raise ZmqModelsError("an input is a 0-d tensor (no batch dimension)")
    sizes = {int(a.shape[0]) for a in args}
    if len(sizes) != 1 or 0 in sizes:
        raise ZmqModelsError(f"its inputs do not share a leading dimension (sizes {sorted(sizes)})")
    return sizes.pop()


def _derived(sample: tuple[torch.Tensor, ...], k: int) -> tuple[torch.Tensor, ...]:
    """Another sample like ``sample``: floats shifted by seeded noise of their own scale,
    integers and bools permuted within the sample (valid ids stay valid)."""
    g = torch.Generator().manual_seed(1000 + k)
    out = []
    for t in sample:
        if t.is_floating_point() or t.is_complex():
            scale = float(t.abs().mean()) if t.numel() else 1.0
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64)
            out.append((t.double() + noise * (scale or 1.0)).to(t.dtype))
        else:
            flat = t.reshape(-1)
            out.append(flat[torch.randperm(flat.numel(), generator=g)].reshape(t.shape))
    return tuple(out)


def _slice(tree: Any, start: int, stop: int, rows: int) -> Any:
    """Rows ``start:stop`` of every tensor in an output tree whose leading dim is ``rows``."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0 or tree.shape[0] != rows:
            raise ZmqModelsError(f"an output of shape {list(tree.shape)} does not follow the batch of {rows}")
        return tree[start:stop]
    if isinstance(tree, tuple | list):
        return type(tree)(_slice(t, start, stop, rows) for t in tree)
    if isinstance(tree, dict):
        return {k: _slice(v, start, stop, rows) for k, v in tree.items()}
    raise ZmqModelsError(f"an output is a {type(tree).__name__}, not a tensor")


def join_inputs(args: list[tuple[torch.Tensor, ...]], out: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, ...]:
    """Concatenate each positional input of ``args`` along dim 0 (into ``out`` when given:
    pinned staging buffers of the right shape)."""
    if out is None:
        return tuple(torch.cat(col, 0) for col in zip(*args, strict=True))
    for col, buf in zip(zip(*args, strict=True), out, strict=True):
        torch.cat(col, 0, out=buf)
    return tuple(out)


def split_outputs(tree: Any, rows: list[int]) -> list[Any]:
    """One output tree per request, ``rows[i]`` rows each; ZmqModelsError if an output does
    not follow the batch."""
    total, start, out = sum(rows), 0, []
    for n in rows:
        out.append(_slice(tree, start, start + n, total))
        start += n
    return out


def _samples(examples: tuple[tuple[Any, ...], ...], outputs: tuple[Any, ...]
             ) -> tuple[list[tuple[torch.Tensor, ...]], list[Any]]:
    """The examples' one-row samples (with derived ones up to :data:`MIN_SAMPLES`) and each
    one's output alone where ``outputs`` already has it (a one-row example's), else None.
    :class:`ZmqModelsError` if they do not share a batch dimension and a row shape."""
    samples: list[tuple[torch.Tensor, ...]] = []
    alone: list[Any] = []
    for i, ex in enumerate(examples):
        try:
            n = _rows(tuple(ex))
        except ZmqModelsError as exc:
            raise ZmqModelsError(f"example {i}: {exc}") from None
        samples += [tuple(a[j:j + 1] for a in ex) for j in range(n)]
        alone += [outputs[i] if n == 1 and i < len(outputs) else None for _ in range(n)]
    if len({tuple((a.dtype, a.shape[1:]) for a in s) for s in samples}) > 1:
        raise ZmqModelsError("the examples' samples differ in shape beyond the batch dimension")
    for k in range(max(0, MIN_SAMPLES - len(samples))):
        samples.append(_derived(samples[k % len(samples)], k))
        alone.append(None)
    return samples, alone


def _alone(module: Any, samples: list[tuple[torch.Tensor, ...]], alone: list[Any]) -> float:
    """Run each sample whose output alone is not known yet; the mean seconds a run took (0:
    none ran). :class:`ZmqModelsError` if the model raises."""
    ran, took = 0, 0.0
    for j, s in enumerate(samples):
        if alone[j] is None:
            t1 = time.perf_counter()
            try:
                alone[j] = module(*clone_tree(s))
            except Exception as exc:
                why = str(exc).strip()[:200]
                raise ZmqModelsError(f"sample {j} alone: the model raised: {why}") from None
            ran, took = ran + 1, took + time.perf_counter() - t1
    return took / ran if ran else 0.0


def prove_batching(module: Any, examples: tuple[tuple[Any, ...], ...], *,
                   max_batch: int = DEFAULT_MAX_BATCH, rtol: float | None = None,
                   atol: float | None = None, budget_s: float | None = None,
                   outputs: tuple[Any, ...] = (), row_s: float = 0.0) -> BatchProof:
    """Run every sample alone and up to ``max_batch`` rows of them joined; compare per sample.

    ``outputs``: the module's outputs on ``examples`` already computed (the parity run):
    a one-row example's is its sample's output alone, not run again. ``budget_s``: the
    seconds the proof may take; joined runs are shrunk to fit, a joined run costed as one run
    alone (measured, else ``row_s``) plus its extra rows (their cost measured on the first
    joined run), and the claim is the largest size proven.
    """
    if max_batch < 2:
        return BatchProof(0, reason="batching turned off")
    t0, proven = time.perf_counter(), 0
    try:
        samples, alone = _samples(examples, outputs)
        with torch.inference_mode():
            alone_s = _alone(module, samples, alone) or row_s
            extra_s = alone_s  # a memory-bound model joins 64 rows for little more than one
            for want in sorted({min(len(samples), max_batch), max_batch}):
                size = want
                if budget_s is not None:
                    left = budget_s - (time.perf_counter() - t0) - alone_s
                    size = min(want, 1 + int(left / extra_s) if extra_s > 0 else want)
                if size < 2 or size <= proven:
                    continue  # over its budget: what is proven stands
                order = list(itertools.islice(itertools.cycle(range(len(samples))), size))
                t1 = time.perf_counter()
                try:
                    out = module(*join_inputs([samples[j] for j in order]))
                except Exception as exc:
                    why = str(exc).strip()[:200]
                    raise ZmqModelsError(f"a batch of {size}: the model raised: {why}") from None
                extra_s = max(time.perf_counter() - t1 - alone_s, 0.0) / (size - 1) or 1e-6
                for row, (j, got) in enumerate(zip(order, split_outputs(out, [1] * size), strict=True)):
                    try:
                        compare_outputs(alone[j], got, rtol=rtol, atol=atol, path=f"row {row}")
                    except ParityError as exc:
                        raise ZmqModelsError(f"not batch-invariant: in a batch of {size}, {exc} against "
                                             f"sample {j} alone") from None
                proven = size
    except ZmqModelsError as exc:
        return BatchProof(0, reason=str(exc))
    if not proven:
        return BatchProof(0, reason=f"proving it would cost more than its budget ({budget_s:.2f}s, "
                                    "a share of compile + parity); publish --batching on proves it anyway")
    return BatchProof(proven)


def check_batched(run: Callable[[tuple[Any, ...]], Any], examples: list[tuple[Any, ...]],
                  expected: list[Any], claim: int, device: str, tol: dict[str, float]) -> tuple[int, str]:
    """A node's check of a release's ``batch`` claim on its own device (``run``: the module on
    CPU inputs, outputs back on the CPU): the examples' samples joined (up to
    :data:`CHECK_ROWS` rows), each row compared with its example's expected output.
    ``(rows it may join, "")`` or ``(1, why not)``."""
    if claim < 2:
        return 1, ""
    try:
        samples, wants = [], []
        for ex, want in zip(examples, expected, strict=True):
            n = _rows(tuple(ex))
            parts = split_outputs(want, [1] * n)
            samples += [tuple(a[j:j + 1] for a in ex) for j in range(n)]
            wants += parts
        size = min(claim, CHECK_ROWS)
        order = list(itertools.islice(itertools.cycle(range(len(samples))), size))
        with torch.inference_mode():
            out = run(join_inputs([samples[j] for j in order]))
        for row, (j, got) in enumerate(zip(order, split_outputs(out, [1] * size), strict=True)):
            compare_outputs(wants[j], got, path=f"row {row} of {size}", **tol)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not join here
        return 1, f"the batch claim did not hold on {device}: {str(exc).strip()[:300]}"
    return claim, ""
