"""What a TorchScript archive holds, read without torch: each parameter's and buffer's name,
dtype, shape and where its bytes are.

An archive is a zip: ``data.pkl`` pickles the module tree (objects of the scripted classes,
tensors as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``, storages
as persistent ids ``('storage', torch.FloatStorage, key, location, numel)`` whose bytes are
``data/KEY``), and ``code/`` holds each class's source, which lists its ``__parameters__``
and ``__buffers__``. The pickle is read with an unpickler that builds only inert stand-ins
for those few globals and refuses every other one: nothing in the archive runs.
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ..errors import ReleaseError

__all__ = ["TensorInfo", "tensor_table", "tensor_spans", "data_offset", "set_crcs", "code_digest",
           "describe_tensors", "storages", "TensorDesc",
           "PT2_CONSTANTS", "read_constants"]

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
_CLASS = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n)*)", re.M)
_LIST = re.compile(r"^  __(parameters|buffers)__ = (\[.*\])$", re.M)


@dataclass(frozen=True)
class TensorInfo:
    name: str  # dotted, as named_parameters() says it
    kind: str  # "parameter" or "buffer"
    dtype: str
    shape: tuple[int, ...]
    storage: str  # the archive entry of its bytes (data/KEY)
    offset: int  # in elements, into that storage

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]


class TensorDesc(msgspec.Struct, frozen=True):
    """One parameter or buffer of the archive: its bytes are ``archive[start:start + nbytes]``
    (contiguous, little-endian), ``xxh3`` their XXH3-64 (seed 0)."""

    name: str
    dtype: str
    shape: list[int]
    start: int
    nbytes: int
    xxh3: int


class _Storage:
    def __init__(self, dtype: str, key: str) -> None:
        self.dtype, self.key = dtype, key


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], *_rest: Any) -> None:
        self.storage, self.offset, self.size = storage, offset, tuple(size)


class _Object:
    """An instance of a scripted class; ``qualname`` names it, ``state`` holds its attributes."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _Tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list  # typed lists: build_intlist, build_tensorlist, ...
        if module == "torch.jit._pickle" and name == "restore_type_tag":
            return lambda value, _type: value
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module.startswith("__torch__"):
            qual = f"{module}.{name}"
            if qual not in self._classes:
                self._classes[qual] = type(name, (_Object,), {"qualname": qual})
            return self._classes[qual]
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a TorchScript archive")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        return _Storage(pid[1].dtype, str(pid[2]))


def _members(z: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list[str], list[str]]]:
    """qualname -> (parameters, buffers), from the classes' source in ``code/``."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for entry in z.namelist():
        if not (entry.startswith(prefix + "code/") and entry.endswith(".py")):
            continue
        module = entry[len(prefix + "code/"):-3].replace("/", ".")
        for m in _CLASS.finditer(z.read(entry).decode("utf-8", "replace")):
            lists = {k: ast.literal_eval(v) for k, v in _LIST.findall(m.group(2))}
            out[f"{module}.{m.group(1)}"] = (list(lists.get("parameters", [])),
                                             list(lists.get("buffers", [])))
    return out


def tensor_table(archive: Any) -> list[TensorInfo]:
    """The parameters, then the buffers, of a TorchScript archive (bytes, a buffer or a path),
    in ``named_parameters()`` / ``named_buffers()`` order; the constants of a ``pt2`` archive
    in its table's order. :class:`ReleaseError` if it is not one this reader understands."""
    source = archive if isinstance(archive, str) else _Reader(archive)
    try:
        with zipfile.ZipFile(source) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None and PT2_CONSTANTS in z.namelist():
                return _pt2_table(z)
            if pkl is None:
                raise ReleaseError("not a TorchScript archive: no data.pkl")
            prefix = pkl[: -len("data.pkl")]
            root = _Unpickler(z.read(pkl)).load()
            members = _members(z, prefix)
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, SyntaxError) as exc:
        raise ReleaseError(f"not a TorchScript archive this reader understands: {exc}") from None
    params: list[TensorInfo] = []
    buffers: list[TensorInfo] = []

    def walk(obj: _Object, path: str, depth: int) -> None:
        if depth > 64:
            raise ReleaseError("module tree nested too deeply")
        own_p, own_b = members.get(obj.qualname, ([], []))
        state = getattr(obj, "state", {})
        for names, kind, out in ((own_p, "parameter", params), (own_b, "buffer", buffers)):
            for n in names:
                t = state.get(n)
                if isinstance(t, _Tensor):  # None: an optional parameter left unset
                    out.append(TensorInfo(path + n, kind, t.storage.dtype, t.size,
                                          f"{prefix}data/{t.storage.key}", t.offset))
        for n, v in state.items():
            if isinstance(v, _Object):
                walk(v, f"{path}{n}.", depth + 1)

    if not isinstance(root, _Object):
        raise ReleaseError("not a TorchScript module archive")
    walk(root, "", 0)
    return params + buffers


