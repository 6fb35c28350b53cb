"""Torch trees of a model's examples and outputs: the input signature a release declares
(:func:`input_signature`), the finiteness every check asks of outputs (:func:`check_finite`)
and a deep copy of the inputs a model may write into (:func:`clone_tree`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CheckError

__all__ = ["input_signature", "check_finite", "clone_tree"]


def input_signature(examples: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Per positional argument of the examples: ``{dtype, rank, shape}`` (-1 where they
    differ), or ``{kind}`` for an argument that is not a tensor (the manifest's ``inputs``)."""
    sigs: list[Any] = []
    for pos, arg in enumerate(examples[0]):
        if not isinstance(arg, torch.Tensor):
            sigs.append({"kind": type(arg).__name__})
            continue
        shape = list(arg.shape)
        for ex in examples[1:]:
            other = ex[pos] if pos < len(ex) else None
            if isinstance(other, torch.Tensor) and other.dim() == len(shape):
                shape = [d if d == o else -1 for d, o in zip(shape, other.shape, strict=True)]
        sigs.append({"dtype": str(arg.dtype).removeprefix("torch."), "rank": arg.dim(), "shape": shape})
    return sigs


def check_finite(tree: Any, path: str = "out") -> None:
    """:class:`CheckError` if a floating tensor of ``tree`` holds NaN or Inf (the rule every
    check of a model's outputs runs: at publish and on each node)."""
    if isinstance(tree, torch.Tensor):
        if (tree.is_floating_point() or tree.is_complex()) and not bool(torch.isfinite(tree).all()):
            raise CheckError(f"{path}: NaN or Inf in the output")
    elif isinstance(tree, tuple | list):
        for i, x in enumerate(tree):
            check_finite(x, f"{path}[{i}]")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, f"{path}[{k!r}]")


def clone_tree(x: Any) -> Any:
    """Deep-copy the tensors of a tree so a model that writes into its inputs spoils nothing."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple | list):
        return type(x)(clone_tree(i) for i in x)
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    return x
