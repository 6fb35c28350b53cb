"""The build pipeline as a library call: load a model source, compile it (script, trace as a
fallback, parity proven against eager) and cut it into a release.

``zmqmodels build`` and ``zmqmodels publish`` are thin shells over :func:`build_from_source`;
a training job can call it directly and hand the result to :class:`~zmqmodels.HubClient`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from . import defaults
from .errors import SourceError
from .release import Release, build_release, validate_name

__all__ = ["build_from_source", "parse_metadata"]


def parse_metadata(items: Sequence[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; :class:`SourceError` for an item without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SourceError(f"metadata {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def build_from_source(
    source: str,
    name: str,
    label: str = "",
    *,
    weights: str | None = None,
    example_specs: Sequence[str] = (),
    example_file: str | None = None,
    codec: str = "auto",
    chunk_bytes: int = defaults.CHUNK_BYTES,
    allow_trace: bool = True,
    method: str = "auto",
    metadata: dict[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
    chunk_progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
) -> Release:
    """Load ``source`` (``module:factory``, a ``.py`` file with a factory, or a TorchScript
    file), compile it on its examples and build a release named ``name``.

    Examples come from ``example_file`` (a ``torch.save``'d tensor, tuple or list), else from
    ``example_specs`` (``DIMxDIM[:dtype]``, comma-joined per argument), else from the factory
    returning ``(module, examples)``. ``progress`` receives one line per step,
    ``chunk_progress(done, total)`` each compressed chunk. ``timings`` receives the seconds
    of each step: ``import`` (torch, if this process had not imported it), ``load``,
    ``compile``, ``parity``, ``build`` and ``compress``.
    """
    import sys
    import time

    validate_name(name)  # before anything slow
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    if "torch" not in sys.modules:
        import torch  # noqa: F401  (timed on its own: seconds, and not the model's fault)
    t["import"] = time.perf_counter() - t0
    from .compile import compile_model
    from .sources import load_example_file, load_source, parse_example_spec

    say = progress or (lambda _msg: None)
    say(f"loading {source}")
    t0 = time.perf_counter()
    module, examples = load_source(source, weights=weights, say=say)
    if example_file:
        examples = load_example_file(example_file)
    elif example_specs:
        examples = [parse_example_spec(s, seed=i) for i, s in enumerate(example_specs)]
    if examples is None:
        raise SourceError("no example inputs: give --example-input or --example-inputs, "
                          "or return (module, examples) from the factory")
    t["load"] = time.perf_counter() - t0
    say("compiling")
    compiled = compile_model(module, examples, allow_trace=allow_trace, method=method)
    t["compile"], t["parity"] = compiled.compile_s, compiled.parity_s
    say(f"compiled by {compiled.method}, parity max abs diff {compiled.max_abs_diff:.3g} "
        f"on {len(compiled.examples)} example(s)")
    for w in compiled.warnings:
        say(f"warning: {w}")
    say("compressing")
    release = build_release(compiled, name, label, codec=codec, chunk_bytes=chunk_bytes,
                            metadata=metadata or {}, progress=chunk_progress, timings=t)
    m = release.manifest
    say(f"archive {m.archive_bytes:,} B -> {m.compressed_bytes:,} B in {m.chunk_count} chunk(s), "
        f"codec {m.codec.name}/{m.codec.filter}")
    return release
