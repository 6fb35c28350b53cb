"""New weights into the code of a stored release, without recompiling: what
:meth:`HubClient.publish_weights <zmqmodels.clients.hub.HubClient.publish_weights>` and
``zmqmodels publish --weights CKPT --like NAME`` run.

The base is the release the fleet serves (``core/fleet.py``, ``base_seq``: never one it
refused), fetched from the hub once, then kept. Each update overwrites the bytes of the named
tensors in a copy of the base archive (same offsets: the manifest's tensor descriptors say
where), fixes the zip's CRC-32s, checks the new weights on the release's examples (against the
eager module when one is given), and builds a release whose unchanged chunks are the base's
own compressed chunks, so the hub leaves them out of the broadcast and nodes reuse theirs
(docs/protocol.md §Deltas). The same checks as every publish path (:mod:`.checkpoint`): names,
dtypes and shapes fit, no NaN or Inf. A module whose base is not kept here (another process
published it) is compiled on the base's examples instead: when its code digest and layout are
the base's, that is the update, and no base is fetched or loaded.

A training loop may call it every few seconds: with ``wait=False`` the tensors are copied
once and published by one background thread; a call while one of the same name is in flight
replaces any update still waiting (its future is cancelled): at most one in flight and one
waiting per name, newest wins, never out of order.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import Any

import msgspec
import xxhash

from ..errors import ReleaseError, ZmqModelsError
from ..release.archive import TensorDesc, set_crcs
from ..release.manifest import Release, pack_tensors, unpack_tensors
from ..release.rebase import Base, aligned, delta_line, on_base, rebase, unlike
from .pt2 import Pt2Module

log = logging.getLogger(__name__)

__all__ = ["WeightsPublisher", "auto_label", "check_weights", "swap_tensors", "weights_release"]


def swap_tensors(base: Base, state: Mapping[str, Any], *, partial: bool = True
                 ) -> tuple[bytearray, list[TensorDesc], list[str]]:
    """A copy of the base archive holding ``state``'s tensors: ``(archive, descriptors, kept)``,
    ``kept`` naming the base's tensors ``state`` leaves out (they keep their bytes; only with
    ``partial``). Names, dtypes and shapes must match the release's
    (:func:`~zmqmodels.model.checkpoint.require_fit`); every mismatch is named."""
    import torch

    from .checkpoint import require_fit

    m = base.release.manifest
    if not m.tensors:
        raise ReleaseError(f"{m.name} seq {m.seq} describes no tensors (built before tensor "
                           "descriptors, or not an archive this reader understands): publish it whole")
    require_fit(state, {t.name: (t.dtype, t.shape) for t in m.tensors}, f"{m.name} seq {m.seq}",
                partial=partial, subset="--partial, or partial=True")
    if base.archive is None:
        raise ValueError("weights_release needs the base's archive (Base.archive)")
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
        module = _open(m, archive)
    elif isinstance(module, Pt2Module):
        module.bind({**module.named_constants(), **{k: x.detach().to("cpu").contiguous()
                                                   for k, x in state.items()}})
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


def _open(m: Any, archive: Any) -> Any:
    """The code of release ``m`` holding ``archive``'s weights: its pt2 package when it carries
    one for the CPU (nothing of torch.jit needed), else its TorchScript, else its package for
    CUDA on this machine's GPU."""
    import os
    import tempfile

    import torch

    from ..errors import CheckError
    from . import jit
    from .pt2 import open_pt2, serve_format

    device = "cpu"
    try:
        serve_format(m, device)
    except CheckError:
        if "cuda" not in m.devices or not torch.cuda.is_available():
            raise ReleaseError(f"{m.name} seq {m.seq}: its package runs on {', '.join(m.devices)} only, "
                               "and this machine has none: publish its weights from one that has") from None
        device = "cuda:0"
    if serve_format(m, device) == "pt2":
        with tempfile.TemporaryDirectory(prefix="zmqmodels-weights-") as d:
            path = os.path.join(d, "release.pt2")
            with open(path, "wb") as f:
                f.write(archive)
            # mapped, so the file may go; the bytes are the new weights this process wrote
            return open_pt2(m, path, device, verify=False)[0]
    return jit.call("load", io.BytesIO(archive), map_location="cpu").eval()


def _run_examples(module: Any, m: Any, eager: Any, device: str) -> list[Any]:
    import torch

    from ..protocol.tensors import signature
    from .compile import compare_outputs
    from .loader import to_device
    from .trees import check_finite

    examples = unpack_tensors(m.examples) if m.examples else []
    outs = []
    with torch.inference_mode():
        for i, ex in enumerate(examples):
            try:
                here = getattr(module, "device", "cpu")  # a pt2 runner's (a package for CUDA)
                got = to_device(module(*to_device(tuple(ex), here)), "cpu")
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
    a :class:`~zmqmodels.clients.hub.HubClient` (``status``, ``fetch``, ``publish``)."""

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
        if isinstance(eager, torch.nn.Module) and head.format == "torchscript" and (
                kept is None or kept.release.manifest.archive_sha256 != head.archive_sha256):
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
        from ..core.fleet import base_seq

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
                            batching="off")  # the code's claim is the base's, as for any weights update
        m = rel.manifest
        if unlike(head, m.name, m.code_sha256, m.tensors) or \
                not aligned(head, m.codec, m.chunk_bytes, m.tensors):
            return None
        m = msgspec.structs.replace(m, compile_method="weights", batch=head.batch, batch_dim=head.batch_dim)
        rel = Release(m.check(), rel.chunks)
        done = self._hub.publish(rel, rebase=False, **publish_kw)
        stored = msgspec.structs.replace(rel.manifest, seq=done.seq)
        self._bases[head.name] = Base(Release(stored, rel.chunks), None, compiled.module)  # archive: lazily
        return done

    def base(self, name: str, status: Any = None) -> Base | None:
        """The release new weights of ``name`` build on (:meth:`_head`), its archive fetched
        unless kept from an earlier update; None if the hub stores none."""
        from ..core.fleet import base_seq

        st = status if status is not None else self._hub.status()
        return self.held(self._head(name, st)) if base_seq(st, name) is not None else None

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
        from ..core.fleet import base_seq

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
        done = rebase(self.held(head), release)  # the base asked for once: no second status
        if isinstance(done, str):
            return release, f"whole release: {done}"
        return done, delta_line(head, done.manifest)


def auto_label(base: Any, status: Any) -> str:
    """``<base label>+w<seq>``: the label a weights update gets unless given one, unique because
    ``seq`` is the one the hub will assign (its newest stored + 1)."""
    newest = next((m.seq for m in status.models if m.name == base.name), base.seq)
    stem = base.label.partition("+w")[0] or f"seq{base.seq}"
    return f"{stem}+w{newest + 1}"
