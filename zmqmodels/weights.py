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
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash

from .archive import TensorDesc, set_crcs
from .errors import ReleaseError, ZmqModelsError
from .release import Release, compress_archive, pack_tensors, span_digests, unpack_tensors

log = logging.getLogger(__name__)

__all__ = ["Base", "WeightsPublisher", "aligned", "on_base", "rebase", "rebase_archive", "swap_tensors",
           "unlike", "weights_release"]


@dataclass
class Base:
    """A stored release this process updates: its verified archive and, once loaded, its
    scripted module holding the archive's weights (None: load it when first needed)."""

    release: Release
    archive: bytearray | None  # None until first needed (a base kept from a module's update)
    module: Any = None


def swap_tensors(base: Base, state: Mapping[str, Any], *, partial: bool = True
                 ) -> tuple[bytearray, list[TensorDesc], list[str]]:
    """A copy of the base archive holding ``state``'s tensors: ``(archive, descriptors, kept)``,
    ``kept`` naming the base's tensors ``state`` leaves out (they keep their bytes; only with
    ``partial``). Names, dtypes and shapes must match the release's
    (:func:`~zmqmodels.checkpoint.require_fit`); every mismatch is named."""
    import torch

    from .checkpoint import require_fit

    m = base.release.manifest
    if not m.tensors:
        raise ReleaseError(f"{m.name} seq {m.seq} describes no tensors (built before tensor "
                           "descriptors, or not an archive this reader understands): publish it whole")
    require_fit(state, {t.name: (t.dtype, t.shape) for t in m.tensors}, f"{m.name} seq {m.seq}",
                partial=partial, subset="--partial, or partial=True")
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
    return out, descs, sorted({t.name for t in m.tensors} - set(state))


def rebase(base: Base, release: Release) -> Release | str:
    """``release`` rebuilt on ``base``'s archive when both hold the same code (``code_sha256``)
    and tensors (names, dtypes, shapes): the base's archive with the new tensor bytes written
    over its own (:func:`rebase_archive`), so a tensor that did not change keeps its span
    whatever else differs between two saves (serialization ids, entry order or offsets), the
    base's chunking and codec, and the base's compressed chunks wherever a span is unchanged
    (the hub leaves those out and nodes apply the update into the module they serve). The
    manifest is ``release``'s otherwise (examples, expected outputs, batching, label), with
    ``weights_of`` the base's seq. A reason (str) when it cannot be rebased."""
    m = release.manifest
    why = unlike(base.release.manifest, m.name, m.code_sha256, m.tensors)
    done = why or rebase_archive(base, release.archive(), m.tensors)
    if isinstance(done, str):
        return done
    return on_base(base, *done, m, release.notes)


def rebase_archive(base: Base, archive: Any, tensors: list[TensorDesc]
                   ) -> tuple[bytearray, list[TensorDesc]] | str:
    """The base's archive with the bytes of ``archive``'s ``tensors`` written over its own
    (same code: :func:`unlike` said so) and their descriptors at the base's offsets; a reason
    (str) if ``archive`` holds tensor data no parameter or buffer holds (only a load would put
    it where it belongs)."""
    from .archive import storages, tensor_table

    if storages(archive) != {t.storage for t in tensor_table(archive)}:
        return "its archive holds tensor data no parameter or buffer holds"
    out = bytearray(base.archive)
    src, dst = memoryview(archive).cast("B"), memoryview(out)
    descs, changed = [], []
    for old, new in zip(base.release.manifest.tensors, tensors, strict=True):
        data = src[new.start:new.start + new.nbytes]
        if new.xxh3 != old.xxh3 or data != dst[old.start:old.start + old.nbytes]:
            dst[old.start:old.start + old.nbytes] = data
            changed.append((old.start, old.start + old.nbytes))
        descs.append(msgspec.structs.replace(old, xxh3=new.xxh3))
    del src, dst, data
    set_crcs(out, changed)
    return out, descs


def unlike(b: Any, name: str, code: str, tensors: list[TensorDesc]) -> str:
    """Why a release of ``name`` with code digest ``code`` and ``tensors`` cannot be rebuilt on
    base manifest ``b`` ("" if it can)."""
    if b.name != name:
        return f"the base is {b.name}, not {name}"
    if not b.code_sha256 or not code:
        return "no code digest (an archive this reader does not understand)"
    if b.code_sha256 != code:
        return f"its code differs from seq {b.seq}'s (code digest)"
    if [(t.name, t.dtype, t.shape) for t in b.tensors] != [(t.name, t.dtype, t.shape) for t in tensors]:
        return f"its tensors differ from seq {b.seq}'s"
    return ""


def weights_release(base: Base, archive: bytearray, tensors: list[TensorDesc], expected: list[Any],
                    label: str, metadata: Mapping[str, str] | None = None) -> Release:
    """The release of ``archive`` (the base's code, new tensor bytes) as
    ``compile_method="weights"``: see :func:`on_base`."""
    m = base.release.manifest
    manifest = msgspec.structs.replace(
        m, label=label, compile_method="weights", compile_warnings=[],
        expected=pack_tensors(list(expected)), staged=False,
        metadata={**m.metadata, **(metadata or {}), "weights_of": str(m.seq)})
    return on_base(base, archive, tensors, manifest)


