"""Module -> TorchScript and/or a ``torch.export`` + AOTInductor package, with a parity proof
against eager.

``torch.jit.script`` is tried first: it keeps control flow. When it fails, ``torch.export`` is
tried next: it refuses a data-dependent branch (or keeps it as a guard), so when it succeeds the
model's graph holds none and a trace of it is faithful. Only when both fail is the model traced
blind, and a trace that drew a TracerWarning (a tensor turned into a Python bool or number, a
frozen branch) is then refused unless tracing was asked for (``method="trace"``, ``--trace``):
its warnings are shown. Tracing also needs evidence: at least two examples that differ in every
input, the first traced and parity checked on the others. The ``pt2`` format (``model/pt2.py``)
is exported and compiled by AOTInductor, and proven against eager on every example in the same
way.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..defaults import PARITY_ATOL, PARITY_RTOL
from ..errors import CompileError, ParityError
from ..protocol.tensors import dtype_name
from .trees import clone_tree

if TYPE_CHECKING:
    from .pt2 import Pt2Build

__all__ = ["Compiled", "compile_model", "normalize_examples", "compare_outputs", "clone_tree"]

Example = tuple[Any, ...]


@dataclass(frozen=True)
class Compiled:
    """A compiled module and the evidence that it matches eager: the TorchScript module
    (None for ``pt2`` alone) and the AOTInductor build (None for ``torchscript`` alone)."""

    module: torch.jit.ScriptModule | None
    method: str  # "script", "trace", "prescripted", "export", or "<one of the first three>+export"
    warnings: tuple[str, ...]
    examples: tuple[Example, ...]
    outputs: tuple[Any, ...]  # the compiled module's output on each example
    max_abs_diff: float
    compile_s: float = 0.0  # scripting or tracing, exporting and compiling
    parity_s: float = 0.0  # eager and compiled on every example
    pt2: Pt2Build | None = None

    @property
    def formats(self) -> tuple[str, ...]:
        return (("torchscript",) if self.module is not None else ()) + (("pt2",) if self.pt2 else ())

    @property
    def runner(self) -> Any:
        """What a node of the release's first format runs (the batch proof runs it)."""
        return self.module if self.module is not None else self.pt2.module  # type: ignore[union-attr]

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Every weight the release carries, by name."""
        if self.module is not None:
            return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        return dict(self.pt2.constants)  # type: ignore[union-attr]

    @property
    def parameters(self) -> list[torch.Tensor]:
        if self.module is not None:
            return list(self.module.parameters())
        return [t for k, t in self.pt2.constants.items() if k in self.pt2.parameters]  # type: ignore[union-attr]


class _FunctionModule(torch.nn.Module):
    """Lets a plain function be traced and saved like a module."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def normalize_examples(example_inputs: Any) -> tuple[Example, ...]:
    """A tensor is one example of one argument; a tuple is one example's arguments;
    a list is several examples (each a tensor or a tuple)."""
    if isinstance(example_inputs, torch.Tensor | tuple):
        items: Sequence[Any] = [example_inputs]
    elif isinstance(example_inputs, list):
        items = example_inputs
    else:
        raise CompileError(
            f"example inputs must be a tensor, a tuple or a list, not {type(example_inputs).__name__}"
        )
    if not items:
        raise CompileError("at least one example input is required (two or more recommended)")
    return tuple(x if isinstance(x, tuple) else (x,) for x in items)


