"""Releases: a TorchScript archive cut into independently decompressible blosc2 chunks,
plus the :class:`Manifest` (the version headers) that says what it is.

The manifest travels as msgpack (a map, so unknown fields appended by newer senders are
ignored by older receivers). Its digests: ``archive_sha256`` is the archive's identity (what
a signature binds); ``chunk_xxh3`` holds the XXH3-64 (seed 0) of each chunk *as sent*, so a
receiver rejects a corrupt chunk before decompressing it.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from .. import defaults
from ..errors import IntegrityError, LimitError, ReleaseError
from .archive import TensorDesc

__all__ = [
    "CodecSpec",
    "TensorPack",
    "Manifest",
    "Release",
    "Shifted",
    "CODECS",
    "RELEASE_FORMATS",
    "FILTERS",
    "validate_name",
    "manifest_frames",
    "stage_release",
    "choose_codec",
    "compress_archive",
    "span_digests",
    "decompress_chunk",
    "encode_manifest",
    "decode_manifest",
    "rollback_manifest",
    "pack_tensors",
    "unpack_tensors",
]

# blosc2's enum member names; blosc2 itself (0.3 s to import) is imported only to compress or
# decompress, so a process that moves releases without opening them (the CLI publishing a
# built release, status) never pays for it.
CODECS = {"none": None, "lz4": "LZ4", "lz4hc": "LZ4HC", "zstd": "ZSTD", "blosclz": "BLOSCLZ",
          "zlib": "ZLIB"}
MAX_BATCH_CLAIM = 1 << 16
RELEASE_FORMATS = ("torchscript", "pt2", "torchscript+pt2")
MAX_DEVICES = 8  # device kinds one pt2 package may name
FILTERS = {"none": "NOFILTER", "shuffle": "SHUFFLE", "bitshuffle": "BITSHUFFLE"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def validate_name(name: str) -> str:
    """Model names appear in topics and file names: 1-128 of ``[A-Za-z0-9._-]``, no leading dot."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ReleaseError(f"invalid model name {name!r}: use 1-128 of A-Z a-z 0-9 . _ -")
    return name


class CodecSpec(msgspec.Struct, frozen=True):
    """How each chunk is compressed. ``name == "none"`` means chunks are raw archive bytes."""

    name: str = "none"
    clevel: int = 0
    filter: str = "none"
    typesize: int = 1


