"""The pipelined inference client: asyncio, one DEALER socket, many requests in flight.

A node's ROUTER answers each request on the connection it came from, tagged with the request's
``id``; a DEALER that sends the REQ envelope's empty delimiter itself may therefore keep any
number of requests outstanding and match replies by id, which is what lets one process offer a
batching node enough concurrency. Timeouts and retries follow :class:`~zmqmodels.client.Client`:
an attempt that gets no reply within ``timeout`` is sent again (same id: whichever answer comes
first wins, a late duplicate is dropped), a retryable error is retried after a back-off, any
other error raises :class:`RemoteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.asyncio

from . import protocol as P
from .client import Result
from .curve import Curve
from .errors import DeadlineError, ProtocolError, RemoteError, ZmqModelsError
from .tensors import decode, encode

__all__ = ["AsyncClient"]

_ids = itertools.count(1)


class AsyncClient:
    """``async with AsyncClient("tcp://node:6000") as c: await c.infer("mlp", x)``.

    ``arrays`` and ``curve`` as for :class:`~zmqmodels.client.Client`. All calls must come from
    the event loop the client was first used in."""

    def __init__(self, server: str, *, timeout: float = 5.0, retries: int = 3, backoff_s: float = 0.05,
                 curve: Curve | None = None, arrays: str = "torch",
                 context: zmq.asyncio.Context | None = None) -> None:
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', not {arrays!r}")
        self.server, self.timeout, self.retries, self.backoff_s = server, timeout, retries, backoff_s
        self.curve, self.arrays = curve, arrays
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[tuple[Any, list[Any]]]] = {}
        self._closed = False
        self.dropped = 0  # replies nobody waited for (late duplicates of a retried request)

    def _socket(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise ZmqModelsError("the AsyncClient is closed")
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            if self.curve is not None:
                self.curve.connect(sock)
            sock.connect(self.server)
            self._sock = sock
            self._reader = asyncio.get_running_loop().create_task(self._read(sock))
        return self._sock

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            try:
                if len(frames) < 2 or frames[0].bytes != b"":
                    raise ProtocolError("a reply without the empty delimiter")
                hdr, tensors = P.unpack(frames[1:])
                rid = getattr(hdr, "id", "")
            except ProtocolError:
                self.dropped += 1
                continue
            fut = self._waiting.pop(rid, None)
            if fut is None or fut.done():
                self.dropped += 1
                continue
            fut.set_result((hdr, tensors))

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
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
        """Run ``model`` on ``inputs``, as :meth:`Client.infer <zmqmodels.client.Client.infer>`."""
        timeout = self.timeout if timeout is None else timeout
        spec, bufs = encode(tuple(inputs))
        rid = f"{os.getpid()}-a{next(_ids)}"
        header = P.InferRequest(model, rid, spec, seq, timeout_ms=round(timeout * 1000, 3))
        frames = [b"", *P.pack(header, *bufs)]
        t0 = time.perf_counter()
        last: Exception | None = None
        for attempt in range(1, self.retries + 2):
            sock = self._socket()
            fut = self._waiting.get(rid)
            if fut is None or fut.done():
                fut = self._waiting[rid] = asyncio.get_running_loop().create_future()
            await sock.send_multipart(frames, copy=False)
            try:
                hdr, tensors = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                last = DeadlineError(f"no reply from {self.server}: {attempt} attempt(s) of {timeout:g}s "
                                     f"each, {time.perf_counter() - t0:.1f}s in all")
                continue  # the same id again: whichever answer comes first is taken
            if isinstance(hdr, P.ErrorReply):
                last = RemoteError(hdr.code, hdr.message, hdr.retryable)
                if hdr.retryable and attempt <= self.retries:
                    await asyncio.sleep(self.backoff_s * attempt)
                    continue
                raise last
            if not isinstance(hdr, P.InferReply):
                raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {self.server}")
            outputs = decode(hdr.outputs, [f.buffer for f in tensors], arrays=self.arrays)
            return Result(outputs, hdr.model, hdr.label, hdr.seq, hdr.worker, hdr.queue_ms, hdr.infer_ms,
                          (time.perf_counter() - t0) * 1000, attempt, hdr.batch)
        self._waiting.pop(rid, None)
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
