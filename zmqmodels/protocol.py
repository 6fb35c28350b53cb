"""Every wire message as a typed, validated struct; the one place that knows frame layouts.

``docs/protocol.md`` is the language-neutral spec this module implements. Headers are msgpack
maps (unknown keys are ignored, so fields may be appended); big bytes travel in their own frame.

PUB (hub -> nodes), frame 0 is the topic ``name + b"\\0"`` (``b"\\0"`` alone for the hub beat)::

    [topic, b"MANIFEST",  manifest, signature]
    [topic, b"CHUNK",     ChunkHeader, payload]
    [topic, b"HEARTBEAT", Heartbeat]

ROUTER (hub) <-> DEALER (node or CLI), without the ROUTER's identity frame::

    [b"FETCH_MANIFEST", FetchManifest]          -> [b"MANIFEST", manifest, signature] | ERROR
    [b"FETCH_CHUNKS",   FetchChunks]            -> [b"CHUNK", ChunkHeader, payload] x n | ERROR
    [b"REPORT",         Report]                 (no reply)
    [b"RESERVE",        Reserve]                -> [b"RESERVED", Reserved, base manifest] | ERROR
    [b"PUBLISH",        Publish, manifest, chunk x n] -> [b"PUBLISHED", Published] | ERROR
    [b"ROLLBACK",       Rollback (, manifest, signature)] -> [b"PUBLISHED", Published] | ERROR
    [b"STATUS",         StatusRequest]          -> [b"STATUS_REPLY", StatusReply] | ERROR
    any                                          -> [b"ERROR", ErrorReply]

``signature`` is the manifest's detached Ed25519 signature, empty when unsigned
(:mod:`zmqmodels.signing`); a receiver treats a missing frame as empty.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from . import defaults
from .errors import LimitError, ProtocolError

__all__ = [
    "NonNeg",
    "ChunkHeader",
    "Heartbeat",
    "FetchManifest",
    "FetchChunks",
    "Report",
    "Publish",
    "Published",
    "Reserve",
    "Reserved",
    "Rollback",
    "StatusRequest",
    "NodeStatus",
    "ModelStatus",
    "StatusReply",
    "ErrorReply",
    "rollout",
    "InferRequest",
    "InferReply",
    "WorkerReady",
    "LoadCommand",
    "LoadResult",
    "SERVING_CODES",
    "KINDS",
    "STATES",
    "topic",
    "HUB_TOPIC",
    "pub_endpoint",
    "encode",
    "decode_header",
]

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
V = defaults.PROTOCOL_VERSION
HUB_TOPIC = b"\0"
STATES = ("receiving", "verified", "loading", "loaded", "serving", "rejected", "idle")


class ChunkHeader(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    index: NonNeg
    v: int = V


class Heartbeat(msgspec.Struct, frozen=True):
    """Per model: its newest seq and sha256. ``name == ""``: the hub's own beat."""

    hub: str
    name: str = ""
    seq: NonNeg = 0
    sha256: str = ""
    label: str = ""
    v: int = V