def on_base(base: Base, archive: bytearray, tensors: list[TensorDesc], manifest: Any,
            notes: tuple[str, ...] = ()) -> Release:
    """The release of ``archive`` (the base's code, new tensor bytes) with ``manifest``'s
    other fields (``weights_of``: the base's seq): chunks whose span is unchanged are the
    base's compressed chunks as they are; the others are compressed anew with the base's
    codec."""
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
        manifest, seq=0, created_at=time.time(), archive_sha256=hashlib.sha256(view).hexdigest(),
        archive_bytes=len(archive), codec=m.codec, chunk_bytes=m.chunk_bytes, chunk_count=len(chunks),
        compressed_bytes=sum(len(c) for c in chunks), chunk_sizes=[len(c) for c in chunks],
        chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks], chunk_raw_xxh3=raw,
        tensors=tensors, signer="", code_sha256=m.code_sha256,
        metadata={**manifest.metadata, "weights_of": str(m.seq)})
    return Release(manifest.check(), chunks, notes=notes)


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
    from .loader import to_device
    from .tensors import check_finite, signature

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
    """Bases by model name, one update in flight per name (see the module's doc). ``hub`` is
    a :class:`~zmqmodels.hub_client.HubClient` (``status``, ``fetch``, ``publish``)."""

    def __init__(self, hub: Any) -> None:
        self._hub = hub
        self._bases: dict[str, Base] = {}
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[dict[str, Any], dict[str, Any], Future[Any]]] = {}
        self._busy: set[str] = set()

    def publish(self, name: str, weights: Any, *, wait: bool = True, **kw: Any) -> Any:
        import torch

        from .checkpoint import state_of

        state, lines = state_of(weights)
        for line in lines:
            log.info("publish_weights %s: %s", name, line)
        if wait:
            with self._lock:
                if name in self._busy:
                    raise ReleaseError(f"{name}: an update is in flight (publish_weights(wait=False)); "
                                       "wait for its future first")
                self._busy.add(name)
            try:
                return self._one(name, state, weights, **kw)
            finally:
                with self._lock:
                    self._busy.discard(name)
        eager = weights if isinstance(weights, torch.nn.Module) else None
        # copied now: the caller's training step may change its tensors in place right after
        state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
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
             partial: bool = True, **publish_kw: Any) -> Any:
        import torch

        from .checkpoint import require_finite

        t0 = time.perf_counter()
        require_finite(state, f"new weights of {name}")
        st = self._hub.status()
        head = self._head(name, st)
        kept = self._bases.get(name)
        if isinstance(eager, torch.nn.Module) and (kept is None or kept.release.manifest.archive_sha256
                                                   != head.archive_sha256):
            done = self._from_module(head, eager, label or auto_label(head, st), metadata, publish_kw)
            if done is not None:  # the module's own code is the base's: no fetch, no load
                if timings is not None:
                    timings.update(base=0.0, check=time.perf_counter() - t0, build=0.0, send=0.0)
                return done
        base = self.held(head)
        t1 = time.perf_counter()
        archive, descs, _kept = swap_tensors(base, state, partial=partial)
        expected = check_weights(base, archive, state, eager if isinstance(eager, torch.nn.Module) else None)
        t2 = time.perf_counter()
        label = label or auto_label(base.release.manifest, st)
        release = weights_release(base, archive, descs, expected, label, metadata)
        t3 = time.perf_counter()
        done = self._hub.publish(release, rebase=False, **publish_kw)
        stored = msgspec.structs.replace(release.manifest, seq=done.seq)
        self._bases[name] = Base(Release(stored, release.chunks), archive, base.module)
        if timings is not None:
            timings.update(base=t1 - t0, check=t2 - t1, build=t3 - t2, send=time.perf_counter() - t3)
        return done

    def _head(self, name: str, status: Any) -> Any:
        """The manifest of the release new weights of ``name`` build on (:meth:`base`)."""
        from .core.fleet import base_seq

        seq = base_seq(status, name)
        if seq is None:
            raise ReleaseError(f"the hub stores no release of {name}: publish one whole first")
        return self._hub.fetch(name, seq, manifest_only=True).manifest

    def _from_module(self, head: Any, eager: Any, label: str, metadata: Mapping[str, str] | None,
                     publish_kw: dict[str, Any]) -> Any:
        """A weights update from a module when the base is not kept here (another process
        published it): the module compiled on the base's examples (parity proven against
        itself) and saved with the base's codec and chunking; if its code digest and tensor
        layout are the base's, that is the update, with no base fetched or loaded. None if not
        (the module's code differs from the release's: the base is fetched and checked)."""
        from .build import build_release
        from .compile import compile_model

        examples = unpack_tensors(head.examples) if head.examples else []
        if not examples:
            return None
        was = eager.training
        try:
            compiled = compile_model(eager, examples)
        except ZmqModelsError:
            return None  # the base's own check (below) names what is wrong
        finally:
            eager.train(was)
        rel = build_release(compiled, head.name, label, codec=head.codec, chunk_bytes=head.chunk_bytes,
                            metadata={**head.metadata, **(metadata or {}), "weights_of": str(head.seq)},
                            batching="off" if head.batch <= 1 else "auto")
        m = rel.manifest
        if unlike(head, m.name, m.code_sha256, m.tensors) or \
                not aligned(head, m.codec, m.chunk_bytes, m.tensors):
            return None
        rel = Release(msgspec.structs.replace(m, compile_method="weights").check(), rel.chunks)
        done = self._hub.publish(rel, rebase=False, **publish_kw)
        stored = msgspec.structs.replace(rel.manifest, seq=done.seq)
        self._bases[head.name] = Base(Release(stored, rel.chunks), None, compiled.module)  # archive: lazily
        return done

    def base(self, name: str, status: Any = None, *, manifest: Any = None) -> Base | None:
        """The release new weights of ``name`` build on (:func:`~zmqmodels.core.fleet.base_seq`:
        one that serves, never one the fleet refused), its archive fetched unless kept from an
        earlier update; None if the hub stores none. ``manifest``: that release's manifest,
        if the caller has it."""
        from .core.fleet import base_seq

        seq = base_seq(status if status is not None else self._hub.status(), name)
        if seq is None:
            return None
        if manifest is None or manifest.seq != seq:
            manifest = self._hub.fetch(name, seq, manifest_only=True).manifest
        return self.held(manifest)

    def held(self, manifest: Any) -> Base:
        """The stored release ``manifest`` describes, as a base: kept from an earlier update of
        its model if it is that one, else fetched whole (and kept)."""
        kept = self._bases.get(manifest.name)
        if kept is not None and kept.release.manifest.archive_sha256 == manifest.archive_sha256:
            if kept.archive is None:
                kept.archive = kept.release.archive()
            return kept
        release = self._hub.fetch(manifest.name, manifest.seq)
        base = self._bases[manifest.name] = Base(release, release.archive())
        return base

    def rebase(self, release: Release, status: Any = None) -> tuple[Release, str]:
        """``release`` rebuilt on its model's base (:func:`rebase`) when that base holds the
        same code, with a line saying what was done; else ``release`` and why not."""
        from .core.fleet import base_seq

        m = release.manifest
        try:
            seq = base_seq(status if status is not None else self._hub.status(), m.name)
        except ReleaseError as exc:
            return release, f"whole release: {exc}"
        if seq is None:
            return release, "whole release: the first of its name"
        head = self._hub.fetch(m.name, seq, manifest_only=True).manifest
        why = unlike(head, m.name, m.code_sha256, m.tensors)
        if why:
            return release, f"whole release: {why}"
        if aligned(head, m.codec, m.chunk_bytes, m.tensors):  # nothing to rebuild
            return release, delta_line(head, m)
        base = self.base(m.name, status, manifest=head)
        assert base is not None
        done = rebase(base, release)
        if isinstance(done, str):
            return release, f"whole release: {done}"
        return done, delta_line(base.release.manifest, done.manifest)


