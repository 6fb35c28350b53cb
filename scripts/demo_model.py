"""The demo's model: a small MLP (784 -> 256 -> 10). ``v1`` and ``v2`` differ in weights."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(seed: int) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(0)
    return model, [torch.randn(1, 784, generator=g), torch.randn(8, 784, generator=g)]


def v1() -> tuple[nn.Module, list[torch.Tensor]]:
    return _mlp(1)


def v2() -> tuple[nn.Module, list[torch.Tensor]]:
    return _mlp(2)
