"""Load a verified archive, check it on the manifest's examples, warm it up.

Loads from a file path when there is one: ``torch.jit.load`` from a path is 2-8x faster than
from a ``BytesIO`` and it holds the GIL throughout, stalling every thread of the process. A
``pt2`` release (``model/pt2.py``) is loaded with ``aoti_load_package`` from that path and its
constants bound to views of the same file (no copy); a node whose device the package was not
compiled for serves the TorchScript part of a dual-format release, or refuses it with a reason.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import time
import warnings
from dataclasses import replace
from typing import Any

from ..errors import CheckError, ZmqModelsError
from ..release.manifest import Manifest, unpack_tensors
from .pt2 import Pt2Module
from .slot import Loaded

__all__ = ["load_release", "apply_weights", "share_weights", "map_shared", "alias_tensors", "spare_of",
           "to_device", "CheckError"]


def to_device(tree: Any, device: str) -> Any:
    import torch

    if isinstance(tree, torch.Tensor):
        # from pinned host memory (a worker's batch staging) the copy is one async DMA; the
        # stream orders it before the forward, and outputs come back synchronously
        return tree.to(device, non_blocking=device != "cpu" and tree.is_pinned())
    if isinstance(tree, tuple | list):
        return type(tree)(to_device(x, device) for x in tree)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree


def load_release(manifest: Manifest, source: str | os.PathLike[str] | Any, device: str = "cpu",
                 *, warmup: int = 2, batch_known: tuple[int, str] | None = None) -> Loaded:
    """Load ``source`` (a path, or the archive bytes) onto ``device`` and check it.

    Raises :class:`CheckError` if the model raises on an example, returns NaN/Inf, or differs
    from the expected outputs beyond the tolerance for its dtype and device.
    """
    from ..release.archive import code_digest
    from . import jit
    from .pt2 import open_pt2, serve_format

    t0 = time.perf_counter()
    shared = 0
    if serve_format(manifest, device) == "pt2":
        with _as_file(source) as path:
            module, shared = open_pt2(manifest, path, device)
    else:
        try:
            if isinstance(source, str | os.PathLike):
                module = jit.call("load", os.fspath(source), map_location=device)
            else:
                module = jit.call("load", io.BytesIO(source), map_location=device)
        except Exception as exc:
            raise CheckError(f"torch.jit.load failed: {str(exc).strip().splitlines()[0]}") from exc
    module.eval()
    code = code_digest(os.fspath(source) if isinstance(source, str | os.PathLike) else source)
    loaded = _checked(module, manifest, device, time.perf_counter() - t0, code, "load", warmup, batch_known)
    return replace(loaded, shared_bytes=shared) if shared else loaded


@contextlib.contextmanager
def _as_file(source: Any) -> Any:
    """A path holding ``source`` (a path already, or bytes written to a private file)."""
    if isinstance(source, str | os.PathLike):
        yield os.fspath(source)
        return
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="zmqmodels-", suffix=".pt2") as f:
        f.write(source)
        f.flush()
        yield f.name


def apply_weights(previous: Loaded, manifest: Manifest, path: str | os.PathLike[str], *,
                  into: Any = None, shared: str | os.PathLike[str] | None = None,
                  batch_known: tuple[int, str] | None = None) -> Loaded | None:
    """``path`` holds the same code as ``previous`` (same module tree, dtypes, shapes), only
    other tensor bytes: put them into a module of that code, without ``torch.jit.load``, then
    check and warm it up as a load would. The serving module is never written. ``shared``
    (a file with ``path``'s verified bytes, or ``path`` itself; CPU only): the module's
    tensors are pointed at its mapping, each checked against its descriptor, instead of
    copying bytes; ``into`` (an idle spare module of that code whose tensors may alias the
    serving ones) is then the module, so nothing is copied at all. Otherwise the module is a
    copy of ``previous``'s. None if the code differs or the archive has a data tensor that is
    not a parameter or buffer (a full load is needed)."""
    import copy
    import zipfile

    import torch

    from ..protocol.tensors import torch_dtype
    from ..release.archive import code_digest, data_offset, storages, tensor_table

    t0 = time.perf_counter()
    path = os.fspath(path)
    if not _same_part(previous, manifest):
        return None  # another part of the release serves here (or none): the full load says which
    if isinstance(previous.module, Pt2Module):
        return _apply_pt2(previous, manifest, path, into, shared, batch_known)
    try:
        if not previous.code or code_digest(path) != previous.code:
            return None
        table = tensor_table(path)
        if storages(path) != {t.storage for t in table}:
            return None  # data no parameter or buffer holds: only a load puts it where it belongs
        # a spare's tensors may alias the serving module's: it is only ever re-pointed at the
        # new mapping, never written into
        mapped = into is not None and shared is not None and previous.device.startswith("cpu") and \
            map_shared(into, manifest, shared) > 0
        module = into if mapped else copy.deepcopy(previous.module)
        if not mapped and shared is not None and previous.device.startswith("cpu"):
            mapped = map_shared(module, manifest, shared) > 0
        own = dict(module.named_parameters())
        own.update(dict(module.named_buffers()))
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, \
                zipfile.ZipFile(f) as z, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # frombuffer: read-only memory, only read
            for t in table:
                target = own.get(t.name)
                if target is None or tuple(target.shape) != t.shape:
                    return None
                if mapped:
                    continue  # its bytes are the mapping's, checked against the descriptor
                start = data_offset(mm, z.getinfo(t.storage))
                src = torch.frombuffer(mm, dtype=torch_dtype(t.dtype), count=t.numel,
                                       offset=start + t.offset * (t.nbytes // max(t.numel, 1)))
                target.copy_(src.view(t.shape))  # host -> device directly on a GPU worker
                del src
    except (ZmqModelsError, RuntimeError, ValueError, KeyError, OSError, BufferError, zipfile.BadZipFile):
        return None  # anything unexpected: the full load decides
    loaded = _checked(module, manifest, previous.device, time.perf_counter() - t0, previous.code, "apply",
                      batch_known=batch_known)
    return replace(loaded, shared_bytes=manifest_bytes(manifest)) if mapped else loaded


def _same_part(previous: Loaded, manifest: Manifest) -> bool:
    """Whether ``manifest`` is served here by the same part (format) as ``previous``."""
    from .pt2 import serve_format

    try:
        return serve_format(manifest, previous.device) == previous.format
    except CheckError:
        return False


def _apply_pt2(previous: Loaded, manifest: Manifest, path: str, into: Any,
               shared: str | os.PathLike[str] | None, batch_known: tuple[int, str] | None) -> Loaded | None:
    """:func:`apply_weights` for a pt2 package: ``into`` (a spare runner of the package,
    loaded once with the first release of this code, or else a new one: never a recompile)
    is bound to the new file's tensors and checked; the serving runner is never touched."""
    from ..release.archive import code_digest
    from .pt2 import mapped_views

    t0 = time.perf_counter()
    try:
        if not previous.code or code_digest(path) != previous.code:
            return None
    except (ZmqModelsError, OSError, ValueError):
        return None
    views = mapped_views(manifest, os.fspath(shared) if shared is not None else path)
    if views is None:
        return None
    module = into if isinstance(into, Pt2Module) else previous.module.spare()
    module.bind(views.tensors, views)
    loaded = _checked(module, manifest, previous.device, time.perf_counter() - t0, previous.code, "apply",
                      batch_known=batch_known)
    return replace(loaded, shared_bytes=views.nbytes if previous.device.startswith("cpu") else 0)


def manifest_bytes(manifest: Manifest) -> int:
    return sum(t.nbytes for t in manifest.tensors)


def share_weights(loaded: Loaded, path: str | os.PathLike[str]) -> int:
    """Point the parameters and buffers of ``loaded`` (a CPU module) at ``path``, the verified
    archive in the node's cache, mapped copy-on-write: the node's K workers then hold one copy
    of the weights between them (the page cache's), not K. Every tensor's bytes are
    checked against the manifest's descriptor first; any mismatch leaves the module as it
    was. Returns the bytes now shared (0: nothing changed)."""
    if not loaded.device.startswith("cpu"):
        return 0
    if isinstance(loaded.module, Pt2Module):  # bound to its cache file's bytes when loaded
        return loaded.shared_bytes
    return map_shared(loaded.module, loaded.manifest, path)


def alias_tensors(module: Any, like: Any) -> None:
    """Point ``module``'s parameters and buffers at ``like``'s (same tree): an idle spare then
    holds no bytes of its own."""
    import torch

    if isinstance(module, Pt2Module):
        module.bind(like.views.tensors, like.views)
        return
    theirs = dict(like.named_parameters())
    theirs.update(dict(like.named_buffers()))
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            other = theirs.get(name)
            if other is not None and other.dtype == t.dtype:
                t.data = other.data


def spare_of(module: Any) -> Any:
    """A second module of ``module``'s code whose tensors alias ``module``'s: its tree is
    copied with every tensor emptied first, so no weight byte is copied (a plain deepcopy of
    a ScriptModule copies them all, holding the GIL). Only for a module nobody runs yet."""
    import copy

    import torch

    if isinstance(module, Pt2Module):
        return module.spare()
    own = [*module.named_parameters(), *module.named_buffers()]
    kept = [t.data for _, t in own]
    with torch.no_grad():
        for _, t in own:
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        try:
            spare = copy.deepcopy(module)
        finally:
            for (_, t), data in zip(own, kept, strict=True):
                t.data = data
    alias_tensors(spare, module)
    return spare


def map_shared(module: Any, m: Manifest, path: str | os.PathLike[str]) -> int:
    """:func:`share_weights` for a bare CPU module holding release ``m``'s tree."""
    import torch

    from .pt2 import mapped_views

    if not m.tensors:
        return 0
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    for t in m.tensors:  # the module's tree first: no byte is read for a module it does not fit
        target = own.get(t.name)
        if target is None or list(target.shape) != t.shape or not target.is_contiguous() or \
                str(target.dtype).removeprefix("torch.") != t.dtype:
            return 0
    views = mapped_views(m, path)  # each checked against its descriptor
    if views is None:
        return 0  # the mapping stays referenced only by what already uses it: none
    with torch.no_grad():
        for name, view in views.tensors.items():
            if view.numel():
                own[name].data = view  # the module's own tensor, now backed by the mapping
    return views.nbytes


def _checked(module: Any, manifest: Manifest, device: str, load_s: float, code: str, how: str,
             warmup: int = 2, batch_known: tuple[int, str] | None = None) -> Loaded:
    """Check ``module`` on the manifest's examples and warm it up. ``batch_known``: the
    outcome of the batch-claim check already made on this device for this code and claim
    (not run again)."""
    import torch

    from .batching import check_batched
    from .compile import compare_outputs
    from .trees import check_finite

    t1 = time.perf_counter()
    examples = unpack_tensors(manifest.examples) if manifest.examples else []
    expected = unpack_tensors(manifest.expected) if manifest.expected else []
    gpu = not device.startswith("cpu")
    # GPU kernels (TF32, other reductions) differ from the CPU that recorded the outputs
    tol: dict[str, float] = {"rtol": 1e-3, "atol": 1e-3} if gpu else {}
    with torch.inference_mode():
        for i, (ex, want) in enumerate(zip(examples, expected, strict=False)):
            try:
                got = module(*to_device(tuple(ex), device))
                time.sleep(0)  # a pt2 forward holds the GIL: let the serving thread in between
            except Exception as exc:
                raise CheckError(f"example {i}: model raised: {str(exc).strip()[:300]}") from None
            got = to_device(got, "cpu")
            check_finite(got, f"example {i} out")
            try:
                compare_outputs(want, got, path=f"example {i} out", **tol)
            except ZmqModelsError as exc:
                raise CheckError(str(exc)) from None
        batch, note = batch_known if batch_known is not None else check_batched(
            lambda args: to_device(module(*to_device(args, device)), "cpu"), examples, expected,
            manifest.batch, device, tol)
        # an AOTInductor package has nothing to warm (no profiling executor), and its forwards
        # hold the GIL, stalling a one-worker node's serving thread: none for it
        for _ in range(warmup if examples and not isinstance(module, Pt2Module) else 0):
            module(*to_device(tuple(examples[0]), device))
        if gpu:
            torch.cuda.synchronize(device)
    from ..protocol.tensors import torch_dtype

    # (dtype, rank, dtype name, shape): -1 where the examples differ, and always for the
    # leading (batch) dimension, which one example cannot be taken to fix
    sig = tuple((torch_dtype(w.get("dtype")), w.get("rank", -1), w.get("dtype", ""),
                 tuple([-1, *list(w.get("shape") or [])[1:]]) if w.get("shape") else ())
                for w in manifest.inputs)
    return Loaded(module, manifest, device, load_s, time.perf_counter() - t1, sig, code, how,
                  batch=batch, batch_note=note,
                  format="pt2" if isinstance(module, Pt2Module) else "torchscript")
