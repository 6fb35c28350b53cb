"""New weights into the code of a stored release, without recompiling: what
:meth:`HubClient.publish_weights <zmqmodels.hub_client.HubClient.publish_weights>` and
``zmqmodels publish --weights CKPT --like NAME`` run.

The base is the model's newest stored release (fetched from the hub once, then kept). Each
update overwrites the bytes of the named tensors in a copy of the base archive (same offsets:
the manifest's tensor descriptors say where), fixes the zip's CRC-32s, checks the new weights
on the release's examples (against the eager module when one is given), and builds a release
whose unchanged chunks are the base's own compressed chunks, so the hub leaves them out of the
broadcast and nodes reuse theirs (docs/protocol.md §Deltas).

A training loop may call it every few seconds: with ``wait=False`` the tensors are copied
once and published by one background thread; a call while one of the same name is in flight
replaces any update still waiting (its future is cancelled): at most one in flight and one
waiting per name, newest wins, never out of order.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash

from .archive import TensorDesc, set_crcs
from .errors import ReleaseError, ZmqModelsError
from .release import Release, compress_archive, pack_tensors, span_digests, unpack_tensors

__all__ = ["Base", "WeightsPublisher", "state_of", "swap_tensors", "weights_release"]


@dataclass
class Base:
    """A stored release this process updates: its verified archive and, once loaded, its
    scripted module holding the archive's weights (None: load it when first needed)."""

    release: Release
    archive: bytearray
    module: Any = None


