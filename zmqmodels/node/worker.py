"""A worker process: one :class:`ModelSlot` per model, serving one request or one batch at a time.

Started by the node's front process through :mod:`zmqmodels.node.worker_boot`; talks to it over a
DEALER on an ipc endpoint. It loads from the node's cache by *path* (2-8x faster than from
memory), checks the manifest's examples, warms up and swaps (:mod:`zmqmodels.node.holdings`).
``torch.jit.load`` holds the GIL, so a loading worker answers nothing and the front routes
around it; a weights-only update is made in the background while it answers on.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import torch
import zmq

from .. import protocol as P
from ..errors import ProtocolError, ServingError, ZmqModelsError
from ..model.batching import join_inputs, split_outputs
from ..model.loader import to_device
from ..model.slot import Loaded
from ..protocol import parse_infer
from ..protocol.tensors import decode, encode, join_rows, split_rows
from ..release.cache import Cache
from ..transport.wire import recv_frames, send_frames
from .holdings import Holdings

__all__ = ["Worker", "run"]

log = logging.getLogger("zmqmodels.worker")
HEARTBEAT_S = 1.0
APPLY_POLL_MS = 5  # how often a worker applying new weights in the background looks at them


class Worker:
    def __init__(self, backend: str, worker_id: str, device: str, models: list[str], cache: str,
                 parent: int = 0, map_cache: bool = False) -> None:
        self.parent = parent
        self.backend = backend
        self.worker_id = worker_id
        self.device = device
        self.held = Holdings(worker_id, device, models, Cache(cache), map_cache)
        self._pinned: dict[int, Any] = {}  # per input position: a pinned staging buffer (GPU)

    def _admit(self, req: P.InferRequest, tensors: list[Any]) -> tuple[Loaded, tuple[Any, ...]]:
        """The version that serves ``req`` and its checked arguments; :class:`ServingError`
        with the code to answer."""
        slot = self.held.slots.get(req.model)
        if slot is None:
            raise ServingError("unknown_model", f"this node does not serve {req.model!r}")
        cur = slot.current()
        if cur is None:
            raise ServingError("not_ready", f"no version of {req.model!r} loaded yet")
        if req.seq and req.seq != cur.manifest.seq:
            raise ServingError("version_unavailable", f"{req.model} seq {req.seq} is not "
                               f"loaded (serving seq {cur.manifest.seq})")
        try:
            args = decode(req.inputs, [f.buffer for f in tensors])
        except ZmqModelsError as exc:
            raise ServingError("bad_request", str(exc)) from None
        if not isinstance(args, tuple):
            raise ServingError("bad_request", "inputs must be a tuple of positional arguments")
        _check_signature(cur, args)
        return cur, args

    def _forward(self, cur: Loaded, args: tuple[Any, ...]) -> Any:
        try:
            if self.device == "cpu":
                return cur.module(*args)
            return to_device(cur.module(*to_device(args, self.device)), "cpu")
        except Exception as exc:
            raise ServingError("model_error", model_error_line(exc)) from None

    def _ok(self, req: P.InferRequest, cur: Loaded, out: Any, queue_ns: int, infer_ns: int,
            batch: int = 1) -> list[Any]:
        spec, bufs = encode(out)
        reply = P.InferReply(req.id, req.model, cur.manifest.label, cur.manifest.seq, self.worker_id, spec,
                             round(queue_ns / 1e6, 3), round(infer_ns / 1e6, 3), batch=batch)
        return P.pack(reply, *bufs)

    @staticmethod
    def _error(exc: ZmqModelsError, req: P.InferRequest | None) -> tuple[list[Any], str]:
        code = exc.code if isinstance(exc, ServingError) else "bad_request"
        err = P.serving_error(code, str(exc), req.model if req else "", req.id if req else "")
        return P.pack(err), code

    def infer(self, frames: list[zmq.Frame], received_ns: int) -> tuple[list[Any], str]:
        """Answer one request (``frames``: ``[INFER, header, tensors...]``): ``(reply frames,
        error code or "")``. Every failure becomes an ERROR reply with a stable code. Runs
        inside the inference mode :meth:`run` enters once."""
        t0 = time.monotonic_ns()
        req: P.InferRequest | None = None
        try:
            req, tensors = parse_infer(frames)
            cur, args = self._admit(req, tensors)
            t1 = time.monotonic_ns()
            out = self._forward(cur, args)
            return self._ok(req, cur, out, t0 - received_ns, time.monotonic_ns() - t1, _rows(args)), ""
        except ZmqModelsError as exc:
            return self._error(exc, req)

    def infer_batch(self, jobs: list[tuple[P.Job, list[Any]]]) -> list[tuple[list[Any], str, bool]]:
        """Answer a BATCH: ``(reply frames, error code, served)`` per job, in order. Each request
        is validated on its own first (a bad one is answered alone and never joins); the rest
        run as one forward when the release was proven batchable here and their rows fit,
        each getting its own rows of the outputs. If the joined forward fails, each request is
        run alone, so one sample that makes the model raise fails only its own request."""
        t0 = time.monotonic_ns()
        out: list[tuple[list[Any], str, bool] | None] = [None] * len(jobs)
        parsed: list[tuple[int, P.InferRequest, list[Any]]] = []
        for i, (job, frames) in enumerate(jobs):
            if job.expires_ns and t0 > job.expires_ns:
                out[i] = ([], "", False)  # its client has given up
                continue
            try:
                parsed.append((i, *parse_infer(frames)))
            except ZmqModelsError as exc:
                out[i] = (*self._error(exc, None), True)
        if self._joined(parsed, jobs, out, t0):
            return out  # type: ignore[return-value]
        ready: list[tuple[int, P.InferRequest, Loaded, tuple[Any, ...]]] = []
        for i, req, tensors in parsed:
            try:
                ready.append((i, req, *self._admit(req, tensors)))
            except ZmqModelsError as exc:
                out[i] = (*self._error(exc, req), True)
        rows = [_rows(a) for _, _, _, a in ready]
        cur = ready[0][2] if ready else None
        joined = None
        if cur is not None and len(ready) > 1 and sum(rows) <= cur.batch and \
                all(c is cur for _, _, c, _ in ready):
            t1 = time.monotonic_ns()
            try:
                whole = self._forward(cur, self._join([args for _, _, _, args in ready]))
                joined = split_outputs(whole, rows)
            except Exception as exc:  # noqa: BLE001 - whatever failed, each request runs alone
                log.info("%s: a batch of %d failed (%s); running its requests one by one",
                         self.worker_id, sum(rows), exc)
            infer_ns = time.monotonic_ns() - t1
        for k, (i, req, c, args) in enumerate(ready):
            received = jobs[i][0].received_ns
            t1 = time.monotonic_ns()
            try:
                if joined is not None:
                    res, ns, batch = joined[k], infer_ns, sum(rows)
                else:
                    res, ns, batch = self._forward(c, args), 0, rows[k]
                    ns = time.monotonic_ns() - t1
                out[i] = (self._ok(req, c, res, t0 - received, ns, batch), "", True)
            except ZmqModelsError as exc:
                out[i] = (*self._error(exc, req), True)
        return out  # type: ignore[return-value]

    def _join(self, args: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        """The requests' inputs concatenated; on a GPU into pinned host buffers kept between
        batches, so the copy to the device is one DMA per input."""
        if self.device == "cpu":
            return join_inputs(args)
        total = sum(a[0].shape[0] for a in args)
        bufs = []
        for k, first in enumerate(args[0]):
            shape = (total, *first.shape[1:])
            buf = self._pinned.get(k)
            if buf is None or buf.dtype != first.dtype or buf.shape[1:] != shape[1:] or buf.shape[0] < total:
                buf = torch.empty((max(total, 64), *shape[1:]), dtype=first.dtype, pin_memory=True)
                self._pinned[k] = buf
            bufs.append(buf[:total])
        return join_inputs(args, bufs)

    def _joined(self, parsed: list[tuple[int, P.InferRequest, list[Any]]],
                jobs: list[tuple[P.Job, list[Any]]], out: list[Any], t0: int) -> bool:
        """The common batch at wire speed: requests of one model, pin and ``inputs`` spec are
        checked once (the first fully, every other's buffer sizes), their bytes joined without
        a tensor per request, one forward, and each reply's tensors are views of the joined
        output's bytes. False (nothing answered) for anything else: the caller then reads,
        checks and answers each request on its own."""
        if len(parsed) < 2 or self.device != "cpu":
            return False
        first = parsed[0][1]
        if any(r.inputs != first.inputs or r.model != first.model or r.seq != first.seq
               for _, r, _ in parsed):
            return False
        try:
            cur, args = self._admit(first, parsed[0][2])
        except ZmqModelsError:
            return False
        rows = [_rows(args)] * len(parsed)
        joined = join_rows(first.inputs, [[f.buffer for f in t] for _, _, t in parsed])
        if joined is None or sum(rows) > cur.batch:
            return False
        t1 = time.monotonic_ns()
        try:
            whole = self._forward(cur, decode(*joined))
            parts = split_rows(*encode(whole), rows)
        except ZmqModelsError as exc:
            log.info("%s: a batch of %d failed (%s); running its requests one by one", self.worker_id,
                     sum(rows), exc)
            return False
        if parts is None:
            return False
        infer_ms, m = round((time.monotonic_ns() - t1) / 1e6, 3), cur.manifest
        for (i, req, _), (spec, bufs) in zip(parsed, parts, strict=True):
            queue_ms = round((t0 - jobs[i][0].received_ns) / 1e6, 3)
            reply = P.InferReply(req.id, req.model, m.label, m.seq, self.worker_id, spec, queue_ms, infer_ms,
                                 batch=sum(rows))
            out[i] = (P.pack(reply, *bufs), "", True)
        return True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTING_ID, self.worker_id.encode())  # the front knows us by name
        sock.connect(self.backend)
        with torch.inference_mode():  # once for the whole loop: ~3 us a request saved
            self._serve(sock)

    def _answer_batch(self, sock: zmq.Socket, jobs: list[P.Job], payload: list[Any]) -> None:
        parts, at = [], 0
        for job in jobs:
            parts.append((job, payload[at:at + job.frames]))
            at += job.frames
        answers, frames = [], []
        for job, (reply, code, served) in zip(jobs, self.infer_batch(parts), strict=True):
            answers.append(P.Answer(job.client, served, code, len(reply)))
            frames += reply
        send_frames(sock, P.pack(P.Answers(answers), *frames), copy=False)

    def _serve(self, sock: zmq.Socket) -> None:
        self.held.load_cached()
        ready = P.WorkerReady(self.worker_id, os.getpid(), self.device, self.held.serving(),
                              errors=self.held.errors)
        send_frames(sock, P.pack(ready))
        beat = P.pack(P.WorkerBeat())
        quiet_since = time.monotonic()
        try:
            while True:
                if self.held.apply_done():  # swapped between two requests, never during one
                    send_frames(sock, P.pack(self.held.finish_apply()))
                # while an update is made in the background, look at it every few ms
                if not sock.poll(APPLY_POLL_MS if self.held.applying else int(HEARTBEAT_S * 1000)):
                    if time.monotonic() - quiet_since < HEARTBEAT_S:
                        continue
                    quiet_since = time.monotonic()
                    if self.parent and os.getppid() != self.parent:
                        log.warning("%s: the node (pid %d) is gone; exiting", self.worker_id, self.parent)
                        return
                    send_frames(sock, beat)
                    continue
                quiet_since = time.monotonic()
                try:
                    msg, payload = P.unpack(recv_frames(sock, copy=False))
                except ProtocolError as exc:
                    log.warning("%s: bad message from the front: %s", self.worker_id, exc)
                    continue
                match msg:
                    case P.Batch(jobs=jobs):
                        self._answer_batch(sock, jobs, payload)
                    case P.Work(client=client, received_ns=received, expires_ns=expires):
                        if expires and time.monotonic_ns() > expires:
                            send_frames(sock, P.pack(P.Done(client, served=False)))
                            continue  # its client has given up: do not spend the model on it
                        reply, code = self.infer(payload, received)
                        send_frames(sock, P.pack(P.Done(client, code=code), *reply), copy=False)
                    case P.LoadCommand():
                        send_frames(sock, P.pack(self.held.load(msg)))
                    case P.StopWorker():
                        if self.held.applying:
                            self.held.finish_apply()  # its thread is not left writing as we exit
                        return
                    case _:
                        log.warning("%s: unexpected %s from the front", self.worker_id, type(msg).__name__)
        finally:
            sock.close()


def _rows(args: tuple[Any, ...]) -> int:
    """The leading dimension of the first input (1 for a scalar or a 0-d tensor)."""
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 1


def _check_signature(cur: Loaded, args: tuple[Any, ...]) -> None:
    sig = cur.signature
    if not sig:
        return
    if len(args) != len(sig):
        raise ServingError("bad_input", f"{cur.manifest.name} takes {len(sig)} input(s), got {len(args)}")
    for i, (arg, (dtype, rank, dname, shape)) in enumerate(zip(args, sig, strict=True)):
        if dtype is None:
            continue
        if not isinstance(arg, torch.Tensor):
            raise ServingError("bad_input", f"input {i}: expected a {dname} tensor")
        got = f"{str(arg.dtype).removeprefix('torch.')} {list(arg.shape)}"
        want = f"{dname} [{', '.join('*' if d < 0 else str(d) for d in shape)}]" if shape else \
            f"{dname} of rank {rank}"
        if arg.dtype != dtype or arg.dim() != rank or (shape and any(
                d >= 0 and d != g for d, g in zip(shape, arg.shape, strict=True))):
            raise ServingError("bad_input", f"input {i}: expected {want}, got {got}")


def model_error_line(exc: BaseException) -> str:
    """One line for a model's exception: its last ``SomethingError: message`` line (the
    meaningful one in a TorchScript traceback) and where in the model code it was raised."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    message = next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)),
                   None) or (lines[-1] if "Traceback of TorchScript" in text else lines[0])
    where = next((m for m in (re.match(r'^File "([^"]+)", line (\d+), in (\w+)', ln) for ln in lines) if m),
                 None)
    message = message.removeprefix("builtins.")
    if where:
        message += f" (at {where.group(1)}:{where.group(2)} in {where.group(3)})"
    return message[:1000]


def run(backend: str, worker_id: str, device: str, models: list[str], cache: str, threads: int,
        parent: int, map_cache: bool = False) -> None:
    """Serve until stopped (started by :mod:`zmqmodels.node.worker_boot`)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {worker_id} %(message)s")
    torch.set_num_threads(threads)
    Worker(backend, worker_id, device, models, cache, parent=parent, map_cache=map_cache).run()
