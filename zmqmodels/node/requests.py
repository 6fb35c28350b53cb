"""A node front's translation between the wire and its broker: a client's INFER into a
:class:`~zmqmodels.core.work.Request`, a :class:`~zmqmodels.core.work.Dispatch` into the
frames for a worker (``WORK`` for one request, ``BATCH`` for several) and a worker's ``DONE``
or ``ANSWERS`` into one reply per request. Torch-free, socket-free."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import protocol as P
from ..core.batching import batch_key
from ..core.work import Dispatch, Request, WorkerSlot
from ..defaults import Limits
from ..errors import ProtocolError
from ..protocol import Refusal, parse_infer

__all__ = ["admit", "work_frames", "replies", "Reply", "describe", "MODELS"]

MODELS = P.kind_of(P.ModelsRequest())  # the first frame of a client's MODELS


def admit(client: bytes, frames: list[Any], limits: Limits, queue_timeout_s: float, *,
          unbatched: Collection[str] | None) -> Request:
    """A client's ``[INFER, header, tensors...]`` (after the REQ envelope) as a queued request;
    :class:`Refusal` for what cannot be. ``unbatched``: models whose requests are never joined
    (None: no batching at all)."""
    received_ns = time.monotonic_ns()
    req, tensors = parse_infer(frames)
    size = sum(len(f) for f in frames)
    if size > limits.max_request_bytes or len(tensors) > limits.max_request_tensors:
        raise Refusal("too_large", f"request of {len(tensors)} tensor(s), {size} bytes; limits "
                      f"{limits.max_request_tensors} / {limits.max_request_bytes}", req.id, req.model)
    now = received_ns / 1e9
    expires = now + req.timeout_ms / 1000 if req.timeout_ms else float("inf")
    expires_ns = received_ns + int(req.timeout_ms * 1e6) if req.timeout_ms else 0
    joins = unbatched is not None and req.model not in unbatched
    key, rows = (batch_key(req.inputs) if joins else None) or (None, 1)
    return Request(client, req.model, req.id, now, now + queue_timeout_s, req.seq, expires,
                   (received_ns, expires_ns, frames), key=key, rows=rows)


def work_frames(d: Dispatch) -> list[Any]:
    """The frames that hand ``d`` to its worker (through the backend ROUTER)."""
    head = d.wid.encode()
    if len(d.requests) == 1:
        req = d.requests[0]
        received_ns, expires_ns, frames = req.payload
        return [head, *P.pack(P.Work(req.client, received_ns, expires_ns), *frames)]
    jobs, payload = [], []
    for req in d.requests:
        received_ns, expires_ns, frames = req.payload
        jobs.append(P.Job(req.client, received_ns, expires_ns, len(frames)))
        payload += frames
    return [head, *P.pack(P.Batch(jobs), *payload)]


@dataclass(frozen=True)
class Reply:
    client: bytes
    served: bool  # False: dropped unanswered (its client had given up)
    code: str  # "" = OK
    frames: list[Any]


def replies(msg: P.Done | P.Answers, payload: list[Any]) -> list[Reply]:
    """A worker's ``DONE`` or ``ANSWERS`` as one :class:`Reply` per request, in dispatch order;
    :class:`ProtocolError` if the frame counts do not add up."""
    if isinstance(msg, P.Done):
        return [Reply(msg.client, msg.served, msg.code, payload)]
    out, at = [], 0
    for a in msg.answers:
        out.append(Reply(a.client, a.served, a.code, payload[at:at + a.frames]))
        at += a.frames
    if at != len(payload):
        raise ProtocolError(f"ANSWERS names {at} reply frames, {len(payload)} came")
    return out


def describe(frames: list[Any], node: str, models: Sequence[str], workers: Mapping[str, WorkerSlot],
             signature: Callable[[str, int], tuple[list[Any], Any]]) -> list[Any]:
    """The reply frames to a client's ``[MODELS, header]``: a ``MODELS_REPLY`` for what
    ``workers`` hold now (per model, each seq some ready worker serves, how many hold it, how
    many rows they join, and from ``signature(name, seq)`` the manifest's ``inputs`` and
    ``outputs``), or ``ERROR bad_request``."""
    try:
        req, _ = P.unpack(frames)
    except ProtocolError as exc:
        return P.pack(P.ErrorReply("bad_request", str(exc)))
    out = []
    for name in models:
        held: dict[int, list[Any]] = {}
        for w in workers.values():
            v = w.serving.get(name)
            if w.ready and v is not None:
                entry = held.setdefault(v.seq, [v.label, 0, 1])
                entry[1] += 1
                entry[2] = max(entry[2], w.batch.get(name, 1))
        versions = [P.ServedVersion(seq, label, n, batch, *signature(name, seq))
                    for seq, (label, n, batch) in sorted(held.items())]
        out.append(P.ServedModel(name, versions))
    return P.pack(P.ModelsReply(node, out, id=req.id))
