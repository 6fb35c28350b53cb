"""The second release format: a ``torch.export`` program compiled by AOTInductor (``pt2``).

TorchScript is deprecated (torch 2.11 on); its successor is ``torch.export`` + AOTInductor:
``aoti_compile_and_package`` writes a ``.pt2`` (a zip holding generated C++ and a shared object),
``aoti_load_package`` (Python) and ``torch::inductor::AOTIModelPackageLoader`` (C++) load it.

The package is compiled with ``aot_inductor.package_constants_in_so = False``: it holds the code
and no weight. The release's archive is that package with one more entry per weight
(``model/data/N``, stored, 64-byte aligned) and ``model/zmq/constants.json`` naming each (name,
dtype, shape, entry): the tensors are described in the manifest exactly as a TorchScript
archive's (``release.archive.describe_tensors``), so deltas, patches, weight-only publishes and
one shared copy per node work alike. A node binds the weights with ``load_constants(...,
user_managed=True)`` to views of the verified cache file: no copy, and a weight-only update is
a second runner of the same package (loaded once, never recompiled) bound to the new file's
views, checked on the examples and swapped in like any model.

A release may carry both formats (``torchscript+pt2``): the TorchScript archive, with the
package (no weights) as its extra file ``extra/aoti.pt2``; the runner is bound to the
TorchScript tensors by name. ``docs/protocol.md`` §Formats says it for outside clients.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import struct
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CheckError, CompileError
from ..release.archive import PT2_CONSTANTS as CONSTANTS

__all__ = ["FORMATS", "Pt2Build", "Pt2Module", "parse_formats", "format_of", "serve_format",
           "export_program", "build_pt2", "container", "CONSTANTS", "DUAL_ENTRY", "device_kind"]

FORMATS = ("torchscript", "pt2")
TOP = "model"  # the package's top folder (aoti_compile_and_package names it after the file)
DUAL_ENTRY = "aoti.pt2"  # the package's name among a TorchScript archive's extra files
_ALIGN = 64
_PAD_ID = 0x7A6D  # "zm": the extra field that aligns a weight entry's bytes


def parse_formats(values: Iterable[str]) -> tuple[str, ...]:
    """``["torchscript", "pt2"]`` or ``["torchscript,pt2"]`` -> the formats in canonical order;
    :class:`CompileError` for an unknown one or none."""
    given = {v.strip() for item in values for v in item.split(",") if v.strip()}
    unknown = sorted(given - set(FORMATS))
    if unknown:
        raise CompileError(f"unknown format {', '.join(unknown)}: use torchscript, pt2 or both")
    if not given:
        raise CompileError("no format: use torchscript, pt2 or both")
    return tuple(f for f in FORMATS if f in given)


def format_of(formats: Sequence[str]) -> str:
    """The manifest's ``format``: ``torchscript``, ``pt2`` or ``torchscript+pt2``."""
    return "+".join(f for f in FORMATS if f in formats)


def device_kind(device: str) -> str:
    """``cuda:1`` -> ``cuda``: what a package is compiled for."""
    return device.partition(":")[0]


def serve_format(manifest: Any, device: str) -> str:
    """The part of release ``manifest`` a node on ``device`` serves: its pt2 package when it was
    compiled for this device kind, else its TorchScript; :class:`CheckError` saying why when
    neither fits."""
    parts = manifest.format.split("+")
    if "pt2" in parts and device_kind(device) in manifest.devices:
        return "pt2"
    if "torchscript" in parts:
        return "torchscript"
    raise CheckError(f"{manifest.name} seq {manifest.seq}: its pt2 package was compiled for "
                     f"{', '.join(manifest.devices) or 'no device'}, this node runs {device}, and the "
                     "release carries no TorchScript (publish it with --format torchscript,pt2, or "
                     "compile the package on this kind of device)")


def _batch_of(example: tuple[Any, ...]) -> int:
    import torch

    first = next((a for a in example if isinstance(a, torch.Tensor) and a.dim()), None)
    return int(first.shape[0]) if first is not None else 0


MIN_TORCH = (2, 13)  # the oldest torch the pt2 format was tested on (load_constants' user_managed)


def require_torch() -> None:
    """:class:`CompileError` unless this torch is one the pt2 format was tested on."""
    import torch

    have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if have < MIN_TORCH:
        raise CompileError(f"the pt2 format needs torch >= {'.'.join(map(str, MIN_TORCH))} (this is "
                           f"{torch.__version__}): publish --format torchscript, or upgrade torch")


