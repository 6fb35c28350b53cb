"""Inference (client REQ <-> node ROUTER) and a node's front <-> worker messages (ipc)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .codes import Code
from .messages import ErrorReply, NonNeg, V

__all__ = [
    "Held",
    "Unusable",
    "InferRequest",
    "InferReply",
    "ModelsRequest",
    "ServedVersion",
    "ServedModel",
    "ModelsReply",
    "WorkerReady",
    "Work",
    "Done",
    "Job",
    "Batch",
    "Answer",
    "Answers",
    "WorkerBeat",
    "StopWorker",
    "ManifestFrames",
    "LoadCommand",
    "LoadResult",
    "Applying",
    "serving_error",
    "SERVING_CODES",
]

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
    batch: NonNeg = 1  # rows in the forward that answered it (more than its own: batched)


class ModelsRequest(msgspec.Struct, frozen=True):
    """``[b"MODELS", ModelsRequest]`` on the inference socket: what does this node serve now?
    Answered by the front at once (never queued behind inference); ``id`` is echoed."""

    v: int = V
    id: str = ""


class ServedVersion(msgspec.Struct, frozen=True):
    """One release a node serves: held by ``workers`` ready workers (0: none holds it now).
    ``inputs`` and ``outputs`` are its manifest's (docs/protocol.md §The release)."""

    seq: NonNeg
    label: str
    workers: NonNeg
    batch: NonNeg = 1  # the most rows one forward joins for it here (1: unbatched)
    inputs: list[Any] = []
    outputs: Any = None


class ServedModel(msgspec.Struct, frozen=True):
    """A model the node was told to serve; ``versions`` (ascending seq) empty: not ready."""

    name: str
    versions: list[ServedVersion] = []


class ModelsReply(msgspec.Struct, frozen=True):
    """``[b"MODELS_REPLY", ModelsReply]``."""

    node: str
    models: list[ServedModel]
    v: int = V
    id: str = ""  # the request's


# -- front <-> its worker processes (ipc, same host) ---------------------------------------
class Held(msgspec.Struct, frozen=True, array_like=True):
    """A release a worker holds (``[seq, label]`` on the wire)."""

    seq: NonNeg
    label: str
    batch: NonNeg = 1  # the most rows the worker joins in one forward for it
    format: str = ""  # the release format it serves ("torchscript" or "pt2")


class Unusable(msgspec.Struct, frozen=True, array_like=True):
    """A cached release a worker could not use (``[seq, reason]`` on the wire)."""

    seq: NonNeg
    reason: str


class WorkerReady(msgspec.Struct, frozen=True):
    """``[b"READY", WorkerReady]`` on start."""

    worker: str
    pid: NonNeg
    device: str
    serving: dict[str, Held]
    v: int = V
    errors: dict[str, Unusable] = {}


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


class Job(msgspec.Struct, frozen=True, array_like=True):
    """One request of a BATCH: ``[client, received_ns, expires_ns, frames]``; ``frames``: how
    many of the BATCH's payload frames are its ``[INFER, header, tensor x n]``."""

    client: bytes
    received_ns: NonNeg
    expires_ns: NonNeg
    frames: NonNeg


class Batch(msgspec.Struct, frozen=True):
    """``[b"BATCH", Batch, frames of each job in order]``: serve the jobs in one forward
    (requests for one model, pin and input shape but the leading dimension), each answered
    on its own."""

    jobs: list[Job]
    v: int = V


class Answer(msgspec.Struct, frozen=True, array_like=True):
    """One job's outcome in ANSWERS: ``[client, served, code, frames]`` (as :class:`Done`)."""

    client: bytes
    served: bool
    code: str
    frames: NonNeg


class Answers(msgspec.Struct, frozen=True):
    """``[b"ANSWERS", Answers, reply frames of each answer in order]``: a BATCH's replies,
    in the order of its jobs, sent together once the batch is done."""

    answers: list[Answer]
    v: int = V


class WorkerBeat(msgspec.Struct, frozen=True):
    """``[b"HB"]`` (no header): an idle worker is alive."""


class StopWorker(msgspec.Struct, frozen=True):
    """``[b"STOP"]`` (no header): finish the request in hand and exit."""


class ManifestFrames(msgspec.Struct, frozen=True):
    """``[b"MANIFEST", manifest, signature]`` (no header): the manifest frame is decoded by
    :func:`zmqmodels.release.manifest.decode_manifest` under the receiver's limits."""


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
    how: str = "load"  # "load": torch.jit.load; "apply": new tensors copied into the same code
    shared_bytes: NonNeg = 0  # weight bytes mapped from the node's cache file (CPU: one copy a node)
    batch: NonNeg = 1  # the most rows it joins in one forward for this release
    batch_note: str = ""  # why it does not join what the manifest claims
    cpu_s: float = 0.0  # CPU seconds the worker spent taking it (load or apply, check, warm-up)
    why: str = ""  # why "load" (not "apply")
    format: str = ""  # the release format it serves: "torchscript" or "pt2" (of a dual release, one)


class Applying(msgspec.Struct, frozen=True):
    """``[b"APPLYING", Applying]``: the worker writes new weights of ``name`` ``seq`` into a spare
    module of the same code while it keeps answering requests with the one it serves; a
    ``LOADED`` follows once it has swapped (or failed)."""

    name: str
    seq: NonNeg
    v: int = V


# Inference error codes: code -> retryable (docs/protocol.md §Inference errors)
SERVING_CODES: dict[str, bool] = {c.value: c.retryable for c in Code if c.node}
"""Each code a node answers with, and whether it is retryable (from :class:`Code`)."""


def serving_error(code: str, message: str, model: str = "", rid: str = "") -> ErrorReply:
    """The ERROR reply to an inference request: ``code`` from :data:`SERVING_CODES` (its
    retryability with it), ``message`` cut to 4000 characters."""
    return ErrorReply(code, message[:4000], model, 0, SERVING_CODES.get(code, False), id=rid)