class TensorPack(msgspec.Struct, frozen=True):
    """A tensor tree inline: the spec of :mod:`zmqmodels.protocol.tensors` and its buffers."""

    spec: Any
    buffers: list[bytes]


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The version headers of one release (``docs/protocol.md`` §Manifest)."""

    v: int = defaults.PROTOCOL_VERSION
    name: str
    label: str
    seq: int = 0  # assigned by the store; 0 = not yet stored
    created_at: float
    archive_sha256: str
    archive_bytes: int
    compressed_bytes: int
    codec: CodecSpec
    chunk_bytes: int
    chunk_count: int
    chunk_sizes: list[int]
    chunk_xxh3: list[int]
    torch_version: str
    # XXH3-64 (seed 0) of each chunk's span of the *uncompressed* archive (empty: not given): a
    # receiver that holds an archive with the same bytes in a span reuses them (§Deltas)
    chunk_raw_xxh3: list[int] = []
    # SHA-256 of every archive entry but tensor data (archive.code_digest: same value = same
    # code, module tree, dtypes and shapes) and each tensor's place; "" and []: not given
    code_sha256: str = ""
    tensors: list[TensorDesc] = []
    compile_method: str
    compile_warnings: list[str] = []
    inputs: list[Any] = []  # per positional argument: {"dtype", "rank", "shape" (-1 = varies)}
    outputs: Any = None  # signature of the first example's output
    parameter_count: int = 0
    parameter_bytes: int = 0
    examples: TensorPack | None = None  # a list of examples, each a tuple of arguments
    expected: TensorPack | None = None  # the compiled module's output on each example
    metadata: dict[str, str] = {}
    signer: str = ""  # hex Ed25519 public key that signs these bytes; empty = unsigned
    staged: bool = False  # distribute and cache, but serve only once activated (ACTIVATE)
    # the largest batch the examples proved batch-invariant along batch_dim (0: serve one
    # request per forward; batching.prove_batching)
    batch: int = 0
    batch_dim: int = 0
    # what the archive is (docs/protocol.md §Formats): "torchscript", "pt2" (an AOTInductor
    # package with its weights as entries) or "torchscript+pt2" (the package an extra file of
    # the TorchScript archive); devices: the device kinds the pt2 package was compiled for
    format: str = "torchscript"
    devices: list[str] = []

    def check(self, limits: Any = None) -> Manifest:
        """Raise :class:`ReleaseError`/:class:`LimitError` unless sizes are consistent and bounded."""
        max_archive = getattr(limits, "max_archive_bytes", defaults.MAX_ARCHIVE_BYTES)
        max_chunks = getattr(limits, "max_chunks", defaults.MAX_CHUNKS)
        max_chunk = getattr(limits, "max_chunk_bytes", defaults.MAX_CHUNK_BYTES)
        validate_name(self.name)
        if self.v != defaults.PROTOCOL_VERSION:
            raise ReleaseError(f"protocol version {self.v} is not {defaults.PROTOCOL_VERSION}")
        if not 0 <= self.archive_bytes <= max_archive:
            raise LimitError(f"archive of {self.archive_bytes} bytes exceeds {max_archive}")
        if not 0 < self.chunk_bytes <= max_chunk or self.chunk_count > max_chunks:
            raise LimitError(f"chunking {self.chunk_count} x {self.chunk_bytes} exceeds the limits")
        if self.chunk_count != -(-self.archive_bytes // self.chunk_bytes):
            raise ReleaseError("chunk_count does not match archive_bytes / chunk_bytes")
        if len(self.chunk_sizes) != self.chunk_count or len(self.chunk_xxh3) != self.chunk_count:
            raise ReleaseError("chunk_sizes / chunk_xxh3 do not have chunk_count entries")
        if self.chunk_raw_xxh3 and len(self.chunk_raw_xxh3) != self.chunk_count:
            raise ReleaseError("chunk_raw_xxh3 does not have chunk_count entries")
        bound = self.chunk_bytes + 64 * 1024  # blosc2 never expands a chunk by more than its header
        if any(not 0 <= s <= bound for s in self.chunk_sizes) or sum(self.chunk_sizes) != \
                self.compressed_bytes:
            raise ReleaseError("chunk sizes are out of range or do not add up")
        if self.codec.name not in CODECS or self.codec.filter not in FILTERS:
            raise ReleaseError(f"unknown codec {self.codec.name}/{self.codec.filter}")
        if any(t.start < 0 or t.nbytes < 0 or t.start + t.nbytes > self.archive_bytes
               for t in self.tensors):
            raise ReleaseError("a tensor descriptor points outside the archive")
        if len(self.archive_sha256) != 64:
            raise ReleaseError("archive_sha256 must be 64 hex digits")
        if self.signer and len(self.signer) != 64:
            raise ReleaseError("signer must be 64 hex digits")
        if self.format not in RELEASE_FORMATS:
            raise ReleaseError(f"unknown release format {self.format!r}: one of {', '.join(RELEASE_FORMATS)}")
        if ("pt2" in self.format) != bool(self.devices) or len(self.devices) > MAX_DEVICES or \
                any(not isinstance(d, str) or not d.isalnum() for d in self.devices):
            raise ReleaseError("devices must name the device kinds of a pt2 package, and only then")
        if not 0 <= self.batch <= MAX_BATCH_CLAIM or self.batch_dim != 0:
            raise ReleaseError(f"batch must be 0..{MAX_BATCH_CLAIM} along dim 0")
        return self

    def chunk_span(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index`` in the uncompressed archive."""
        start = index * self.chunk_bytes
        return start, min(self.chunk_bytes, self.archive_bytes - start)

    def same_span(self, base: Manifest, index: int) -> bool:
        """Chunk ``index`` covers the same archive bytes, at the same place, as ``base``'s:
        both give span digests (``chunk_raw_xxh3``), the span is the same and so is its digest.
        The one rule for "is chunk i unchanged" (the hub leaving chunks out, patches, the delta
        line); a node asks it of the archive it holds (:meth:`Assembly.reuse`)."""
        return (index < min(len(self.chunk_raw_xxh3), len(base.chunk_raw_xxh3))
                and base.chunk_span(index) == self.chunk_span(index)
                and base.chunk_raw_xxh3[index] == self.chunk_raw_xxh3[index])


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(Manifest)


def encode_manifest(m: Manifest) -> bytes:
    return _ENC.encode(m)


