"""The **framing table**: the one place that knows which frames each message kind has, and
:func:`pack` / :func:`unpack` built on it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from .. import defaults
from ..errors import LimitError, ProtocolError, ServingError
from .codes import Code
from .messages import (
    Activate,
    Activated,
    ChunkHeader,
    ErrorReply,
    FetchChunks,
    FetchManifest,
    Heartbeat,
    PatchHeader,
    Pin,
    Pinned,
    Publish,
    Published,
    ReleasesReply,
    ReleasesRequest,
    Report,
    Reserve,
    Reserved,
    Rollback,
    StatusReply,
    StatusRequest,
    V,
)
from .serving import (
    Answers,
    Applying,
    Batch,
    Done,
    InferReply,
    InferRequest,
    LoadCommand,
    LoadResult,
    ManifestFrames,
    ModelsReply,
    ModelsRequest,
    StopWorker,
    Work,
    WorkerBeat,
    WorkerReady,
)

__all__ = [
    "Framing",
    "FRAMING",
    "KINDS",
    "wrong_peer",
    "kind_of",
    "pack",
    "unpack",
    "encode",
    "decode_header",
    "topic",
    "pub_endpoint",
    "parse_infer",
    "Refusal",
]

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
    Framing(b"PATCH", PatchHeader, True, 1, 1),
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
    Framing(b"PIN", Pin, True),
    Framing(b"PINNED", Pinned, True),
    Framing(b"ERROR", ErrorReply, True),
    Framing(b"INFER", InferRequest, True, 0, None),
    Framing(b"OK", InferReply, True, 0, None),
    Framing(b"MODELS", ModelsRequest, True),
    Framing(b"MODELS_REPLY", ModelsReply, True),
    Framing(b"READY", WorkerReady, True),
    Framing(b"HB", WorkerBeat, False),
    Framing(b"WORK", Work, True, 2, None),
    Framing(b"DONE", Done, True, 0, None),
    Framing(b"BATCH", Batch, True, 2, None),
    Framing(b"ANSWERS", Answers, True, 0, None),
    Framing(b"LOAD", LoadCommand, True),
    Framing(b"LOADED", LoadResult, True),
    Framing(b"APPLYING", Applying, True),
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
        msg: Any = dec.decode(data)
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


class Refusal(ServingError):
    """A request refused before it was queued; ``rid`` and ``model`` for the reply (empty when
    its header could not be read)."""

    def __init__(self, code: str, message: str, rid: str = "", model: str = "") -> None:
        super().__init__(code, message)
        self.rid, self.model = rid, model


def parse_infer(frames: Sequence[Any]) -> tuple[InferRequest, list[Any]]:
    """``[INFER, header, tensors...]`` -> ``(header, tensor frames)``; :class:`Refusal`
    (``bad_request``) for anything else. The front and its workers read requests alike."""
    try:
        req, tensors = unpack(frames)
    except ProtocolError as exc:
        raise Refusal("bad_request", str(exc)) from None
    if not isinstance(req, InferRequest):
        raise Refusal("bad_request", "expected [INFER, header, tensor frames...]")
    return req, tensors


def wrong_peer(frames: list[Any], what: str) -> list[Any] | None:
    """A hub's or relay's ROUTER got ``frames``: if they are a REQ envelope (identity, empty
    delimiter: an inference client), the answer that names the mistake at once, else None."""
    if len(frames) < 3 or len(frames[1]) != 0:
        return None
    try:
        rid = str(getattr(unpack(frames[2:])[0], "id", ""))  # a pipelining client matches on it
    except Exception:  # noqa: BLE001 - whatever it sent, it gets the answer
        rid = ""
    return [frames[0], b"", *pack(ErrorReply(
        Code.WRONG_PEER.value, f"this address is a zmqmodels {what}, not a node: send inference to a "
        "node's --bind address (zmqmodels serve)", retryable=False, id=rid))]