class FetchManifest(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg = 0  # 0 = the newest
    v: int = V


class FetchChunks(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    indices: list[NonNeg]
    v: int = V


class Report(msgspec.Struct, frozen=True):
    """A node's state for one model, sent on every change and every heartbeat interval."""

    node: str
    model: str
    state: str
    seq: NonNeg = 0
    label: str = ""
    reason: str = ""
    host: str = ""
    pid: NonNeg = 0
    device: str = ""
    v: int = V


class Publish(msgspec.Struct, frozen=True):
    signature: bytes = b""  # of the manifest frame that follows; empty = unsigned
    v: int = V


class Reserve(msgspec.Struct, frozen=True):
    """Ask the hub for the next seq of ``name``, to sign a release as that seq before
    publishing it. ``base`` (a label or seq) also returns that stored release's manifest, for
    a signed rollback."""

    name: str
    base: str = ""
    v: int = V


class Reserved(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    v: int = V


class Published(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    label: str
    sha256: str
    v: int = V


class Rollback(msgspec.Struct, frozen=True):
    name: str
    to: str  # a label or a seq
    v: int = V


class StatusRequest(msgspec.Struct, frozen=True):
    v: int = V


class NodeStatus(msgspec.Struct, frozen=True):
    node: str
    model: str
    state: str
    seq: int
    label: str
    reason: str
    host: str
    pid: int
    device: str
    age_s: float
    rejected_seq: int = 0  # the last seq this node rejected for this model, 0 = none
    last_error: str = ""


class ModelStatus(msgspec.Struct, frozen=True):
    name: str
    seq: int
    label: str
    sha256: str
    archive_bytes: int


class StatusReply(msgspec.Struct, frozen=True):
    hub: str
    models: list[ModelStatus]
    nodes: list[NodeStatus]
    stats: dict[str, int] = {}
    v: int = V


class ErrorReply(msgspec.Struct, frozen=True):
    code: str
    message: str
    name: str = ""
    seq: NonNeg = 0
    retryable: bool = False
    v: int = V
    id: str = ""  # the inference request it answers


# -- inference: client REQ <-> node ROUTER (docs/protocol.md §Inference) -------------------
class InferRequest(msgspec.Struct, frozen=True):
    """``[b"INFER", InferRequest, tensor buffer x n]``; ``inputs`` is the tensor-tree spec of
    the positional arguments (a tuple node)."""

    model: str
    id: str
    inputs: Any
    version: NonNeg = 0  # pin a seq; 0 = whatever the node serves
    v: int = V


class InferReply(msgspec.Struct, frozen=True):
    """``[b"OK", InferReply, tensor buffer x n]``."""

    id: str
    model: str
    label: str
    seq: NonNeg
    worker: str
    outputs: Any
    queue_ms: float = 0.0  # node receipt -> worker start
    infer_ms: float = 0.0  # the model call, inputs to outputs on CPU
    v: int = V


# -- front <-> its worker processes (ipc, same host) ---------------------------------------
class WorkerReady(msgspec.Struct, frozen=True):
    """``[b"READY", WorkerReady]`` on start; ``[b"HB"]`` while idle."""

    worker: str
    pid: NonNeg
    device: str
    serving: dict[str, list[Any]]  # name -> [seq, label]
    v: int = V


class LoadCommand(msgspec.Struct, frozen=True):
    """``[b"LOAD", LoadCommand]``: load the cached archive at ``path`` and swap it in."""

    name: str
    seq: NonNeg
    path: str
    unload_first: bool = False
    v: int = V


class LoadResult(msgspec.Struct, frozen=True):
    """``[b"LOADED", LoadResult]``."""

    worker: str
    name: str
    seq: NonNeg
    label: str
    ok: bool
    reason: str = ""
    load_s: float = 0.0
    check_s: float = 0.0
    v: int = V


# Inference error codes: code -> retryable (docs/protocol.md §Inference errors)
SERVING_CODES: dict[str, bool] = {
    "unknown_model": False,  # the node does not serve that name
    "not_ready": True,  # known, but no version loaded yet
    "version_unavailable": False,  # the pinned seq is not served here
    "bad_request": False,  # malformed frames or header
    "bad_input": False,  # wrong count, dtype or rank for the model's signature
    "too_large": False,  # over max request bytes or tensor count
    "model_error": False,  # the model raised; message carries its exception
    "worker_lost": True,  # the worker died with the request in flight
    "unavailable": True,  # draining for a reload, queue full or queue wait over
    "internal": False,
}

KINDS: dict[bytes, type[msgspec.Struct]] = {
    b"CHUNK": ChunkHeader,
    b"HEARTBEAT": Heartbeat,
    b"FETCH_MANIFEST": FetchManifest,
    b"FETCH_CHUNKS": FetchChunks,
    b"REPORT": Report,
    b"PUBLISH": Publish,
    b"PUBLISHED": Published,
    b"RESERVE": Reserve,
    b"RESERVED": Reserved,
    b"ROLLBACK": Rollback,
    b"STATUS": StatusRequest,
    b"STATUS_REPLY": StatusReply,
    b"ERROR": ErrorReply,
    b"INFER": InferRequest,
    b"OK": InferReply,
    b"READY": WorkerReady,
    b"LOAD": LoadCommand,
    b"LOADED": LoadResult,
}
_DECODERS = {k: msgspec.msgpack.Decoder(t) for k, t in KINDS.items()}
_ENC = msgspec.msgpack.Encoder()
_MAX_HEADER = 1 << 20


def rollout(status: StatusReply, name: str, seq: int) -> tuple[int, list[str]]:
    """``(nodes serving name at seq, nodes that rejected that seq)``: the one rule behind
    ``publish --wait-for`` (hub-side and client-side)."""
    rows = [n for n in status.nodes if n.model == name]
    serving = sum(n.seq == seq and n.state == "serving" for n in rows)
    return serving, [n.node for n in rows if n.rejected_seq == seq]


def encode(msg: msgspec.Struct) -> bytes:
    return _ENC.encode(msg)


def decode_header(kind: bytes, data: Any) -> Any:
    """Decode the header frame of message ``kind``; any fault is a :class:`ProtocolError`."""
    dec = _DECODERS.get(bytes(kind))
    if dec is None:
        raise ProtocolError(f"unknown message type {bytes(kind)[:32]!r}")
    if len(data) > _MAX_HEADER:
        raise LimitError(f"{bytes(kind).decode()} header of {len(data)} bytes")
    try:
        msg = dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad {bytes(kind).decode()} header: {exc}") from None
    if msg.v != V:
        raise ProtocolError(f"protocol version {msg.v}, expected {V}")
    if isinstance(msg, FetchChunks) and len(msg.indices) > defaults.MAX_CHUNKS:
        raise LimitError("too many chunk indices")
    return msg


def topic(name: str) -> bytes:
    """The PUB topic of a model: its name and a NUL, so ``ab`` never matches ``abc``."""
    return name.encode() + b"\0"


_TCP = re.compile(r"^tcp://(.+):(\d+)$")


def pub_endpoint(addr: str) -> str:
    """The hub's PUB address derived from its one address (the ROUTER's).

    ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+1``; ``ipc://PATH`` -> ``ipc://PATH.pub``;
    ``inproc://NAME`` -> ``inproc://NAME.pub``.
    """
    m = _TCP.match(addr)
    if m:
        return f"tcp://{m.group(1)}:{int(m.group(2)) + 1}"
    if addr.startswith(("ipc://", "inproc://")):
        return addr + ".pub"
    raise ProtocolError(f"cannot use hub address {addr!r}: use tcp://HOST:PORT or ipc://PATH")