def decode_manifest(data: Any, limits: Any = None, *, check: bool = True) -> Manifest:
    """Decode and (unless ``check=False``) :meth:`~Manifest.check` a manifest; every failure
    is a :class:`ReleaseError`."""
    max_bytes = getattr(limits, "max_manifest_bytes", defaults.MAX_MANIFEST_BYTES)
    if len(data) > max_bytes:
        raise LimitError(f"manifest of {len(data)} bytes exceeds {max_bytes}")
    try:
        m = _DEC.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"bad manifest: {exc}") from None
    return m.check(limits) if check else m


def manifest_frames(payload: Sequence[Any], limits: Any = None) -> tuple[Manifest, bytes, bytes]:
    """``(manifest, its bytes as received, signature)`` from a MANIFEST message's payload
    frames (``zmq.Frame``), decoded under ``limits``; the receiver checks it before it
    allocates anything for the release."""
    m = decode_manifest(payload[0].buffer, limits, check=False)
    return m, payload[0].bytes, payload[1].bytes if len(payload) > 1 else b""


def rollback_manifest(old: Manifest) -> Manifest:
    """The manifest of a rollback to ``old``: the same content, a new time, seq 0 until stored
    or sealed, unsigned, and ``rollback_of`` naming the seq it restores."""
    meta = {**old.metadata, "rollback_of": str(old.seq)}
    return msgspec.structs.replace(old, seq=0, created_at=time.time(), metadata=meta, signer="",
                                   staged=False)


def stage_release(release: Release) -> Release:
    """``release`` published *staged*: nodes receive, verify and cache it, and serve it only
    once activated. The flag is part of the signed manifest, so a signed release must have
    been signed staged."""
    if release.manifest.staged:
        return release
    if release.signature:
        raise ReleaseError(f"{release.manifest.name}: a signed release cannot be staged afterwards: "
                           "sign it staged (publish --staged with --key)")
    return Release(msgspec.structs.replace(release.manifest, staged=True), release.chunks)


def pack_tensors(tree: Any) -> TensorPack:
    from ..protocol.tensors import encode

    spec, bufs = encode(tree)
    return TensorPack(spec, [bytes(b) for b in bufs])


def unpack_tensors(pack: TensorPack) -> Any:
    from ..protocol.tensors import decode

    return decode(pack.spec, pack.buffers, copy=True)


