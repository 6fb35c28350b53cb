"""The inference client: a REQ socket with Lazy-Pirate retries.

On a timeout the REQ socket is closed (linger 0) and reopened, and the request sent again, up
to ``retries`` times; an error reply whose code is retryable (``worker_lost``, ``unavailable``,
``not_ready``) is retried after a short back-off; any other error raises :class:`RemoteError`
at once. One client per thread: a REQ socket must not be shared.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from .. import protocol as P
from ..errors import DeadlineError, ProtocolError, RemoteError, ZmqModelsError
from ..protocol.tensors import decode, encode
from ..transport.curve import Curve

__all__ = ["Client", "Result"]

_ids = itertools.count(1)


@dataclass(frozen=True)
class Result:
    """Outputs and where they came from."""

    outputs: Any
    model: str
    label: str
    seq: int
    worker: str
    queue_ms: float
    infer_ms: float
    latency_ms: float
    attempts: int
    batch: int = 1  # rows in the forward that answered it (more than its own: it was batched)


class Client:
    """``Client("tcp://node:6000").infer("lenet", x)`` -> :class:`Result`.

    ``curve``: this client's CURVE keys and the server's public key. A server that does not
    admit the key never completes the handshake: the call ends in :class:`DeadlineError`.
    ``arrays``: outputs as torch tensors (``"torch"``) or numpy arrays (``"numpy"``: torch is
    never imported; inputs may be either). ``on_retry(attempt, error)`` is called for each
    failed attempt that will be retried (the CLI prints it, so a wrong port is not silent).
    """

    def __init__(self, server: str, *, timeout: float = 5.0, retries: int = 3,
                 backoff_s: float = 0.05, context: zmq.Context | None = None,
                 curve: Curve | None = None, arrays: str = "torch",
                 on_retry: Callable[[int, Exception], None] | None = None) -> None:
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', not {arrays!r}")
        self.server = server
        self.arrays = arrays
        self.on_retry = on_retry
        self.curve = curve
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._closed = False

    def _socket(self) -> zmq.Socket:
        if self._closed:
            raise ZmqModelsError("the Client is closed")
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.linger = 0
            if self.curve is not None:
                self.curve.connect(self._sock)
            self._sock.connect(self.server)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._reset()
        self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(self, model: str, *inputs: Any, timeout: float | None = None, seq: int = 0) -> Result:
        """Run ``model`` on ``inputs`` (tensors, or nested tuples/lists/dicts of them).

        ``seq`` pins a release (0: the newest the node serves). ``timeout`` bounds each attempt;
        the node is told it, and drops the request unanswered if it is still queued then."""
        spec, bufs = encode(tuple(inputs))
        rid = f"{os.getpid()}-{next(_ids)}"
        return self._call(lambda ms: P.pack(P.InferRequest(model, rid, spec, seq, timeout_ms=ms),
                                            *bufs), rid, timeout)

    def _call(self, frames_for: Any, rid: str, timeout: float | None) -> Result:
        timeout = self.timeout if timeout is None else timeout
        last: Exception | None = None
        t0 = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            sock = self._socket()
            sock.send_multipart(frames_for(round(timeout * 1000, 3)), copy=False)
            if not sock.poll(int(timeout * 1000)):
                self._reset()  # Lazy Pirate: a REQ socket that lost its reply is unusable
                hint = " (CURVE: is this client's key allowed there?)" if self.curve else ""
                waited = time.perf_counter() - t0
                last = DeadlineError(f"no reply from {self.server}: {attempt} attempt(s) of {timeout:g}s "
                                     f"each, {waited:.1f}s in all{hint}")
                if self.on_retry is not None and attempt <= self.retries:
                    self.on_retry(attempt, last)
                continue
            hdr, tensors = P.unpack(sock.recv_multipart(copy=False))
            if isinstance(hdr, P.ErrorReply):
                last = RemoteError(hdr.code, hdr.message, hdr.retryable)
                if hdr.retryable and attempt <= self.retries:
                    if self.on_retry is not None:
                        self.on_retry(attempt, last)
                    time.sleep(self.backoff_s * attempt)
                    continue
                raise last
            if not isinstance(hdr, P.InferReply):
                raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {self.server}")
            if hdr.id != rid:
                raise ProtocolError(f"reply for request {hdr.id!r}, expected {rid!r}")
            outputs = decode(hdr.outputs, [f.buffer for f in tensors], arrays=self.arrays)
            return Result(outputs, hdr.model, hdr.label, hdr.seq, hdr.worker, hdr.queue_ms,
                          hdr.infer_ms, (time.perf_counter() - t0) * 1000, attempt, hdr.batch)
        assert last is not None
        raise last