PT2_CONSTANTS = "model/zmq/constants.json"  # a pt2 release archive's table of constants (model/pt2.py)


def _pt2_table(z: zipfile.ZipFile) -> list[TensorInfo]:
    """The constants of a ``pt2`` release archive (``model/pt2.py``), as its table says."""
    out = []
    for c in read_constants(z):
        if c["dtype"] not in _ITEMSIZE:
            raise ReleaseError(f"pt2 constant {c['name']} has an unknown dtype {c['dtype']!r}")
        out.append(TensorInfo(c["name"], str(c.get("kind", "buffer")), c["dtype"], tuple(c["shape"]),
                              c["entry"], 0))
    return out


def read_constants(z: zipfile.ZipFile) -> list[dict[str, Any]]:
    """The constants table of a ``pt2`` archive (``model.pt2.container``); :class:`ReleaseError`
    if it is malformed."""
    import json

    try:
        table = json.loads(z.read(PT2_CONSTANTS))["constants"]
        for c in table:
            if not (isinstance(c["name"], str) and isinstance(c["dtype"], str) and isinstance(c["entry"], str)
                    and all(isinstance(d, int) and d >= 0 for d in c["shape"])):
                raise ValueError(f"bad entry {c!r:.80}")
    except (KeyError, ValueError, TypeError) as exc:
        raise ReleaseError(f"bad pt2 constants table: {exc}") from None
    return list(table)


class _Reader(io.RawIOBase):
    """A read-only, seekable file over a buffer, without the copy ``io.BytesIO`` makes (an
    archive is read three times while a release is described: 100 MB copied each time)."""

    def __init__(self, buf: Any) -> None:
        self._view, self._at = memoryview(buf).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: len(self._view)}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, b: Any) -> int:
        piece = self._view[self._at:self._at + len(b)]
        memoryview(b).cast("B")[:len(piece)] = piece
        self._at += len(piece)
        return len(piece)

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._at + size
        piece = bytes(self._view[self._at:end])
        self._at += len(piece)
        return piece


