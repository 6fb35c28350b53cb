"""The pipelined inference client: asyncio, one DEALER socket, many requests in flight.

A node's ROUTER answers each request on the connection it came from, tagged with the request's
``id``; a DEALER that sends the REQ envelope's empty delimiter itself may therefore keep any
number of requests outstanding and match replies by id, which is what lets one process offer a
batching node enough concurrency. The socket is a plain one watched through its ZMQ_FD with
``loop.add_reader`` (zmq.asyncio's per-call futures cost more than the request itself: this
way one process sends about twice as many). Timeouts and retries follow
:class:`~zmqmodels.clients.client.Client`: an attempt that gets no reply within ``timeout`` is
sent again (same id: whichever answer comes first wins, a late duplicate is dropped), a
retryable error is retried after a back-off, any other error raises :class:`RemoteError`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterable
from typing import Any

import zmq

from .. import protocol as P
from ..errors import DeadlineError, ProtocolError, RemoteError, ZmqModelsError
from ..protocol.tensors import decode, encode
from ..transport.curve import Curve
from .client import Result

__all__ = ["AsyncClient"]

_ids = itertools.count(1)
# plain ints: pyzmq's flag enums cost more per call than the rest of a send
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK, _MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)


class AsyncClient:
    """``async with AsyncClient("tcp://node:6000") as c: await c.infer("mlp", x)``.

    ``arrays`` and ``curve`` as for :class:`~zmqmodels.clients.client.Client`. All calls must come from
    the event loop the client was first used in."""

    def __init__(self, server: str, *, timeout: float = 5.0, retries: int = 3, backoff_s: float = 0.05,
                 curve: Curve | None = None, arrays: str = "torch",
                 context: zmq.Context | None = None) -> None:
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', not {arrays!r}")
        self.server, self.timeout, self.retries, self.backoff_s = server, timeout, retries, backoff_s
        self.curve, self.arrays = curve, arrays
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._waiting: dict[str, asyncio.Future[tuple[Any, list[Any]]]] = {}
        self._closed = False
        self.dropped = 0  # replies nobody waited for (late duplicates of a retried request)

    def _socket(self) -> zmq.Socket:
        if self._closed:
            raise ZmqModelsError("the AsyncClient is closed")
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            if self.curve is not None:
                self.curve.connect(sock)
            sock.connect(self.server)
            self._sock, self._loop = sock, asyncio.get_running_loop()
            self._fd = sock.getsockopt(zmq.FD)
            self._loop.add_reader(self._fd, self._drain)
        return self._sock

    def _drain(self) -> None:
        """Take every reply queued (ZMQ_FD is edge-triggered: read until EVENTS says none)."""
        sock = self._sock
        while sock is not None and sock.getsockopt(_EVENTS) & _POLLIN:
            frames = sock.recv_multipart(_NOBLOCK, copy=False)
            try:
                if len(frames) < 2 or frames[0].bytes != b"":
                    raise ProtocolError("a reply without the empty delimiter")
                hdr, tensors = P.unpack(frames[1:])
            except ProtocolError:
                self.dropped += 1
                continue
            fut = self._waiting.pop(getattr(hdr, "id", ""), None)
            if fut is None or fut.done():
                self.dropped += 1
                continue
            fut.set_result((hdr, tensors))

    async def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            self._sock.close()
            self._sock = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ZmqModelsError("the AsyncClient was closed"))
        self._waiting.clear()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def infer(self, model: str, *inputs: Any, timeout: float | None = None, seq: int = 0) -> Result:
        """Run ``model`` on ``inputs``, as :meth:`Client.infer <zmqmodels.clients.client.Client.infer>`."""
        spec, bufs = encode(tuple(inputs))
        t0 = time.perf_counter()
        hdr, tensors, attempt = await self.request(model, spec, bufs, timeout=timeout, seq=seq)
        outputs = decode(hdr.outputs, [f.buffer for f in tensors], arrays=self.arrays)
        return Result(outputs, hdr.model, hdr.label, hdr.seq, hdr.worker, hdr.queue_ms, hdr.infer_ms,
                      (time.perf_counter() - t0) * 1000, attempt, hdr.batch)

    async def request(self, model: str, spec: Any, buffers: list[Any], *, timeout: float | None = None,
                      seq: int = 0, retries: int | None = None) -> tuple[P.InferReply, list[Any], int]:
        """The raw exchange under :meth:`infer`: an ``INFER`` of the tensor-tree ``spec`` and
        its ``buffers`` (sent as they are) -> ``(reply header, tensor frames, attempts)``."""
        timeout = self.timeout if timeout is None else timeout
        rid = f"{os.getpid()}-a{next(_ids)}"
        header = P.InferRequest(model, rid, spec, seq, timeout_ms=round(timeout * 1000, 3))
        hdr, tensors, attempt = await self._exchange(rid, [b"", *P.pack(header, *buffers)], timeout,
                                                     self.retries if retries is None else retries)
        if not isinstance(hdr, P.InferReply):
            raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {self.server}")
        return hdr, tensors, attempt

    async def models(self, *, timeout: float | None = None, retries: int = 0) -> P.ModelsReply:
        """What the node serves now (``MODELS``): its models, the seqs its workers hold, their
        signatures."""
        rid = f"{os.getpid()}-m{next(_ids)}"
        timeout = self.timeout if timeout is None else timeout
        hdr, _, _ = await self._exchange(rid, [b"", *P.pack(P.ModelsRequest(id=rid))], timeout, retries)
        if not isinstance(hdr, P.ModelsReply):
            raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {self.server}")
        return hdr

    async def _exchange(self, rid: str, frames: list[Any], timeout: float,
                        retries: int) -> tuple[Any, list[Any], int]:
        t0 = time.perf_counter()
        last: Exception | None = None
        for attempt in range(1, retries + 2):
            sock = self._socket()
            assert self._loop is not None
            fut = self._waiting[rid] = self._loop.create_future()  # a late reply to an earlier try lands here
            timer = self._loop.call_later(timeout, _expire, fut)
            try:
                for f in frames[:-1]:
                    sock.send(f, _MORE, copy=False)
                sock.send(frames[-1], _NOBLOCK, copy=False)
            except zmq.Again:
                pass  # no peer connected yet (nothing was queued): the timeout sends it again
            self._drain()  # a send may consume the FD's edge: look for replies now
            try:
                hdr, tensors = await fut
            except TimeoutError:
                self._waiting.pop(rid, None)
                last = DeadlineError(f"no reply from {self.server}: {attempt} attempt(s) of {timeout:g}s "
                                     f"each, {time.perf_counter() - t0:.1f}s in all")
                continue  # the same id again: whichever answer comes first is taken
            finally:
                timer.cancel()
            if isinstance(hdr, P.ErrorReply):
                last = RemoteError(hdr.code, hdr.message, hdr.retryable)
                if hdr.retryable and attempt <= retries:
                    await asyncio.sleep(self.backoff_s * attempt)
                    continue
                raise last
            return hdr, tensors, attempt
        assert last is not None
        raise last

    async def infer_many(self, model: str, inputs: Iterable[Any], *, in_flight: int = 64,
                         timeout: float | None = None, seq: int = 0,
                         return_exceptions: bool = False) -> list[Any]:
        """One request per item of ``inputs`` (a tensor or array, or a tuple of the
        arguments), at most ``in_flight`` outstanding; results in input order. An error raises
        (the rest are cancelled) unless ``return_exceptions``, which puts it in its place."""
        gate = asyncio.Semaphore(max(1, in_flight))

        async def one(x: Any) -> Any:
            async with gate:
                args = x if isinstance(x, tuple) else (x,)
                return await self.infer(model, *args, timeout=timeout, seq=seq)

        return await asyncio.gather(*(one(x) for x in inputs), return_exceptions=return_exceptions)


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())