def compile_model(
    module: torch.nn.Module | Callable[..., Any],
    example_inputs: Any,
    *,
    allow_trace: bool = True,
    method: str = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    formats: Sequence[str] = ("torchscript",),
) -> Compiled:
    """Compile ``module`` into ``formats`` (``torchscript``, ``pt2`` or both) and prove each
    matches eager on every example.

    ``method`` (TorchScript) is ``"auto"`` (script, then export-checked trace, then a blind
    trace if ``allow_trace`` and it drew no TracerWarning), ``"script"`` or ``"trace"``. An
    already-scripted module passes through (and cannot be exported). Raises
    :class:`CompileError` if nothing compiles and :class:`ParityError` (naming the example,
    the output path and the max abs difference) if compiled and eager disagree.
    """
    from .pt2 import build_pt2, parse_formats

    examples = normalize_examples(example_inputs)
    formats = parse_formats(formats)
    if method not in ("auto", "script", "trace"):
        raise CompileError(f"unknown compile method {method!r}")
    if isinstance(module, torch.nn.Module):
        module.eval()
    elif not callable(module):
        raise CompileError(f"cannot compile a {type(module).__name__}")
    notes: list[str] = []
    t0 = time.perf_counter()
    compiled, how, program = None, "", None
    if "torchscript" in formats and isinstance(module, torch.jit.ScriptModule):
        compiled, how = module, "prescripted"
    elif "torchscript" in formats:
        compiled, how, program = _compile(module, examples, allow_trace, method, notes)
    if "pt2" in formats and isinstance(module, torch.jit.ScriptModule):
        raise CompileError("a TorchScript module cannot be exported: give the model's factory "
                           "(FILE.py:factory or module:factory) for --format pt2")
    warned = "".join(f"\n  {n}" for n in notes)
    compile_s, t1 = time.perf_counter() - t0, time.perf_counter()
    outputs: tuple[Any, ...] = ()
    worst = 0.0
    if compiled is not None:
        compiled.eval()
        outputs, worst = _prove_parity(module, compiled, how, examples, rtol, atol, warned)
    parity_s = time.perf_counter() - t1
    pt2 = None
    if "pt2" in formats:
        target = module if isinstance(module, torch.nn.Module) else _FunctionModule(module)
        pt2 = build_pt2(target, examples, program)
        compile_s += pt2.export_s + pt2.aoti_s
        t2 = time.perf_counter()
        got, diff = _prove_parity(module, pt2.module, "export", examples, rtol, atol, "")
        parity_s += time.perf_counter() - t2
        outputs, worst = outputs or got, max(worst, diff)
        how = f"{how}+export" if how else "export"
    return Compiled(compiled, how, tuple(notes), examples, outputs, worst, compile_s, parity_s, pt2)


def _prove_parity(module: Any, compiled: Any, how: str, examples: tuple[Example, ...], rtol: float | None,
                  atol: float | None, warned: str) -> tuple[tuple[Any, ...], float]:
    """The compiled model's outputs on every example, finite, and the largest difference from
    the eager model's (a prescripted model is its own eager model: run once)."""
    outputs, worst = [], 0.0
    with torch.inference_mode():
        for i, ex in enumerate(examples):
            if how == "prescripted":
                try:
                    got = compiled(*clone_tree(ex))
                except Exception as exc:
                    raise CompileError(f"the model raised on example {i}: {exc}") from exc
                _finite(got, i)
                outputs.append(got)
                continue
            try:
                eager = module(*clone_tree(ex))
            except Exception as exc:
                raise CompileError(f"eager model raised on example {i}: {exc}") from exc
            _finite(eager, i)
            try:
                got = compiled(*clone_tree(ex))
            except Exception as exc:
                raise ParityError(f"compiled model raised on example {i}: {exc}") from exc
            try:
                worst = max(worst, compare_outputs(eager, got, rtol=rtol, atol=atol))
            except ParityError as exc:
                hint = (f"\n  the trace of example 0 does not generalise (a frozen branch, or a value "
                        f"computed outside torch?){warned or ' (the tracer warned of nothing)'}"
                        if how == "trace" else "")
                raise ParityError(f"example {i}: {exc}{hint}") from None
            outputs.append(got)
    return tuple(outputs), worst


