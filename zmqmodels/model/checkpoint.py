"""Weights in, checked: the one reading of a checkpoint and the one set of checks every publish
path runs on weights (a saved file, a module, a factory with ``--weights``, ``--like``,
:meth:`HubClient.publish_weights <zmqmodels.clients.hub.HubClient.publish_weights>`).

- :func:`read_checkpoint`: ``torch.load(weights_only=True)`` (never arbitrary pickle), with the
  failure said in this tool's words and the fix this tool offers.
- :func:`state_of`: a ``{name: tensor}`` from what training saves: a state dict, one nested
  under ``state_dict``/``model``/``model_state_dict``, an ``nn.Module``; the ``module.`` prefix
  DataParallel/DDP adds is stripped. Each such step is returned as a line to print.
- :func:`fit_problems`: missing and unexpected names and dtype/shape mismatches against what
  the model holds (missing names are allowed only when the caller asks for a subset).
- :func:`nonfinite`: the floating tensors holding NaN or Inf (refused before anything is stored).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ReleaseError, SourceError

__all__ = ["fit_problems", "nonfinite", "read_checkpoint", "require_fit", "require_finite", "state_of"]

NESTED_KEYS = ("state_dict", "model", "model_state_dict")
DDP_PREFIX = "module."


def read_checkpoint(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a :class:`SourceError` in one line
    that says what the file is and what to do instead."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SourceError(f"no such checkpoint: {path}") from None
    except IsADirectoryError:
        raise SourceError(f"checkpoint {path} is a directory, not a file") from None
    except pickle.UnpicklingError as exc:
        text = str(exc)
        glob = text.partition("GLOBAL ")[2].split(" ", 1)[0]
        if glob:
            raise SourceError(
                f"{path} pickles a {glob}, not only tensors (a whole model or a custom object); this "
                "tool reads state dicts only (never arbitrary pickle): save model.state_dict() with "
                "torch.save and publish that file") from None
        raise SourceError(f"{path} is not a torch.save checkpoint (its pickle does not decode); "
                          "give the file torch.save(model.state_dict(), PATH) wrote") from None
    except Exception as exc:  # noqa: BLE001 (torch's unpickler fails on garbage in many ways)
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"{path} is not a torch.save checkpoint ({why}); give the file "
                          "torch.save(model.state_dict(), PATH) wrote") from None


def state_of(obj: Any, what: str = "weights") -> tuple[dict[str, Any], list[str]]:
    """``({name: tensor}, lines)``: ``obj`` (a checkpoint as loaded, a mapping, an
    ``nn.Module``) as a flat state dict; ``lines`` says each step taken to get there."""
    import torch

    lines: list[str] = []
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict()), lines
    if not isinstance(obj, Mapping):
        raise SourceError(f"{what} holds a {type(obj).__name__}, not a state dict of tensors")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping | torch.nn.Module):
                state, more = state_of(inner, what)
                others = sorted(str(k) for k in obj if k != key)
                rest = f" (left out: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''})" \
                    if others else ""
                return state, [f"took the state dict under {key!r}{rest}", *more]
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise SourceError(f"{what}: not tensors: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
                          f"(a state dict maps names to tensors; nested under one of "
                          f"{', '.join(NESTED_KEYS)} is also read)")
    state = dict(obj)
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        state = {k.removeprefix(DDP_PREFIX): v for k, v in state.items()}
        lines.append(f"stripped the {DDP_PREFIX!r} prefix (a DataParallel/DDP checkpoint)")
    return state, lines


def fit_problems(state: Mapping[str, Any], holds: Mapping[str, tuple[str, list[int]]], *,
                 partial: bool = False) -> list[str]:
    """What keeps ``state`` from fitting a model whose tensors are ``holds`` (``name ->
    (dtype, shape)``): unexpected names, dtype/shape mismatches and, unless ``partial``, the
    names it leaves out. Empty: it fits."""
    from ..protocol.tensors import dtype_name

    problems = []
    missing = [k for k in holds if k not in state]
    unexpected = [k for k in state if k not in holds]
    if missing and not partial:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    for k, x in state.items():
        if k in holds:
            dtype, shape = holds[k]
            got = dtype_name(x.dtype)
            if got != dtype or list(x.shape) != list(shape):
                problems.append(f"{k}: {got}{list(x.shape)}, the model has {dtype}{list(shape)}")
    return problems


def require_fit(state: Mapping[str, Any], holds: Mapping[str, tuple[str, list[int]]], target: str, *,
                partial: bool = False, subset: str = "") -> None:
    """:class:`ReleaseError` naming every problem :func:`fit_problems` finds (one line);
    ``subset`` names the option that allows a subset, shown when keys are missing."""
    problems = fit_problems(state, holds, partial=partial)
    if problems:
        shown = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        hint = f" (a subset on purpose: {subset})" if subset and problems[0].startswith("missing") else ""
        raise ReleaseError(f"weights do not fit {target}: {shown}{hint}")


def nonfinite(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating tensors of ``state`` that hold NaN or Inf."""
    import torch

    return [k for k, x in state.items()
            if (x.is_floating_point() or x.is_complex()) and x.numel() and not bool(torch.isfinite(x).all())]


def require_finite(state: Mapping[str, Any], what: str) -> None:
    bad = nonfinite(state)
    if bad:
        raise ReleaseError(f"{what}: NaN or Inf in {_few(bad)}; nothing was published")


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
