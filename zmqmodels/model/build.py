"""The build pipeline as a library call: load a model source, compile it (script, trace as a
fallback, parity proven against eager) and cut it into a release.

``zmqmodels build`` and ``zmqmodels publish`` are thin shells over :func:`build_from_source`;
a training job can call it directly and hand the result to :class:`~zmqmodels.HubClient`.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import xxhash

from .. import defaults
from ..errors import ReleaseError, SourceError
from ..release.manifest import (
    CODECS,
    MAX_BATCH_CLAIM,
    CodecSpec,
    Manifest,
    Release,
    choose_codec,
    compress_archive,
    pack_tensors,
    span_digests,
    validate_name,
)

if TYPE_CHECKING:
    from ..release.rebase import Base
    from .batching import BatchProof
    from .compile import Compiled

__all__ = ["build_from_source", "build_release", "parse_metadata"]


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
    batching: str = "auto",
    max_batch: int = defaults.PROOF_MAX_BATCH,
    base_examples: Manifest | None = None,
    base: Callable[[], Base | None] | None = None,
    formats: Sequence[str] = ("torchscript",),
) -> Release:
    """Load ``source`` (``module:factory``, a ``.py`` file with a factory, or a TorchScript
    file), compile it on its examples and build a release named ``name``.

    Examples come from ``example_file`` (a ``torch.save``'d tensor, tuple or list), else from
    ``example_specs`` (``DIMxDIM[:dtype]``, comma-joined per argument), else from the factory
    returning ``(module, examples)``, else from ``base_examples`` (the manifest of a release of
    the same model: its examples). ``progress`` receives one line per step,
    ``chunk_progress(done, total)`` each compressed chunk. ``timings`` receives the seconds
    of each step: ``import`` (torch, if this process had not imported it), ``load``,
    ``compile``, ``parity``, ``batching``, ``build`` and ``compress``. ``base``: as
    :func:`build_release`. ``formats``: ``torchscript``, ``pt2`` or both (one release
    carrying both, :mod:`zmqmodels.model.pt2`).
    """
    import time

    validate_name(name)  # before anything slow
    t = timings if timings is not None else {}
    t["import"] = _import_torch()
    from .compile import compile_model
    from .sources import load_source

    say = progress or (lambda _msg: None)
    say(f"loading {source}")
    t0 = time.perf_counter()
    module, examples = load_source(source, weights=weights, say=say)
    examples = _examples(examples, example_file, example_specs, base_examples, say)
    t["load"] = time.perf_counter() - t0
    say("compiling")
    compiled = compile_model(module, examples, allow_trace=allow_trace, method=method, formats=formats)
    t["compile"], t["parity"] = compiled.compile_s, compiled.parity_s
    _say_compiled(compiled, say)
    release = build_release(compiled, name, label, codec=codec, chunk_bytes=chunk_bytes,
                            metadata=metadata or {}, progress=chunk_progress, timings=t,
                            batching=batching, max_batch=max_batch, base=base,
                            base_manifest=base_examples if base is not None else None)
    _say_built(release, say)
    return release


def _import_torch() -> float:
    """Seconds to import torch if this process had not (timed on its own: not the model's fault)."""
    import sys
    import time

    t0 = time.perf_counter()
    if "torch" not in sys.modules:
        import torch  # noqa: F401
    return time.perf_counter() - t0


def _say_compiled(compiled: Compiled, say: Callable[[str], None]) -> None:
    from . import jit

    say(f"compiled by {compiled.method}, parity max abs diff {compiled.max_abs_diff:.3g} "
        f"on {len(compiled.examples)} example(s)")
    if compiled.pt2 is not None:
        p = compiled.pt2
        say(f"pt2: exported in {p.export_s:.1f} s, compiled by AOTInductor in {p.aoti_s:.1f} s for "
            f"{', '.join(p.devices)}, package {len(p.package):,} B without its weights")
    for w in compiled.warnings:
        say(f"warning: {w}")
    if line := jit.take_line():
        say(line)
    say("compressing")


def _say_built(release: Release, say: Callable[[str], None]) -> None:
    for note in release.notes:
        say(note)
    m = release.manifest
    say(f"archive {m.archive_bytes:,} B -> {m.compressed_bytes:,} B in {m.chunk_count} chunk(s), "
        f"codec {m.codec.name}/{m.codec.filter}")


def _examples(given: Any, example_file: str | None, example_specs: Sequence[str], base: Manifest | None,
              say: Callable[[str], None]) -> Any:
    """The examples to compile on: ``example_file``'s, else ``example_specs``', else what the
    factory returned (``given``), else the base release's (said so); :class:`SourceError` if none."""
    from .sources import load_example_file, parse_example_spec

    if example_file:
        return load_example_file(example_file)
    if example_specs:
        return [parse_example_spec(s, seed=i) for i, s in enumerate(example_specs)]
    if given is None and base is not None and base.examples:
        from ..release.manifest import unpack_tensors

        examples = unpack_tensors(base.examples)
        say(f"examples: the {len(examples)} of {base.name} seq {base.seq} (none given)")
        return examples
    if given is None:
        raise SourceError("no example inputs: give --example-input or --example-inputs, "
                          "or return (module, examples) from the factory")
    return given


def _prove(compiled: Compiled, name: str, batching: str, max_batch: int) -> BatchProof:
    """:func:`~zmqmodels.model.batching.prove_batching` within its budget, a share of compile +
    parity (unless batching was asked for outright: then in full, and a model that is not
    batch-invariant is a :class:`ParityError`). A row's cost is first taken from the parity
    run (eager and compiled on every example)."""
    import torch

    from ..errors import ParityError
    from .batching import prove_batching

    rows = sum(int(ex[0].shape[0]) if ex and isinstance(ex[0], torch.Tensor) and ex[0].dim() else 1
               for ex in compiled.examples) or 1
    budget = max(defaults.PROOF_MIN_S, defaults.PROOF_SHARE * (compiled.compile_s + compiled.parity_s))
    proof = prove_batching(compiled.runner, compiled.examples,
                           max_batch=0 if batching == "off" else min(max_batch, MAX_BATCH_CLAIM),
                           budget_s=None if batching == "on" else budget,
                           outputs=compiled.outputs, row_s=compiled.parity_s / (2 * rows))
    if batching == "on" and not proof.batch:
        raise ParityError(f"{name} was declared batchable, but its examples say otherwise: {proof.reason}")
    return proof


def build_release(
    compiled: Compiled,
    name: str,
    label: str = "",
    *,
    codec: str | CodecSpec = "auto",
    chunk_bytes: int = defaults.CHUNK_BYTES,
    metadata: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    timings: dict[str, float] | None = None,
    batching: str = "auto",
    max_batch: int = defaults.PROOF_MAX_BATCH,
    base: Callable[[], Base | None] | None = None,
    base_manifest: Manifest | None = None,
) -> Release:
    """Save ``compiled`` into memory and build its release (``seq`` 0 until stored).
    ``batching``: ``"auto"`` proves whether the model is batch-invariant on its examples and
    records it (:func:`zmqmodels.model.batching.prove_batching`, up to ``max_batch`` rows); ``"on"``
    also refuses (:class:`ParityError`) a model that is not; ``"off"`` records it unbatched.
    ``timings`` gets the seconds of ``batching``, ``build`` and ``compress``. ``codec``:
    ``"auto"``, a codec name (``lz4``, ``zstd``, ``none``, ...) or a :class:`CodecSpec`.
    ``base`` gives the release the fleet serves under ``name`` (a :class:`~zmqmodels.release.rebase.Base`,
    or None), asked for only if the archive has that release's code (``base_manifest``) but
    lays its tensors out otherwise: the release is then built on it
    (:func:`zmqmodels.release.rebase.rebase`), compressing only the chunks whose tensors changed.
    """
    from .checkpoint import require_finite

    validate_name(name)
    if batching not in ("auto", "on", "off"):
        raise ReleaseError(f"batching must be auto, on or off, not {batching!r}")
    require_finite(compiled.state, f"{name}'s weights")
    t0 = time.perf_counter()
    proof = _prove(compiled, name, batching, max_batch)
    t = timings if timings is not None else {}
    t["batching"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    archive, code, tensors = _saved(compiled)
    t["build"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    on = _on(base, base_manifest, name, archive, code, tensors, codec, chunk_bytes)
    spec = on[0].release.manifest.codec if on else _codec(codec, archive, compiled, chunk_bytes)
    chunk_bytes = on[0].release.manifest.chunk_bytes if on else chunk_bytes
    chunks = [] if on else compress_archive(archive, spec, chunk_bytes, progress)  # on a base: its own
    t["compress"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    manifest = _manifest(compiled, name, label, archive, code, tensors, spec, chunk_bytes, chunks, metadata,
                         proof.batch)
    if on is not None:  # the base's archive with these tensors: only changed chunks compressed
        from ..release.rebase import on_base

        release = on_base(on[0], *on[1], manifest, (proof.line(name),))
    else:
        release = Release(manifest.check(), chunks, notes=(proof.line(name),))
    t["build"] += time.perf_counter() - t2  # the manifest: digests, example and expected tensors
    return release


def _saved(compiled: Compiled) -> tuple[Any, str, list[Any]]:
    """``(archive, code digest, tensor descriptors)``: ``compiled`` saved into memory: the
    TorchScript archive, the pt2 package with its weights as entries, or the TorchScript
    archive with the package (no weights) as its extra file ``extra/aoti.pt2``."""
    from ..release.archive import describe_tensors
    from . import jit
    from .pt2 import DUAL_ENTRY, container

    archive: Any
    if compiled.module is None:
        assert compiled.pt2 is not None
        archive = container(compiled.pt2.package, compiled.pt2.constants, compiled.pt2.parameters)
    else:
        extra = {}
        if compiled.pt2 is not None:
            ours = compiled.state
            strangers = [k for k, t in compiled.pt2.constants.items()
                         if k not in ours or tuple(ours[k].shape) != tuple(t.shape)]
            if strangers:
                raise ReleaseError(f"the pt2 package needs constants the TorchScript module does not "
                                   f"hold ({', '.join(strangers[:5])}): publish --format pt2 alone")
            extra[DUAL_ENTRY] = compiled.pt2.package
        buf = io.BytesIO()
        jit.call("save", compiled.module, buf, _extra_files=extra)
        archive = buf.getbuffer()  # no copy: 100 MB saved once
    code, tensors = describe_tensors(archive)
    return archive, code, tensors


def _manifest(compiled: Compiled, name: str, label: str, archive: Any, code: str, tensors: list[Any],
              spec: CodecSpec, chunk_bytes: int, chunks: list[Any], metadata: dict[str, str] | None,
              batch: int) -> Manifest:
    """The manifest of ``archive`` cut into ``chunks`` (none: its archive fields are filled in
    once it is built on a base, :func:`zmqmodels.release.rebase.on_base`)."""
    import torch

    from ..protocol.tensors import signature
    from .pt2 import format_of
    from .trees import input_signature

    params = compiled.parameters
    return Manifest(
        name=name,
        label=label,
        created_at=time.time(),
        archive_sha256=hashlib.sha256(archive).hexdigest() if chunks else "",
        archive_bytes=len(archive),
        compressed_bytes=sum(len(c) for c in chunks),
        codec=spec,
        chunk_bytes=chunk_bytes,
        chunk_count=len(chunks),
        chunk_sizes=[len(c) for c in chunks],
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks],
        chunk_raw_xxh3=span_digests(archive, chunk_bytes) if chunks else [],
        torch_version=str(torch.__version__),
        code_sha256=code,
        tensors=tensors,
        compile_method=compiled.method,
        compile_warnings=list(compiled.warnings),
        inputs=input_signature(compiled.examples),
        outputs=signature(compiled.outputs[0]),
        parameter_count=sum(p.numel() for p in params),
        parameter_bytes=sum(p.numel() * p.element_size() for p in params),
        examples=pack_tensors(list(compiled.examples)),
        expected=pack_tensors(list(compiled.outputs)),
        metadata=dict(metadata or {}),
        batch=batch,
        format=format_of(compiled.formats),
        devices=list(compiled.pt2.devices) if compiled.pt2 is not None else [],
    )


def _on(base: Callable[[], Base | None] | None, head: Manifest | None, name: str, archive: Any, code: str,
        tensors: list[Any], codec: Any, chunk_bytes: int) -> tuple[Base, tuple[bytearray, list[Any]]] | None:
    """The base to build on and the archive rebuilt on it, when ``base`` gives one of the same
    code and tensors laid out otherwise; None otherwise (a whole release, or one aligned with
    the base already: its codec and chunking, its tensors' offsets)."""
    from ..release.rebase import aligned, rebase_archive, unlike

    if head is not None and (unlike(head, name, code, tensors) or aligned(head, codec, chunk_bytes, tensors)):
        return None  # other code, or aligned: nothing to fetch
    got = base() if base is not None else None
    if got is None or unlike(got.release.manifest, name, code, tensors):
        return None
    return None if isinstance(done := rebase_archive(got, archive, tensors), str) else (got, done)


def _codec(codec: str | CodecSpec, archive: Any, compiled: Compiled, chunk_bytes: int) -> CodecSpec:
    """The codec ``codec`` names (``auto``: chosen on a sample of ``archive``)."""
    if not isinstance(codec, str):
        return codec
    state = list(compiled.state.values())
    by_size: dict[int, int] = {}
    for x in state:
        by_size[x.element_size()] = by_size.get(x.element_size(), 0) + x.numel() * x.element_size()
    typesize = max(by_size, key=by_size.__getitem__) if by_size else 4
    if codec == "auto":
        return choose_codec(archive, typesize, chunk_bytes)
    if codec in CODECS:
        return CodecSpec(codec, 0 if codec == "none" else defaults.CLEVEL,
                         "none" if codec == "none" else "shuffle", typesize)
    raise ReleaseError(f"unknown codec {codec!r}; use auto or one of {sorted(CODECS)}")