def _finite(out: Any, i: int) -> None:
    """The model's outputs on example ``i`` hold no NaN or Inf (else :class:`ParityError`:
    nothing is published whose examples prove nothing)."""
    from ..errors import CheckError
    from .trees import check_finite

    try:
        check_finite(out, f"example {i} out")
    except CheckError as exc:
        raise ParityError(f"{exc} (NaN or Inf weights, or an input the model cannot take; "
                          "nothing was published)") from None


def _compile(
    module: Any, examples: tuple[Example, ...], allow_trace: bool, method: str, notes: list[str]
) -> tuple[torch.jit.ScriptModule, str, Any]:
    """``(module, how, exported program or None)``: scripted; else traced once
    ``torch.export`` vouched for the graph (the program is returned for a pt2 build to reuse);
    else traced blind if that drew no TracerWarning (or tracing was asked for)."""
    from . import jit
    from .pt2 import export_program

    target = module if isinstance(module, torch.nn.Module) else _FunctionModule(module)
    program, refused = None, ""
    if method in ("auto", "script") and isinstance(module, torch.nn.Module):
        try:
            return jit.call("script", target), "script", None
        except Exception as exc:  # scripting raises many types (frontend, OSError, RuntimeError)
            reason = _whole(exc)  # whole: the useful part (the line, the HERE marker) is at the end
            if method == "script" or not allow_trace:
                raise CompileError(f"torch.jit.script failed:\n{reason}") from exc
            if why := _untraceable(examples):
                raise CompileError(f"torch.jit.script failed:\n{reason}\n"
                                   f"Not falling back to tracing: {why}") from exc
            refused = f"torch.jit.script failed:\n{reason}"
            notes.append(f"script failed, so torch.export was tried next:\n{reason}")
    elif method == "script" or not allow_trace:
        raise CompileError("only nn.Module instances can be scripted; allow tracing for functions")
    elif method == "auto" and (why := _untraceable(examples)):
        raise CompileError(f"a plain function can only be traced, and {why}")
    if method == "auto":
        try:
            program = export_program(target, examples)
            notes.append("torch.export succeeded (the graph holds no data-dependent branch): traced")
        except CompileError as exc:
            refused += f"\n{exc}"
            notes.append("torch.export failed too: traced blind")
    try:
        traced, caught = _trace(target, examples)
    except CompileError as exc:
        raise CompileError(f"{refused}\n{exc}".strip()) from exc
    notes.extend(caught)
    if caught and method == "auto" and program is None:
        shown = "\n  ".join(caught)
        raise CompileError(f"{refused}\nThe trace drew warnings, so it may have frozen a branch or a "
                           f"value (tracing keeps only what example 0 did):\n  {shown}\n"
                           "Not publishing it: make the model scriptable or exportable, or pass "
                           "--trace to accept the trace as it is")
    return traced, "trace", program


def _trace(target: Any, examples: tuple[Example, ...]) -> tuple[torch.jit.ScriptModule, list[str]]:
    """The trace of example 0 and its TracerWarnings, each as a line."""
    from . import jit

    tracer_warning = torch.jit._trace.TracerWarning  # torch.jit re-exports it without saying so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", tracer_warning)
        try:
            traced = jit.call("trace", target, examples[0], strict=False, check_trace=False)
        except Exception as exc:
            raise CompileError(f"torch.jit.trace failed: {_whole(exc)}") from exc
    return traced, [f"TracerWarning: {w.message}".strip() for w in caught
                    if issubclass(w.category, tracer_warning)]


def _whole(exc: BaseException) -> str:
    """An exception's message whole, trimmed, and without the ``.:`` TorchScript puts before
    the source lines it quotes."""
    text = str(exc).strip() or type(exc).__name__
    return text.replace(".:\n", ".\n", 1) if text.split("\n", 1)[0].endswith(".:") else text


