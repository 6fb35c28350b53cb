"""Where a model comes from: a TorchScript file, or a factory in a ``.py`` file or module.

SOURCE forms::

    model.pt                       a TorchScript archive
    path/to/file.py:factory        a function in a file
    package.module:factory         a function in an importable module

A factory returns a module, or ``(module, example_inputs)``. ``--weights CKPT`` loads a
state_dict (``torch.load(weights_only=True)``, never arbitrary pickle) into the factory's module.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import ProtocolError, SourceError
from ..protocol.tensors import parse_shape_spec, torch_dtype

__all__ = ["load_source", "load_weights", "parse_example_spec", "load_example_file"]

def load_source(source: str, *, weights: str | None = None, say: Any = None) -> tuple[Any, Any]:
    """Return ``(module, example_inputs_or_None)`` for a SOURCE string."""
    path = Path(source)
    if source.endswith((".pt", ".pth", ".ts", ".torchscript")) and ":" not in source:
        if weights:
            raise SourceError("--weights applies to factories, not to a TorchScript file")
        if not path.is_file():
            raise SourceError(f"no such file: {source}")
        try:
            from . import jit

            return jit.call("load", str(path), map_location="cpu"), None
        except Exception as exc:
            raise SourceError(f"{source} is not a TorchScript archive: {_first_line(exc)}") from exc
    target, sep, attr = source.rpartition(":")
    if not sep or not attr.isidentifier():
        raise SourceError(f"cannot read source {source!r}: use FILE.pt, FILE.py:factory or module:factory")
    factory = getattr(_import(target), attr, None)
    if not callable(factory):
        raise SourceError(f"{target} has no callable {attr!r}")
    try:
        made = factory()
    except Exception as exc:
        raise SourceError(f"factory {source} raised {type(exc).__name__}: {_first_line(exc)}") from exc
    module, examples = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(module, torch.nn.Module):
        raise SourceError(f"factory {source} returned {type(module).__name__}, not an nn.Module")
    if weights:
        load_weights(module, weights, say)
    return module, examples


def _import(target: str) -> Any:
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise SourceError(f"no such file: {target}")
            name = f"zmqmodels_user_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec and spec.loader
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # dataclasses and TorchScript look modules up by name
            spec.loader.exec_module(mod)
            return mod
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would: the console script does not
        return importlib.import_module(target)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot import {target}: {type(exc).__name__}: {_first_line(exc)}") from exc


def load_weights(module: torch.nn.Module, ckpt: str, say: Any = None) -> list[str]:
    """Load a state-dict checkpoint into ``module`` with the checks every publish path runs
    (:mod:`zmqmodels.model.checkpoint`): nested dicts and the DDP prefix unwrapped and said (the
    lines are returned and passed to ``say``), every missing or unexpected key and
    mismatched shape or dtype an error, NaN/Inf refused."""
    from .checkpoint import read_checkpoint, require_finite, require_fit, state_of

    state, done = state_of(read_checkpoint(ckpt), ckpt)
    for line in done:
        if say is not None:
            say(f"--weights {ckpt}: {line}")
    holds = {k: (str(v.dtype).removeprefix("torch."), list(v.shape)) for k, v in module.state_dict().items()}
    require_fit(state, holds, "the model")
    require_finite(state, ckpt)
    module.load_state_dict(state, strict=True)
    return done


def parse_example_spec(spec: str, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``1x3x224x224[:dtype]``; several arguments of one example are joined by commas.

    Floats are standard normal, integers uniform in [0, 10), bools random; seeded, so the same
    spec gives the same tensors.
    """
    gen = torch.Generator().manual_seed(seed)
    try:
        parts = parse_shape_spec(spec)
    except ProtocolError as exc:
        raise SourceError(str(exc).replace("input spec", "example-input spec")) from None
    args = []
    for shape, name in parts:
        dtype = torch_dtype(name)
        if dtype.is_floating_point or dtype.is_complex:
            t = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            t = torch.randint(0, 10, shape, generator=gen).to(dtype)
        args.append(t)
    return tuple(args)


def load_example_file(path: str) -> Any:
    """A ``torch.save``d tensor (one example), tuple (one example's arguments) or list (examples)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SourceError(f"no such example-input file: {path}") from None
    except Exception as exc:
        raise SourceError(f"cannot load example inputs from {path}: {_first_line(exc)}") from exc
    if not isinstance(data, torch.Tensor | tuple | list):
        raise SourceError(f"{path} holds a {type(data).__name__}; expected a tensor, tuple or list")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