def state_of(weights: Any) -> dict[str, Any]:
    """A ``{name: tensor}`` from an ``nn.Module`` (its ``state_dict()``) or a mapping; a
    checkpoint nesting one under ``state_dict`` or ``model`` is unwrapped."""
    import torch

    if isinstance(weights, torch.nn.Module):
        return dict(weights.state_dict())
    if isinstance(weights, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(weights.get(key), Mapping) and not isinstance(weights.get(key), torch.Tensor):
                return state_of(weights[key])
        bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ReleaseError(f"not tensors: {', '.join(map(str, bad[:5]))}")
        return dict(weights)
    raise ReleaseError(f"weights must be an nn.Module or a dict of tensors, not {type(weights).__name__}")


def swap_tensors(base: Base, state: Mapping[str, Any]) -> tuple[bytearray, list[TensorDesc], list[str]]:
    """A copy of the base archive holding ``state``'s tensors: ``(archive, descriptors, kept)``,
    ``kept`` naming the base's tensors ``state`` leaves out (they keep their bytes). Names,
    dtypes and shapes must match the release's; every mismatch is named."""
    import torch

    m = base.release.manifest
    if not m.tensors:
        raise ReleaseError(f"{m.name} seq {m.seq} describes no tensors (built before tensor "
                           "descriptors, or not an archive this reader understands): publish it whole")
    by_name = {t.name: t for t in m.tensors}
    problems = [f"{k}: not in the release" for k in state if k not in by_name]
    for k, x in state.items():
        t = by_name.get(k)
        if t is not None and (str(x.dtype).removeprefix("torch.") != t.dtype or list(x.shape) != t.shape):
            problems.append(f"{k}: {str(x.dtype).removeprefix('torch.')}{list(x.shape)}, "
                            f"the release has {t.dtype}{t.shape}")
    if problems:
        raise ReleaseError(f"weights do not fit {m.name} seq {m.seq}: " + "; ".join(problems[:8])
                           + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
    out = bytearray(base.archive)
    view = memoryview(out)
    descs, changed = [], []
    for t in m.tensors:
        x = state.get(t.name)
        if x is None:
            descs.append(t)
            continue
        data = x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        digest = xxhash.xxh3_64_intdigest(data)
        if digest != t.xxh3 or view[t.start:t.start + t.nbytes] != data.data:  # compared in place
            view[t.start:t.start + t.nbytes] = data
            changed.append((t.start, t.start + t.nbytes))
        descs.append(msgspec.structs.replace(t, xxh3=digest))
    view.release()
    set_crcs(out, changed)
    return out, descs, sorted(set(by_name) - set(state))


def weights_release(base: Base, archive: bytearray, tensors: list[TensorDesc], expected: list[Any],
                    label: str, metadata: Mapping[str, str] | None = None) -> Release:
    """The release of ``archive`` (the base's code, new tensor bytes): chunks whose span is
    unchanged are the base's compressed chunks as they are; the others are compressed anew
    with the base's codec."""
    m, old = base.release.manifest, base.release.chunks
    raw = span_digests(archive, m.chunk_bytes)
    view = memoryview(archive)
    chunks: list[Any] = []
    for i, digest in enumerate(raw):
        if i < len(m.chunk_raw_xxh3) and m.chunk_raw_xxh3[i] == digest:
            chunks.append(old[i])
        else:
            chunks.extend(compress_archive(view[i * m.chunk_bytes:(i + 1) * m.chunk_bytes], m.codec,
                                           m.chunk_bytes))
    manifest = msgspec.structs.replace(
        m, seq=0, label=label, created_at=time.time(),
        archive_sha256=hashlib.sha256(view).hexdigest(),
        compressed_bytes=sum(len(c) for c in chunks), chunk_sizes=[len(c) for c in chunks],
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks], chunk_raw_xxh3=raw,
        tensors=tensors, compile_method="weights", compile_warnings=[],
        expected=pack_tensors(list(expected)), signer="", staged=False,
        metadata={**m.metadata, **(metadata or {}), "weights_of": str(m.seq)})
    return Release(manifest.check(), chunks)


def check_weights(base: Base, archive: bytearray, state: Mapping[str, Any], eager: Any = None) -> list[Any]:
    """Run the release's examples on the base's code holding ``state`` (and on ``eager``, an
    ``nn.Module``, whose outputs they must match): the new expected outputs. A failure leaves
    the kept module to be loaded again."""
    import torch

    m = base.release.manifest
    first = next(iter(eager.parameters()), None) if eager is not None else None
    device = str(first.device) if first is not None else "cpu"
    module = base.module
    if module is None:
        module = torch.jit.load(io.BytesIO(archive), map_location="cpu").eval()
    else:
        own = dict(module.named_parameters())
        own.update(dict(module.named_buffers()))
        with torch.no_grad():
            for k, x in state.items():
                own[k].copy_(x)
    base.module = None  # until the check passes: a failure leaves no half-updated module
    try:
        outs = _run_examples(module, m, eager, device)
    except ZmqModelsError as exc:
        raise ReleaseError(f"new weights of {m.name} fail the check: {exc}") from None
    base.module = module
    return outs


def _run_examples(module: Any, m: Any, eager: Any, device: str) -> list[Any]:
    import torch

    from .compile import compare_outputs
    from .loader import check_finite, to_device
    from .tensors import signature

    examples = unpack_tensors(m.examples) if m.examples else []
    outs = []
    with torch.inference_mode():
        for i, ex in enumerate(examples):
            try:
                got = module(*ex)
            except Exception as exc:
                raise ReleaseError(f"example {i}: model raised: {str(exc).strip()[:300]}") from None
            check_finite(got, f"example {i} out")
            if m.outputs is not None and signature(got) != m.outputs and i == 0:
                raise ReleaseError(f"example {i}: outputs changed shape or dtype")
            if eager is not None:
                was = eager.training
                eager.eval()
                try:
                    compare_outputs(to_device(eager(*to_device(tuple(ex), device)), "cpu"), got,
                                    path=f"example {i} out")
                finally:
                    eager.train(was)
            outs.append(got)
    return outs


class WeightsPublisher:
    """Bases by model name, one update in flight per name (see the module's doc).
    ``fetch(name)`` returns the newest stored release of ``name``; ``publish(release, **kw)``
    hands one to the hub and returns its ``Published``."""

    def __init__(self, fetch: Callable[[str], Release], publish: Callable[..., Any]) -> None:
        self._fetch, self._publish = fetch, publish
        self._bases: dict[str, Base] = {}
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[dict[str, Any], dict[str, Any], Future[Any]]] = {}
        self._busy: set[str] = set()
        self._count = 0

    def publish(self, name: str, weights: Any, *, wait: bool = True, **kw: Any) -> Any:
        if wait:
            with self._lock:
                if name in self._busy:
                    raise ReleaseError(f"{name}: an update is in flight (publish_weights(wait=False)); "
                                       "wait for its future first")
                self._busy.add(name)
            try:
                return self._one(name, state_of(weights), weights, **kw)
            finally:
                with self._lock:
                    self._busy.discard(name)
        import torch

        eager = weights if isinstance(weights, torch.nn.Module) else None
        # copied now: the caller's training step may change its tensors in place right after
        state = {k: v.detach().to("cpu", copy=True) for k, v in state_of(weights).items()}
        if eager is not None:
            import copy

            eager = copy.deepcopy(eager).cpu()
        future: Future[Any] = Future()
        with self._lock:
            replaced = self._waiting.pop(name, None)
            self._waiting[name] = (state, {**kw, "eager": eager}, future)
            start = name not in self._busy
            if start:
                self._busy.add(name)
        if replaced is not None:
            replaced[2].cancel()  # a newer update of the same model takes its place
        if start:
            threading.Thread(target=self._drain, args=(name,), name=f"zmqm-weights-{name}",
                             daemon=True).start()
        return future

    def _drain(self, name: str) -> None:
        while True:
            with self._lock:
                job = self._waiting.pop(name, None)
                if job is None:
                    self._busy.discard(name)
                    return
            state, kw, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._one(name, state, kw.pop("eager"), **kw))
            except BaseException as exc:  # the caller reads it from the future
                future.set_exception(exc)

    def _one(self, name: str, state: dict[str, Any], eager: Any, *, label: str = "",
             metadata: Mapping[str, str] | None = None, timings: dict[str, float] | None = None,
             **publish_kw: Any) -> Any:
        import torch

        t0 = time.perf_counter()
        base = self._base(name)
        t1 = time.perf_counter()
        archive, descs, _kept = swap_tensors(base, state)
        expected = check_weights(base, archive, state, eager if isinstance(eager, torch.nn.Module) else None)
        t2 = time.perf_counter()
        self._count += 1
        stem = base.release.manifest.label.partition("+w")[0] or f"seq{base.release.manifest.seq}"
        label = label or f"{stem}+w{self._count}"
        release = weights_release(base, archive, descs, expected, label, metadata)
        t3 = time.perf_counter()
        done = self._publish(release, **publish_kw)
        stored = msgspec.structs.replace(release.manifest, seq=done.seq)
        self._bases[name] = Base(Release(stored, release.chunks), archive, base.module)
        if timings is not None:
            timings.update(base=t1 - t0, check=t2 - t1, build=t3 - t2, send=time.perf_counter() - t3)
        return done

    def _base(self, name: str) -> Base:
        """The kept base if it is still the hub's newest release of ``name``, else that one."""
        newest = self._fetch(name, manifest_only=True)
        kept = self._bases.get(name)
        if kept is not None and kept.release.manifest.archive_sha256 == newest.manifest.archive_sha256:
            return kept
        release = self._fetch(name)
        base = self._bases[name] = Base(release, release.archive())
        return base