def _untraceable(examples: tuple[Example, ...]) -> str:
    """Why these examples cannot prove a trace ("" if they can): a trace is checked on the
    examples it was not made from, so there must be another one, differing in every input."""
    if len(examples) < 2:
        return ("a trace of one example proves nothing (it is checked against the example it "
                "was made from); give at least two examples that differ in every input, or ask "
                "for tracing explicitly (--trace)")
    first = _leaves(examples[0])
    for ex in examples[1:]:
        other = _leaves(ex)
        if len(other) != len(first) or not any(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                for a, b in zip(first, other, strict=True)):
            return ""
    return ("no example differs from example 0 in every tensor input, so parity could not catch "
            "a value the trace froze; give examples whose inputs all differ, or --trace")


def _leaves(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple | list):
        return [t for i in x for t in _leaves(i)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _leaves(v)]
    return []  # a scalar is a constant of the trace either way


def compare_outputs(
    expected: Any, got: Any, *, rtol: float | None = None, atol: float | None = None,
    path: str = "out",
) -> float:
    """Compare two output trees; return the max abs difference or raise :class:`ParityError`.

    Floats use a dtype-aware tolerance; integers and bools must match exactly; NaN never
    equals anything, NaN included (an output holding NaN proves nothing); Inf matches Inf of
    the same sign in the same position.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise ParityError(f"{path}: expected a tensor, got {type(got).__name__}")
        if expected.dtype != got.dtype or expected.shape != got.shape:
            raise ParityError(
                f"{path}: expected {dtype_name(expected.dtype)}{list(expected.shape)}, "
                f"got {dtype_name(got.dtype)}{list(got.shape)}"
            )
        if expected.numel() == 0:
            return 0.0
        a, b = expected.detach().cpu(), got.detach().cpu()
        if not (a.is_floating_point() or a.is_complex()):
            diff = (a.to(torch.int64) - b.to(torch.int64)).abs().max().item() if a.dtype != torch.bool \
                else float((a != b).any())
            if diff:
                raise ParityError(f"{path}: integer outputs differ (max abs diff {diff})")
            return 0.0
        name = dtype_name(a.dtype)
        rt = PARITY_RTOL.get(name, 1e-5) if rtol is None else rtol
        at = PARITY_ATOL.get(name, 1e-6) if atol is None else atol
        if bool(torch.isnan(a).any()) or bool(torch.isnan(b).any()):
            raise ParityError(f"{path}: NaN in the output (NaN never equals NaN)")
        a64, b64 = a.to(torch.complex128 if a.is_complex() else torch.float64), \
            b.to(torch.complex128 if b.is_complex() else torch.float64)
        inf = torch.isinf(a64) | torch.isinf(b64)
        if not torch.equal(a64[inf], b64[inf]):
            raise ParityError(f"{path}: Inf in different positions or signs")
        finite = ~(torch.isnan(a64) | inf)
        d = (a64 - b64).abs()[finite]
        diff = d.max().item() if d.numel() else 0.0
        if math.isnan(diff) or not torch.allclose(a64[finite], b64[finite], rtol=rt, atol=at):
            raise ParityError(f"{path}: max abs diff {diff:.3g} exceeds rtol={rt:g}, atol={at:g}")
        return float(diff)
    if isinstance(expected, tuple | list):
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            raise ParityError(f"{path}: expected a sequence of {len(expected)}, got {_kind(got)}")
        return max((compare_outputs(e, g, rtol=rtol, atol=atol, path=f"{path}[{i}]")
                    for i, (e, g) in enumerate(zip(expected, got, strict=True))), default=0.0)
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            raise ParityError(f"{path}: expected keys {sorted(expected)}, got {_kind(got)}")
        return max((compare_outputs(v, got[k], rtol=rtol, atol=atol, path=f"{path}[{k!r}]")
                    for k, v in expected.items()), default=0.0)
    if expected != got:
        raise ParityError(f"{path}: expected {expected!r}, got {got!r}")
    return 0.0


def _kind(x: Any) -> str:
    if isinstance(x, dict):
        return f"keys {sorted(x)}"
    if isinstance(x, tuple | list):
        return f"a sequence of {len(x)}"
    return type(x).__name__