def _is_data(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


_NOT_CODE = (".data/serialization_id", ".debug_pkl")


def code_digest(archive: Any) -> str:
    """sha256 over every entry of the archive but the tensor data (``ARCHIVE/data/KEY``), the
    per-save random ``.data/serialization_id`` and the debug info (``*.debug_pkl``: source
    ranges for error messages, which shift when a loaded module is saved again): the code,
    the module tree with every tensor's dtype, shape and storage key, constants. Two archives
    with the same digest differ only in the bytes of their parameters, buffers and other data
    tensors. A pickle entry
    (``.pkl``) is hashed as ``pickletools.optimize`` leaves it: ``torch.jit.save`` of a module
    it loaded memoizes differently from the first save of the same module (same objects,
    other bytes), and that must not make one saved file a stranger to its own release. Names
    are hashed without their top folder, which ``torch.jit.save`` names after the file."""
    import hashlib
    import pickletools

    source = archive if isinstance(archive, str) else _Reader(archive)
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(source) as z:
            for info in sorted(z.infolist(), key=lambda i: i.filename):
                if _is_data(info.filename) or info.filename.endswith(_NOT_CODE):
                    continue
                data = z.read(info)
                if info.filename.endswith(".pkl"):
                    data = pickletools.optimize(data)
                name = info.filename.partition("/")[2]  # the top folder is the saved file's name
                h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
                h.update(data)
    except zipfile.BadZipFile as exc:
        raise ReleaseError(f"not a TorchScript archive: {exc}") from None
    return h.hexdigest()


def storages(archive: Any) -> set[str]:
    """The tensor data entries (``ARCHIVE/data/KEY``) of an archive."""
    source = archive if isinstance(archive, str) else _Reader(archive)
    with zipfile.ZipFile(source) as z:
        return {n for n in z.namelist() if _is_data(n)}


def data_offset(buf: Any, info: zipfile.ZipInfo) -> int:
    """Where a stored (uncompressed) zip entry's bytes start in the archive ``buf``."""
    import struct

    if info.compress_type != zipfile.ZIP_STORED:
        raise ReleaseError(f"{info.filename} is compressed; a TorchScript archive stores entries")
    name_len, extra_len = struct.unpack_from("<HH", buf, info.header_offset + 26)
    return int(info.header_offset + 30 + name_len + extra_len)


def tensor_spans(archive: Any) -> list[tuple[TensorInfo, int]]:
    """Each parameter and buffer of ``archive`` (bytes or a buffer) with the archive offset of
    its first byte: ``archive[start:start + info.nbytes]`` are its elements (contiguous)."""
    view = memoryview(archive).cast("B")
    table = tensor_table(view)
    with zipfile.ZipFile(_Reader(view)) as z:
        starts = {t.storage: data_offset(view, z.getinfo(t.storage)) for t in table}
        sizes = {t.storage: z.getinfo(t.storage).file_size for t in table}
    out = []
    for t in table:
        start = starts[t.storage] + t.offset * (t.nbytes // max(t.numel, 1))
        if start + t.nbytes > starts[t.storage] + sizes[t.storage]:
            raise ReleaseError(f"tensor {t.name} runs past the end of {t.storage}")
        out.append((t, start))
    return out


def set_crcs(buf: bytearray, spans: Sequence[tuple[int, int]]) -> None:
    """Recompute the CRC-32 of each stored entry of the zip in ``buf`` whose bytes overlap one
    of ``spans`` (``(start, end)``, overwritten in place): in its local header, its data
    descriptor and the central directory."""
    import struct
    import zlib

    view = memoryview(buf)
    with zipfile.ZipFile(io.BytesIO(view)) as z:
        infos = z.infolist()
        pos = z.start_dir  # the central directory's offset
    for info in infos:
        if struct.unpack_from("<I", buf, pos)[0] != 0x02014B50:
            raise ReleaseError("zip central directory is not where its end record says")
        n, e, c = struct.unpack_from("<HHH", buf, pos + 28)
        start = data_offset(view, info) if info.compress_type == zipfile.ZIP_STORED else -1
        if start >= 0 and any(a < start + info.file_size and b > start for a, b in spans):
            crc = zlib.crc32(view[start:start + info.file_size])
            if struct.unpack_from("<I", buf, info.header_offset + 14)[0] or not info.flag_bits & 0x08:
                struct.pack_into("<I", buf, info.header_offset + 14, crc)
            if info.flag_bits & 0x08:  # a data descriptor follows the bytes (torch writes one)
                at = start + info.compress_size
                at += 4 if struct.unpack_from("<I", buf, at)[0] == 0x08074B50 else 0
                struct.pack_into("<I", buf, at, crc)
            struct.pack_into("<I", buf, pos + 16, crc)
        pos += 46 + n + e + c
    view.release()


def describe_tensors(archive: Any) -> tuple[str, list[Any]]:
    """``(code_sha256, tensors)`` of a TorchScript archive; ``("", [])`` for one this reader
    does not understand (a release of it is served, only never updated by weights alone)."""
    import xxhash

    view = memoryview(archive).cast("B")
    try:
        spans = tensor_spans(view)
        code = code_digest(view)
    except ReleaseError:
        return "", []
    return code, [TensorDesc(t.name, t.dtype, list(t.shape), start, t.nbytes,
                             xxhash.xxh3_64_intdigest(view[start:start + t.nbytes]))
                  for t, start in spans]