@dataclass(frozen=True)
class Release:
    """A manifest and its chunk payloads (compressed as the manifest says).

    ``raw`` is the manifest exactly as signed or received and ``signature`` its detached
    Ed25519 signature (empty: unsigned). Whoever passes a release on sends ``raw``, never a
    re-encoding, so the signature keeps verifying (:mod:`zmqmodels.release.signing`).
    """

    manifest: Manifest
    chunks: Sequence[Any]  # bytes-like, one per chunk
    raw: Any = None  # bytes-like; None: encode_manifest(manifest)
    signature: bytes = b""
    # chunks a sender may broadcast as a difference against its previous release (patch.py)
    patches: Mapping[int, tuple[int, Any]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the builder found worth a line (the batching proof)

    @property
    def manifest_bytes(self) -> Any:
        return encode_manifest(self.manifest) if self.raw is None else self.raw

    def verify(self) -> None:
        """Check every chunk and the archive sha256, streaming through one chunk-sized buffer
        (a hub verifies a 1 GB release in 4 MiB of extra memory)."""
        m = self.manifest
        if len(self.chunks) != m.chunk_count:
            raise ReleaseError(f"{len(self.chunks)} chunks, manifest says {m.chunk_count}")
        scratch = memoryview(bytearray(m.chunk_bytes))
        sha = hashlib.sha256()
        for i, payload in enumerate(self.chunks):
            start, length = m.chunk_span(i)
            window = scratch[:length]
            # decompress_chunk writes at the chunk's archive offset; shift the window to match
            decompress_chunk(m, i, payload, Shifted(window, start))
            sha.update(window)
        if sha.hexdigest() != m.archive_sha256:
            raise IntegrityError(f"{m.name} seq {m.seq}: archive sha256 mismatch")

    def archive(self) -> bytearray:
        """Decompress and verify every chunk into one buffer; check the archive sha256."""
        m = self.manifest
        buf = bytearray(m.archive_bytes)
        view = memoryview(buf)
        for i, payload in enumerate(self.chunks):
            decompress_chunk(m, i, payload, view)
        if hashlib.sha256(buf).hexdigest() != m.archive_sha256:
            raise IntegrityError(f"{m.name} seq {m.seq}: archive sha256 mismatch")
        return buf


class Shifted:
    """Looks like the whole archive to :func:`decompress_chunk` but maps onto one window."""

    def __init__(self, window: memoryview, offset: int) -> None:
        self.window, self.offset = window, offset

    def __getitem__(self, s: slice) -> memoryview:
        return self.window[s.start - self.offset:s.stop - self.offset]


def decompress_chunk(m: Manifest, index: int, payload: Any, archive: Any) -> None:
    """Verify chunk ``index`` and decompress it into its slice of ``archive``."""
    if not 0 <= index < m.chunk_count:
        raise ReleaseError(f"chunk index {index} out of range 0..{m.chunk_count - 1}")
    if len(payload) != m.chunk_sizes[index] or xxhash.xxh3_64_intdigest(payload) != m.chunk_xxh3[index]:
        raise IntegrityError(f"chunk {index} of {m.name} seq {m.seq}: size or digest mismatch")
    start, length = m.chunk_span(index)
    dst = archive[start:start + length]
    if m.codec.name == "none":
        if len(payload) != length:
            raise IntegrityError(f"raw chunk {index} has {len(payload)} bytes, expected {length}")
        dst[:] = payload
        return
    import blosc2

    try:
        nbytes, _, _ = blosc2.get_cbuffer_sizes(payload)
    except Exception as exc:
        raise IntegrityError(f"chunk {index}: not a blosc2 chunk ({exc})") from None
    if nbytes != length:  # checked before decompressing: no decompression bombs
        raise IntegrityError(f"chunk {index} decompresses to {nbytes} bytes, expected {length}")
    try:
        blosc2.decompress2(payload, dst=dst)
    except Exception as exc:
        raise IntegrityError(f"chunk {index}: blosc2 failed ({exc})") from None


def span_digests(archive: Any, chunk_bytes: int) -> list[int]:
    """XXH3-64 of each ``chunk_bytes`` span of the uncompressed archive (``chunk_raw_xxh3``)."""
    view = memoryview(archive).cast("B")
    return [xxhash.xxh3_64_intdigest(view[i:i + chunk_bytes]) for i in range(0, len(view), chunk_bytes)]


def compress_archive(archive: Any, codec: CodecSpec, chunk_bytes: int,
                     progress: Callable[[int, int], None] | None = None) -> list[bytes | memoryview]:
    """Cut the archive into chunks and compress each one independently (``progress(done,
    total)`` after each chunk). One blosc2 thread per chunk: with two, blosc2 writes blocks in
    the order they finish, so equal bytes compressed twice differed and no delta could leave
    out a chunk a rebuilt release shares with its base (deltas compare compressed chunks)."""
    view = memoryview(archive).cast("B")
    pieces = [view[i:i + chunk_bytes] for i in range(0, len(view), chunk_bytes)]
    if codec.name == "none":
        return list(pieces)
    import blosc2

    kw = dict(codec=blosc2.Codec[CODECS[codec.name]], clevel=codec.clevel,
              filters=[blosc2.Filter[FILTERS[codec.filter]]],
              filters_meta=[0], typesize=codec.typesize, nthreads=1)
    out = []
    for p in pieces:
        out.append(blosc2.compress2(p, **kw))
        if progress is not None:
            progress(len(out), len(pieces))
    return out


def choose_codec(archive: Any, typesize: int, chunk_bytes: int = defaults.CHUNK_BYTES) -> CodecSpec:
    """``auto``: try a few codecs on a sample of the archive; keep the best ratio per second
    unless it saves less than ``AUTO_MIN_GAIN`` (dense fp32 weights barely compress)."""
    view = memoryview(archive).cast("B")
    step = max(chunk_bytes, len(view) // max(1, defaults.AUTO_SAMPLE_BYTES // chunk_bytes))
    sample = [view[i:i + chunk_bytes] for i in range(0, len(view), step)]
    sample = sample[: max(1, defaults.AUTO_SAMPLE_BYTES // chunk_bytes)]
    total = sum(len(s) for s in sample) or 1
    candidates = [CodecSpec("lz4", 5, "bitshuffle", typesize), CodecSpec("lz4", 5, "shuffle", typesize),
                  CodecSpec("zstd", 1, "shuffle", typesize)]
    best, best_gain = CodecSpec(), 1.0
    for c in candidates:
        size = sum(len(x) for x in compress_archive(b"".join(sample), c, chunk_bytes))
        gain = total / max(size, 1)
        if gain > best_gain * 1.02:  # a slower codec must win by more than noise
            best, best_gain = c, gain
    return best if best_gain >= defaults.AUTO_MIN_GAIN else CodecSpec()
