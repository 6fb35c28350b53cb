"""Every wire message as a typed, validated struct, and the **framing table**: the one place
that knows which frames each message kind has.

``docs/protocol.md`` is the language-neutral spec this module implements. Headers are msgpack
maps (unknown keys are ignored, so fields may be appended); big bytes travel in their own frame.
A message is ``[KIND, header?, payload...]``: :func:`pack` builds those frames from a struct
and its payload, :func:`unpack` checks the kind, decodes the header and checks the payload's
arity, raising :class:`~zmqmodels.errors.ProtocolError` on any fault. Handlers ``match`` on
the struct types. Routing frames (a ROUTER's identity, a REQ envelope, a PUB topic) are the
shell's, outside what these two functions see.

PUB (hub -> nodes), after the topic ``name + b"\\0"`` (``b"\\0"`` alone for the hub beat)::

    MANIFEST   (no header)      manifest, signature
    CHUNK      ChunkHeader      payload
    HEARTBEAT  Heartbeat
    ACTIVATE   Activate         (serve a staged release: these nodes, or all)

ROUTER (hub) <-> DEALER (node or CLI)::

    FETCH_MANIFEST FetchManifest            -> MANIFEST | ERROR
    FETCH_CHUNKS   FetchChunks              -> CHUNK x n | ERROR
    REPORT         Report                   (no reply; a malformed one gets ERROR)
    RESERVE        Reserve                  -> RESERVED Reserved, base manifest | ERROR
    PUBLISH        Publish, manifest, chunk x n -> PUBLISHED | ERROR
    ROLLBACK       Rollback (, manifest, signature) -> PUBLISHED | ERROR
    STATUS         StatusRequest            -> STATUS_REPLY | ERROR
    RELEASES       ReleasesRequest          -> RELEASES_REPLY | ERROR
    ACTIVATE       Activate                 -> ACTIVATED Activated | ERROR

Inference (client REQ -> node ROUTER): ``INFER InferRequest, tensor x n`` -> ``OK InferReply,
tensor x n`` | ``ERROR ErrorReply``.

Node front <-> worker process (ipc, same host)::

    READY WorkerReady  HB  LOADED LoadResult  DONE Done, reply frames     (worker -> front)
    WORK Work, INFER, request header, tensor x n  LOAD LoadCommand  STOP  (front -> worker)

``signature`` is the manifest's detached Ed25519 signature, empty when unsigned
(:mod:`zmqmodels.signing`); a receiver treats a missing frame as empty.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from . import defaults
from .errors import LimitError, ProtocolError

__all__ = [
    "NonNeg",
    "ChunkHeader",
    "Heartbeat",
    "Activate",
    "Activated",
    "WaveStatus",
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
    "ReleasesRequest",
    "ReleaseInfo",
    "ReleasesReply",
    "ErrorReply",
    "InferRequest",
    "InferReply",
    "WorkerReady",
    "LoadCommand",
    "LoadResult",
    "SERVING_CODES",
    "KINDS",
    "STATES",
    "ModelState",
    "Work",
    "Done",
    "WorkerBeat",
    "StopWorker",
    "ManifestFrames",
    "Framing",
    "FRAMING",
    "pack",
    "unpack",
    "kind_of",
    "topic",
    "HUB_TOPIC",
    "pub_endpoint",
    "encode",
    "decode_header",
]

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
V = defaults.PROTOCOL_VERSION
HUB_TOPIC = b"\0"


class ModelState(str, enum.Enum):
    """What a node reports for one model (``Report.state``)."""

    RECEIVING = "receiving"  # a release is arriving (``seq``: the one arriving)
    VERIFIED = "verified"  # it passed its digests and signature (``seq``: that release)
    LOADING = "loading"  # rolling it through the workers (``seq``: the one being rolled)
    LOADED = "loaded"  # loaded and checked, not yet serving (embedded ``swap_when``)
    SERVING = "serving"  # every ready worker serves ``seq``
    REJECTED = "rejected"  # ``seq`` was refused; ``reason`` says why (sent once, then the held state)
    IDLE = "idle"  # nothing loaded yet
    ERROR = "error"  # the node cannot serve or store this model; ``reason`` says why
    LOST = "lost"  # (the hub's table only) the node has not reported for a while


STATES = tuple(s.value for s in ModelState)


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
    path: list[str] = []  # the hub's own beat: the relays it passed, root first (loop check)
    # staged releases up to this seq are active on every node (0: nothing staged is active
    # fleet-wide; a release published without ``staged`` is active on arrival regardless)
    active: NonNeg = 0


class Activate(msgspec.Struct, frozen=True):
    """Serve staged release ``seq`` of ``name``. On the PUB (hub -> nodes, the model's topic):
    ``nodes`` are the node ids it applies to (empty: every node). On the ROUTER (CLI -> hub):
    ``nodes`` and ``labels`` select (none: every node, fleet-wide); the hub answers ACTIVATED."""

    name: str
    seq: NonNeg
    nodes: list[str] = []
    labels: list[str] = []
    v: int = V


class Activated(msgspec.Struct, frozen=True):
    """The hub's answer to ACTIVATE: the nodes it now activates (``fleet``: all, for good)."""

    name: str
    seq: NonNeg
    nodes: list[str]
    fleet: bool = False
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
    # seconds per stage of the newest release this node took in (``stages_seq``): receive,
    # cache_write, load, check (example check and warm-up), roll (verified -> all serving)
    stages: dict[str, float] = {}
    stages_seq: NonNeg = 0
    via: list[str] = []  # the relays the report came through, the node's own first
    staged: NonNeg = 0  # a verified, cached release this node holds but does not serve yet
    labels: list[str] = []  # the node's labels (``serve --label``), for waves and ACTIVATE
    requests: NonNeg = 0  # requests answered by ``seq`` since the node started
    errors: NonNeg = 0  # of those, with a server-side error (model_error, internal, worker_lost)


class Publish(msgspec.Struct, frozen=True):
    signature: bytes = b""  # of the manifest frame that follows; empty = unsigned
    v: int = V
    # a staged rollout: activate the release in these cumulative waves ("1", "10%", ...),
    # waiting ``wave_wait_s`` after each wave serves, halting on ``halt_on`` conditions
    waves: list[str] = []
    wave_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    halt_on: list[str] = []  # "rejected" (always), "error-rate>1%"
    confirm_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0  # a wave node must serve within this


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
    note: str = ""  # something the publisher should know (e.g. the store's seq floor was raised)
    store_s: float = 0.0  # the hub verifying and storing it
    broadcast_s: float = 0.0  # the hub queueing it on its PUB socket


class Rollback(msgspec.Struct, frozen=True):
    name: str
    to: str  # a label or a seq
    v: int = V


class StatusRequest(msgspec.Struct, frozen=True):
    v: int = V


class ReleasesRequest(msgspec.Struct, frozen=True):
    """``[b"RELEASES", ReleasesRequest]``: the stored releases of ``name`` ("" = every model)."""

    name: str = ""
    v: int = V


class ReleaseInfo(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    label: str
    created_at: float
    archive_bytes: NonNeg
    compressed_bytes: NonNeg
    codec: str  # "zstd/shuffle", "none/none"
    signer: str  # hex public key, "" = unsigned
    rollback_of: NonNeg  # the seq whose content this restores, 0 = none
    serving: NonNeg  # nodes reporting it serving (lost nodes not counted)
    sha256: str = ""  # the archive's sha256


class ReleasesReply(msgspec.Struct, frozen=True):
    releases: list[ReleaseInfo]
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
    stages: dict[str, float] = {}  # Report.stages of the release ``stages_seq``
    stages_seq: int = 0
    via: list[str] = []  # the relays between this node and the hub
    staged: int = 0  # a release it holds but does not serve yet
    labels: list[str] = []
    requests: int = 0  # Report.requests / errors, as last reported
    errors: int = 0


class WaveStatus(msgspec.Struct, frozen=True):
    """A staged rollout in waves, as the hub runs it (``StatusReply.rollouts``)."""

    name: str
    seq: int
    state: str  # "running", "done", "halted"
    wave: int  # the wave being activated or watched, 1-based (== waves when done)
    waves: list[int]  # cumulative node counts of each wave
    activated: list[str]  # nodes told to serve seq
    serving: list[str]  # of those, nodes reporting seq serving
    failed: dict[str, str] = {}  # node -> why it failed the wave
    reason: str = ""  # why it halted
    rollback_seq: int = 0  # the release published to undo it (0: none was needed)
    started_at: float = 0.0  # wall-clock
    v: int = V


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
    rollouts: list[WaveStatus] = []


class ErrorReply(msgspec.Struct, frozen=True):
    code: str
    message: str
    name: str = ""  # the model a FETCH_* (or inference) request named
    seq: NonNeg = 0  # the seq it named
    retryable: bool = False
    v: int = V
    id: str = ""  # the inference request it answers
    indices: list[NonNeg] = []  # FETCH_CHUNKS: the indexes it asked for


# -- inference: client REQ <-> node ROUTER (docs/protocol.md §Inference) -------------------
class InferRequest(msgspec.Struct, frozen=True):
    """``[b"INFER", InferRequest, tensor buffer x n]``; ``inputs`` is the tensor-tree spec of
    the positional arguments (a tuple node). ``id`` is a string, echoed in the reply.

    ``seq`` pins a release (wire name ``version`` since protocol v1; 0 = whatever the node
    serves newest). ``timeout_ms`` is how long the client will still wait for this answer
    (0 = no limit): a node drops a request still queued when it passes, unanswered, since the
    client has given up or sent it again."""

    model: str
    id: str
    inputs: Any
    seq: NonNeg = msgspec.field(default=0, name="version")
    v: int = V
    timeout_ms: Annotated[float, msgspec.Meta(ge=0)] = 0.0

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
    """``[b"READY", WorkerReady]`` on start."""

    worker: str
    pid: NonNeg
    device: str
    serving: dict[str, list[Any]]  # name -> [seq, label]
    v: int = V
    errors: dict[str, list[Any]] = {}  # name -> [seq, reason]: a cached release it could not use


class Work(msgspec.Struct, frozen=True):
    """``[b"WORK", Work, b"INFER", InferRequest, tensor x n]``: serve one request for ``client`` (its
    ROUTER identity). Times are the host's CLOCK_MONOTONIC in ns, shared by its processes;
    ``expires_ns`` 0 = the client gave no deadline."""

    client: bytes
    received_ns: NonNeg
    expires_ns: NonNeg = 0
    v: int = V


class Done(msgspec.Struct, frozen=True):
    """``[b"DONE", Done, reply frames...]``: the reply (``OK ...`` or ``ERROR ...``) for
    ``client``; ``served`` is False when the worker dropped an expired request unanswered."""

    client: bytes
    served: bool = True
    v: int = V
    code: str = ""  # the ERROR reply's code, "" = OK


class WorkerBeat(msgspec.Struct, frozen=True):
    """``[b"HB"]`` (no header): an idle worker is alive."""


class StopWorker(msgspec.Struct, frozen=True):
    """``[b"STOP"]`` (no header): finish the request in hand and exit."""


class ManifestFrames(msgspec.Struct, frozen=True):
    """``[b"MANIFEST", manifest, signature]`` (no header): the manifest frame is decoded by
    :func:`zmqmodels.release.decode_manifest` under the receiver's limits."""


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
    corrupt: bool = False  # the cached file was damaged or gone: fetch it again, not a rejection


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

@dataclass(frozen=True)
class Framing:
    """One row of the framing table: ``kind`` frames ``header`` (None: no header frame)
    followed by ``min_payload`` to ``max_payload`` (None: any number) payload frames."""

    kind: bytes
    struct: type[msgspec.Struct]
    has_header: bool
    min_payload: int = 0
    max_payload: int | None = 0


FRAMING: tuple[Framing, ...] = (
    Framing(b"MANIFEST", ManifestFrames, False, 1, 2),
    Framing(b"CHUNK", ChunkHeader, True, 1, 1),
    Framing(b"HEARTBEAT", Heartbeat, True),
    Framing(b"ACTIVATE", Activate, True),
    Framing(b"ACTIVATED", Activated, True),
    Framing(b"FETCH_MANIFEST", FetchManifest, True),
    Framing(b"FETCH_CHUNKS", FetchChunks, True),
    Framing(b"REPORT", Report, True),
    Framing(b"PUBLISH", Publish, True, 1, None),
    Framing(b"PUBLISHED", Published, True),
    Framing(b"RESERVE", Reserve, True),
    Framing(b"RESERVED", Reserved, True, 1, 1),
    Framing(b"ROLLBACK", Rollback, True, 0, 2),
    Framing(b"STATUS", StatusRequest, True),
    Framing(b"STATUS_REPLY", StatusReply, True),
    Framing(b"RELEASES", ReleasesRequest, True),
    Framing(b"RELEASES_REPLY", ReleasesReply, True),
    Framing(b"ERROR", ErrorReply, True),
    Framing(b"INFER", InferRequest, True, 0, None),
    Framing(b"OK", InferReply, True, 0, None),
    Framing(b"READY", WorkerReady, True),
    Framing(b"HB", WorkerBeat, False),
    Framing(b"WORK", Work, True, 2, None),
    Framing(b"DONE", Done, True, 0, None),
    Framing(b"LOAD", LoadCommand, True),
    Framing(b"LOADED", LoadResult, True),
    Framing(b"STOP", StopWorker, False),
)
_BY_KIND = {f.kind: f for f in FRAMING}
_BY_TYPE = {f.struct: f for f in FRAMING}
KINDS: dict[bytes, type[msgspec.Struct]] = {f.kind: f.struct for f in FRAMING if f.has_header}
_DECODERS = {k: msgspec.msgpack.Decoder(t) for k, t in KINDS.items()}
_ENC = msgspec.msgpack.Encoder()
_MAX_HEADER = 1 << 20
_BEAT, _STOP, _MANIFEST = WorkerBeat(), StopWorker(), ManifestFrames()
_HEADERLESS = {b"HB": _BEAT, b"STOP": _STOP, b"MANIFEST": _MANIFEST}


def kind_of(msg: msgspec.Struct) -> bytes:
    return _BY_TYPE[type(msg)].kind


def pack(msg: msgspec.Struct, *payload: Any) -> list[Any]:
    """``[KIND, header, *payload]`` for ``msg``; the payload's arity is checked against the
    framing table (a sender's bug is caught here, not by the peer)."""
    f = _BY_TYPE[type(msg)]
    n = len(payload)
    if n < f.min_payload or (f.max_payload is not None and n > f.max_payload):
        raise ProtocolError(f"{f.kind.decode()} takes {f.min_payload}..{f.max_payload} payload "
                            f"frame(s), not {n}")
    if not f.has_header:
        return [f.kind, *payload]
    return [f.kind, _ENC.encode(msg), *payload]


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def unpack(frames: Sequence[Any]) -> tuple[Any, list[Any]]:
    """``(message, payload frames)`` from ``[KIND, header?, payload...]`` (``bytes`` or
    ``zmq.Frame``); any fault - unknown kind, wrong arity, a header that does not decode or
    has another protocol version - is a :class:`ProtocolError`."""
    if not frames:
        raise ProtocolError("empty message")
    kind = _bytes(frames[0])
    f = _BY_KIND.get(kind)
    if f is None:
        raise ProtocolError(f"unknown message type {kind[:32]!r}")
    first = 2 if f.has_header else 1
    n = len(frames) - first
    if n < f.min_payload or (f.max_payload is not None and n > f.max_payload):
        hi = "n" if f.max_payload is None else f.max_payload
        span = f"{f.min_payload}" if hi == f.min_payload else f"{f.min_payload}..{hi}"
        raise ProtocolError(f"{kind.decode()} of {len(frames)} frame(s): expected "
                            f"{'a header and ' if f.has_header else ''}{span} payload frame(s)")
    msg = decode_header(kind, _buffer(frames[1])) if f.has_header else _HEADERLESS[kind]
    return msg, list(frames[first:])


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