def aligned(b: Any, codec: Any, chunk_bytes: int, tensors: list[TensorDesc]) -> bool:
    """A release compressed with ``codec`` in ``chunk_bytes`` chunks whose ``tensors`` lie where
    base ``b``'s do (same offsets, chunking and codec):
    every chunk whose tensors did not change compresses to the base's bytes already (one
    blosc2 thread per chunk: deterministic), so the hub leaves it out and nodes apply it,
    without fetching the base to rebuild it."""
    return (b.codec, b.chunk_bytes) == (codec, chunk_bytes) and \
        [(t.start, t.nbytes) for t in b.tensors] == [(t.start, t.nbytes) for t in tensors]


def delta_line(b: Any, n: Any) -> str:
    """What a release ``n`` built on base ``b`` changes, in one line."""
    same = sum(1 for old, new in zip(b.chunk_raw_xxh3, n.chunk_raw_xxh3, strict=False) if old == new)
    changed = sum(1 for o, t in zip(b.tensors, n.tensors, strict=True) if o.xxh3 != t.xxh3)
    return (f"delta on seq {b.seq} ({b.label or '-'}), same code: {changed} of {len(n.tensors)} "
            f"tensor(s) changed, {n.chunk_count - same} of {n.chunk_count} chunk(s) to send")


def auto_label(base: Any, status: Any) -> str:
    """``<base label>+w<seq>``: the label a weights update gets unless given one, unique because
    ``seq`` is the one the hub will assign (its newest stored + 1)."""
    newest = next((m.seq for m in status.models if m.name == base.name), base.seq)
    stem = base.label.partition("+w")[0] or f"seq{base.seq}"
    return f"{stem}+w{newest + 1}"
