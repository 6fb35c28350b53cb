"""Real models used across the tests (importable by subprocesses as ``tests.models``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SignFlip(nn.Module):
    """Data-dependent branch; ``*rest`` makes it unscriptable, so it is traced."""

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if x.max() >= 0:
            return x
        return -x


class NumpyDouble(nn.Module):
    """Computes in numpy inside ``forward``: unscriptable, and a trace of it returns the traced
    example's output for every input (numpy values are constants to the tracer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        return torch.from_numpy(np.asarray(x.detach().numpy()) * 2)


def make_numpy_double() -> nn.Module:
    return NumpyDouble()


class ScriptableSignFlip(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.max() >= 0):
            return x
        return -x


class OnlyTraces(nn.Module):
    """Uses a Python idiom TorchScript rejects (a generator expression over a list)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return sum(layer(x) for layer in self.layers)


class Mixed(nn.Module):
    """A traced submodule inside a module that is then scripted."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.jit.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.randn(2, 4))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if bool(h.sum() > 0):
            return self.head(h)
        return -self.head(h)


class DictTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        y = self.lin(x)
        return {"logits": y, "probs": torch.softmax(y, -1)}, y.argmax(-1)


class BN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Affine(nn.Module):
    """y = x * scale + shift: outputs tell versions apart."""

    def __init__(self, scale: float = 1.0, shift: float = 0.0, width: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(scale)))
        self.shift = nn.Parameter(torch.full((width,), float(shift)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def lenet_examples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 1, 28, 28, generator=g), torch.randn(2, 1, 28, 28, generator=g)]


def make_lenet() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return LeNet(), lenet_examples()


def make_affine() -> tuple[nn.Module, list[torch.Tensor]]:
    return Affine(2.0, 1.0), [torch.ones(1, 4), -torch.ones(3, 4)]


def make_broken() -> nn.Module:
    raise ValueError("factory exploded")


class Probe(nn.Module):
    """``x * scale``; ``x[0, 0] == -1`` raises, ``x[0, 0] == -2`` runs for about a second.
    ``ballast_mb`` adds unused weights so that loading takes a while (25 x 4 MB layers load
    in ~0.15 s here, like the 100 MB model in FACTS.md)."""

    def __init__(self, scale: float = 1.0, ballast_mb: int = 0, width: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(scale)))
        self.register_buffer("spin", torch.eye(64))
        self.ballast = nn.ModuleList([nn.Linear(1024, 1024) for _ in range(ballast_mb // 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flag = float(x[0, 0].item())
        if flag == -1.0:
            raise RuntimeError("probe asked to fail")
        if flag == -2.0:
            y = torch.ones(64, 64)
            for _ in range(200_000):
                y = y @ self.spin
            return x * self.scale + y[0, 0] * 0
        return x * self.scale


def probe_examples() -> list[torch.Tensor]:
    return [torch.ones(1, 4), torch.full((2, 4), 0.5)]


def make_probe() -> tuple[nn.Module, list[torch.Tensor]]:
    return Probe(2.0), probe_examples()


class Explodes(nn.Module):
    """``x / zero``: Inf when ``zero`` holds zeros (a publisher refuses it then)."""

    def __init__(self) -> None:
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.zero


class Heavy(nn.Module):
    """``x * scale``, after running ``mb`` MB of linear layers (a few ms a request on one CPU
    thread): slow enough that the node, not the client, is the bottleneck, and large enough
    (~100 MB) that a load takes a while."""

    def __init__(self, scale: float = 1.0, mb: int = 100, width: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(scale)))
        self.layers = nn.ModuleList([nn.Linear(1024, 1024) for _ in range(mb // 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.ones(1, 1024, dtype=x.dtype, device=x.device) * x[0, 0]  # on x's device
        for layer in self.layers:
            h = layer(h)
        return x * self.scale + h.sum() * 0.0


def make_heavy() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Heavy(2.0), [torch.ones(1, 4), torch.full((1, 4), 0.5)]


def explodes_on_nodes(name: str = "probe", label: str = "nan") -> Any:
    """A release every node rejects (Inf on its example) though its manifest looks sound: built
    from :class:`Explodes` holding ones (finite outputs, recorded as expected), then its
    ``zero`` tensor's bytes set to zeros, as a publisher bug after its checks would. Publishers
    refuse Inf themselves, so only a release made by hand reaches nodes like this."""
    from zmqmodels import build_release, compile_model
    from zmqmodels.model.weights import swap_tensors, weights_release
    from zmqmodels.release.manifest import unpack_tensors
    from zmqmodels.release.rebase import Base

    m = Explodes()
    with torch.no_grad():
        m.zero.fill_(1.0)
    rel = build_release(compile_model(m, [torch.ones(1, 4)]), name, label)
    base = Base(rel, rel.archive())
    archive, descs, _ = swap_tensors(base, {"zero": torch.zeros(4)})
    return weights_release(base, archive, descs, unpack_tensors(rel.manifest.expected), label)


class Wide(nn.Module):
    """~8 MB of weights; ``head`` is the part a fine-tune changes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(256, 8192)
        self.head = nn.Linear(8192, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class Rows(nn.Module):
    """``x * scale``, row by row (batch-invariant); a row whose first value is -1 makes the
    forward raise, one whose first value is -2 makes it run for about a second."""

    def __init__(self, scale: float = 1.0, width: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), float(scale)))
        self.register_buffer("spin", torch.eye(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == -1.0).any()):
            raise RuntimeError("a row asked to fail")
        if bool((x[:, 0] == -2.0).any()):
            y = torch.ones(64, 64)
            for _ in range(200_000):
                y = y @ self.spin
            return x * self.scale + y[0, 0] * 0
        return x * self.scale


def make_rows(scale: float = 2.0) -> tuple[nn.Module, list[torch.Tensor]]:
    return Rows(scale), [torch.ones(1, 4), torch.full((2, 4), 0.5)]


class CenterBatch(nn.Module):
    """Subtracts the batch mean: each row's output depends on its neighbours (not batchable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class Positive(nn.Module):
    """Keeps the positive values: the output's length depends on the data (not batchable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0]


class Stack(nn.Module):
    """``depth`` x Linear(width, width) with tanh: a model whose layers update one at a time
    (12 x 256: the fine-tune issue's 48 MB model scaled down to 3 MB)."""

    def __init__(self, width: int = 256, depth: int = 12) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class Mlp(nn.Module):
    """784-64-10 with a buffer: the model the pt2 tests export and compile (once a session)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(784, 64)
        self.b = nn.Linear(64, 10)
        self.register_buffer("scale", torch.ones(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * self.scale


def make_mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Mlp().eval(), [torch.randn(4, 784), torch.randn(2, 784)]


class Guarded(Stack):
    """Refuses hot inputs, and calls ``super().forward``: scripting fails on it, and a trace
    would freeze the guard away (issue 30's trace fallback that shipped a dropped branch)."""

    def __init__(self) -> None:
        super().__init__(width=8, depth=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.max() > 100:
            raise ValueError("too hot")
        return super().forward(x)


def make_guarded() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return Guarded().eval(), [torch.randn(3, 8), torch.randn(2, 8)]