def export_program(module: Any, examples: Sequence[tuple[Any, ...]]) -> Any:
    """``torch.export`` of ``module`` on the example with the most rows, the leading dimension
    of every tensor argument left to the exporter (``Dim.AUTO``: dynamic where the code allows,
    so the package serves any batch size). A model that does not export is a
    :class:`CompileError` holding the exporter's message whole."""
    import torch

    from .trees import clone_tree

    require_torch()
    example = max(examples, key=_batch_of)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
                    for a in example)
    try:
        return torch.export.export(module, clone_tree(example), dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # the exporter raises many types; its message is the reason
        reason = str(exc).strip() or type(exc).__name__
        raise CompileError(f"torch.export failed ({type(exc).__name__}):\n{reason}") from exc


@dataclass
class Pt2Build:
    """An exported program compiled by AOTInductor: the package (code, no weight), the
    constants it needs by name, the devices it runs on, and the runner bound to them."""

    package: bytes
    constants: dict[str, Any]  # fqn -> tensor, in the package's order
    parameters: frozenset[str]
    devices: tuple[str, ...]
    module: Pt2Module
    export_s: float = 0.0
    aoti_s: float = 0.0


def build_pt2(module: Any, examples: Sequence[tuple[Any, ...]], program: Any = None) -> Pt2Build:
    """Export ``module`` (unless ``program`` is its export already) and compile it with
    AOTInductor for the device its weights are on, weights kept out of the shared object."""
    with warnings.catch_warnings():  # torch's own pytree deprecation, once per compile: not ours to show
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
        return _build_pt2(module, examples, program)


def _build_pt2(module: Any, examples: Sequence[tuple[Any, ...]], program: Any) -> Pt2Build:
    import torch

    t0 = time.perf_counter()
    ep = program if program is not None else export_program(module, examples)
    t1 = time.perf_counter()
    state = dict(ep.state_dict)
    state.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    device = next((str(t.device) for t in state.values()), "cpu")
    with tempfile.TemporaryDirectory(prefix="zmqmodels-aoti-") as d:
        try:
            path = torch._inductor.aoti_compile_and_package(
                ep, package_path=os.path.join(d, f"{TOP}.pt2"),
                inductor_configs={"aot_inductor.package_constants_in_so": False})
        except Exception as exc:
            reason = str(exc).strip() or type(exc).__name__
            raise CompileError(f"AOTInductor failed to compile the exported program:\n{reason}") from exc
        with open(path, "rb") as f:
            package = f.read()
        runner = Pt2Module(path, device)
    missing = sorted(set(runner.fqns) - set(state))
    if missing:
        raise CompileError(f"the compiled package needs constants the exported program does not hold: "
                           f"{', '.join(missing[:5])}")
    constants = {k: state[k].detach().contiguous() for k in runner.fqns}
    runner.bind(constants)
    params = frozenset(ep.graph_signature.parameters)
    return Pt2Build(package, constants, params, (device_kind(device),), runner, t1 - t0,
                    time.perf_counter() - t1)


def container(package: bytes, constants: Mapping[str, Any], parameters: frozenset[str]) -> memoryview:
    """The ``pt2`` release archive: ``package`` with each constant's bytes as a stored entry
    ``model/data/N`` (64-byte aligned) and ``model/zmq/constants.json`` describing them."""
    import torch

    from ..protocol.tensors import dtype_name

    buf = io.BytesIO(package)
    buf.seek(0, io.SEEK_END)
    table = []
    with zipfile.ZipFile(buf, "a", compression=zipfile.ZIP_STORED) as z:
        for i, (name, t) in enumerate(constants.items()):
            entry = f"{TOP}/data/{i}"
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
            info = zipfile.ZipInfo(entry, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            start = z.start_dir + 30 + len(entry.encode())
            pad = (-(start + 4)) % _ALIGN
            info.extra = struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
            z.writestr(info, data)  # a view: no copy of the weights before the archive's
            table.append({"name": name, "kind": "parameter" if name in parameters else "buffer",
                          "dtype": dtype_name(t.dtype), "shape": list(t.shape), "entry": entry})
        info = zipfile.ZipInfo(CONSTANTS, date_time=(1980, 1, 1, 0, 0, 0))
        z.writestr(info, json.dumps({"format": "pt2", "constants": table}, sort_keys=True).encode())
    return buf.getbuffer()


@dataclass
class _Views:
    """Tensors a runner's constants point at, and the mapping they view (kept alive)."""

    tensors: dict[str, Any]
    mapping: Any = None
    nbytes: int = 0


class Pt2Module:
    """An AOTInductor package loaded for ``device``, callable like a module. Its constants are
    the tensors last given to :meth:`bind`, which it holds (``user_managed``: the runner keeps
    pointers, so the tensors must outlive it)."""

    def __init__(self, path: str, device: str, folder: Any = None) -> None:
        import torch

        self.path, self.device, self._tensor = path, device, torch.Tensor
        self._dir = folder  # a TemporaryDirectory the package lies in, if it is the runner's
        if not path.endswith(".pt2"):  # the loader wants the suffix; a link in a private folder
            self._dir = tempfile.TemporaryDirectory(prefix="zmqmodels-pt2-")
            link = os.path.join(self._dir.name, f"{TOP}.pt2")
            os.symlink(os.path.abspath(path), link)
            path = link
        index = int(device.partition(":")[2] or 0) if device_kind(device) != "cpu" else -1
        try:
            require_torch()
            self.package = torch._inductor.aoti_load_package(path, device_index=index)
        except Exception as exc:
            raise CheckError(f"the pt2 package does not load: {str(exc).strip().splitlines()[0]}") from exc
        self.fqns: tuple[str, ...] = tuple(self.package.get_constant_fqns())
        self.views = _Views({})
        from torch.utils import _pytree

        self._unflatten = _pytree.tree_unflatten
        self._out_spec = _pytree.treespec_loads(self.package.loader.get_call_spec()[1])

    def __call__(self, *args: Any) -> Any:
        """The package on positional tensors: its runner directly, the output spec read once
        (the package's own ``__call__`` parses both specs on every call: 57 against 36 us a
        small MLP's forward here); anything else through ``__call__``."""
        if all(isinstance(a, self._tensor) for a in args):
            return self._unflatten(self.package.loader.boxed_run(list(args)), self._out_spec)
        return self.package(*args)

    def eval(self) -> Pt2Module:
        return self

    def bind(self, tensors: Mapping[str, Any], views: _Views | None = None) -> None:
        """Point the runner's constants at ``tensors`` (every one it needs, by name, on its
        device); :class:`CheckError` naming what does not fit."""
        missing = [n for n in self.fqns if n not in tensors]
        if missing:
            raise CheckError(f"the pt2 package needs constants the release does not hold: "
                             f"{', '.join(missing[:5])}")
        own = {n: tensors[n] for n in self.fqns}
        if device_kind(self.device) != "cpu":
            own = {n: t.to(self.device) for n, t in own.items()}
        try:
            self.package.load_constants(own, check_full_update=True, user_managed=True)
        except Exception as exc:
            raise CheckError(f"the pt2 package refused its constants: {str(exc).strip().splitlines()[0]}") \
                from exc
        self.views = views if views is not None else _Views(own)
        self.views.tensors = own

    def spare(self) -> Pt2Module:
        """A second runner of the same package (its own constant buffer), bound to the same
        tensors: a weight-only update binds it to the new ones while this one serves."""
        other = Pt2Module(self.path, self.device, self._dir)  # the folder lives while either does
        other.bind(self.views.tensors, self.views)
        return other

    def named_constants(self) -> dict[str, Any]:
        return dict(self.views.tensors)


def mapped_views(m: Any, path: str | os.PathLike[str], *, verify: bool = True) -> _Views | None:
    """Views of release ``m``'s tensors in ``path`` (its verified archive), mapped
    copy-on-write, each checked against its descriptor (size and XXH3; the XXH3 not with
    ``verify=False``: bytes this process just wrote); None if any does not match or the file
    cannot be mapped."""
    import torch
    import xxhash

    from ..protocol.tensors import torch_dtype

    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    out = {}
    for t in m.tensors:
        dtype = torch_dtype(t.dtype)
        numel = 1
        for d in t.shape:
            numel *= d
        if (dtype is None or t.start + t.nbytes > len(mm) or t.nbytes != numel * dtype.itemsize
                or verify and xxhash.xxh3_64_intdigest(memoryview(mm)[t.start:t.start + t.nbytes]) != t.xxh3):
            return None
        out[t.name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=t.start).view(t.shape) \
            if numel else torch.empty(t.shape, dtype=dtype)
    return _Views(out, mm, sum(t.nbytes for t in m.tensors))


def open_pt2(manifest: Any, path: str, device: str, *, verify: bool = True) -> tuple[Pt2Module, int]:
    """The pt2 part of release ``manifest`` in ``path`` (its verified archive) loaded for
    ``device`` and bound to the archive's own tensor bytes: ``(module, bytes shared)``."""
    package_path, folder = path, None
    if manifest.format != "pt2":  # torchscript+pt2: the package is an extra file of the archive
        with zipfile.ZipFile(path) as z:
            entry = next((n for n in z.namelist() if n.endswith(f"/extra/{DUAL_ENTRY}")), None)
            if entry is None:
                raise CheckError(f"{manifest.name} seq {manifest.seq}: says {manifest.format} "
                                 f"but holds no extra/{DUAL_ENTRY}")
            # the runner's (removed with it): a spare runner loads the package from there again
            folder = tempfile.TemporaryDirectory(prefix="zmqmodels-pt2-")
            package_path = os.path.join(folder.name, f"{TOP}.pt2")
            with open(package_path, "wb") as out:
                out.write(z.read(entry))
    module = Pt2Module(package_path, device, folder)
    views = mapped_views(manifest, path, verify=verify)
    if views is None:
        raise CheckError(f"{manifest.name} seq {manifest.seq}: a tensor's bytes do not match the "
                         "manifest's descriptor")
    module.bind(views.tensors, views)
    return module, views.nbytes if device_kind(device) == "cpu" else 0

