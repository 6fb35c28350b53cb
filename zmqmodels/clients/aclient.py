"""The pipelined inference client: asyncio, one DEALER socket, many requests in flight.

A node's ROUTER answers each request on the connection it came from, tagged with the request's
``id``; a DEALER that sends the REQ envelope's empty delimiter itself may therefore keep any
number of requests outstanding and match replies by id, which is what lets one process offer a
batching node enough concurrency. The socket is a plain one watched through its ZMQ_FD with
``loop.add_reader`` (zmq.asyncio's per-call futures cost more than the request itself: this
way one process sends about twice as many). Timeouts, retries and
the choice among several nodes follow :class:`~zmqmodels.clients.client.Client`: an attempt that
gets no reply within ``timeout`` is sent again, to another node if there is one (same id:
whichever answer comes first wins, a late duplicate is dropped), a retryable error is retried
after a back-off, any other error raises :class:`RemoteError`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from .. import protocol as P
from ..core.balance import Balancer
from ..errors import DeadlineError, ProtocolError, RemoteError, ZmqModelsError
from ..protocol.tensors import decode, encode
from ..transport.curve import Curve
from ..transport.wire import recv_frames, send_frames
from .client import Link, Result, _from, _summary, addresses

__all__ = ["AsyncClient"]

_ids = itertools.count(1)
# plain ints: pyzmq's flag enums cost more per call than the rest of a send
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)


class AsyncClient:
    """``async with AsyncClient("tcp://node:6000") as c: await c.infer("mlp", x)``;
    ``AsyncClient(["tcp://a:6000", "tcp://b:6000"])`` spreads requests over several nodes (the
    least loaded live one takes each attempt, :class:`~zmqmodels.core.balance.Balancer`) and
    retries elsewhere when one times out, refuses the connection or answers a retryable error.

    ``arrays`` and ``curve`` as for :class:`~zmqmodels.clients.client.Client`. All calls must come from
    the event loop the client was first used in."""

    def __init__(self, server: str | Sequence[str], *, timeout: float = 5.0, retries: int = 3,
                 backoff_s: float = 0.05, curve: Curve | None = None, arrays: str = "torch",
                 context: zmq.Context | None = None) -> None:
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', not {arrays!r}")
        self.servers = addresses(server)
        self.server = ", ".join(self.servers)
        self.balancer = Balancer(self.servers)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.curve, self.arrays = curve, arrays
        self._ctx = context or zmq.Context.instance()
        self._links: dict[str, Link] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, tuple[asyncio.Future[tuple[Any, list[Any]]], str]] = {}
        self._closed = False
        self.dropped = 0  # replies nobody waited for (late duplicates of a retried request)
        self.last_node = ""  # the node that gave the last answer

    def _link(self, address: str) -> Link:
        if self._closed:
            raise ZmqModelsError("the AsyncClient is closed")
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = Link(self._ctx, zmq.DEALER, address, self.curve)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(link.sock.getsockopt(zmq.FD), self._drain, link)
            self._loop.add_reader(link.monitor.getsockopt(zmq.FD), self._watch, link)
        return link

    def _drop_link(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(link.sock.getsockopt(zmq.FD))
            self._loop.remove_reader(link.monitor.getsockopt(zmq.FD))
        link.close()

    def _watch(self, link: Link) -> None:
        """The monitor of ``link`` is readable: if the node refuses the connection, every request
        waiting on it fails now (and is retried elsewhere) instead of at its timeout."""
        if link.address not in self._links or not link.refused():
            return
        for rid, (fut, address) in list(self._waiting.items()):
            if address == link.address and not fut.done():
                fut.set_exception(_Refused())
                self._waiting.pop(rid, None)
        self._drop_link(link.address)  # a fresh socket (and monitor) for the next try there

    def _drain(self, link: Link) -> None:
        """Take every reply queued (ZMQ_FD is edge-triggered: read until EVENTS says none)."""
        sock = link.sock
        while not sock.closed and sock.getsockopt(_EVENTS) & _POLLIN:
            frames = recv_frames(sock, _NOBLOCK)
            try:
                if len(frames) < 2 or frames[0].bytes != b"":
                    raise ProtocolError("a reply without the empty delimiter")
                hdr, tensors = P.unpack(frames[1:])
            except ProtocolError:
                self.dropped += 1
                continue
            waiting = self._waiting.pop(getattr(hdr, "id", ""), None)
            if waiting is None or waiting[0].done():
                self.dropped += 1
                continue
            waiting[0].set_result((hdr, tensors))

    async def close(self) -> None:
        self._closed = True
        for address in list(self._links):
            self._drop_link(address)
        for fut, _ in self._waiting.values():
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
                      (time.perf_counter() - t0) * 1000, attempt, hdr.batch, self.last_node)

    async def request(self, model: str, spec: Any, buffers: list[Any], *, timeout: float | None = None,
                      seq: int = 0, retries: int | None = None) -> tuple[P.InferReply, list[Any], int]:
        """The raw exchange under :meth:`infer`: an ``INFER`` of the tensor-tree ``spec`` and
        its ``buffers`` (sent as they are) -> ``(reply header, tensor frames, attempts)``."""
        timeout = self.timeout if timeout is None else timeout
        rid = f"{os.getpid()}-a{next(_ids)}"
        header = P.InferRequest(model, rid, spec, seq, timeout_ms=round(timeout * 1000, 3))
        hdr, tensors, attempt = await self._exchange(rid, [b"", *P.pack(header, *buffers)], timeout,
                                                     self.retries if retries is None else retries, seq)
        if not isinstance(hdr, P.InferReply):
            raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {self.server}")
        return hdr, tensors, attempt

    async def models(self, *, timeout: float | None = None, retries: int = 0) -> P.ModelsReply:
        """What a node serves now (``MODELS``): its models, the seqs its workers hold, their
        signatures."""
        rid = f"{os.getpid()}-m{next(_ids)}"
        timeout = self.timeout if timeout is None else timeout
        hdr, _, _ = await self._exchange(rid, [b"", *P.pack(P.ModelsRequest(id=rid))], timeout, retries)
        if not isinstance(hdr, P.ModelsReply):
            raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {self.server}")
        return hdr

    async def _exchange(self, rid: str, frames: list[Any], timeout: float, retries: int,
                        seq: int = 0) -> tuple[Any, list[Any], int]:
        t0 = time.perf_counter()
        last: Exception | None = None
        tried: list[str] = []
        for attempt in range(1, retries + 2):
            got = await self._attempt(rid, frames, timeout, tried, seq)
            address = tried[-1]
            if isinstance(got, str):
                self.balancer.failed(address, time.monotonic(), got)
                last = DeadlineError(_summary(tried, attempt, timeout, t0, got, self.curve))
                if len(set(tried)) == len(self.servers) and attempt <= retries:
                    await asyncio.sleep(self.backoff_s * attempt)
                continue  # the same id again: whichever answer comes first is taken
            hdr, tensors = got
            if isinstance(hdr, P.ErrorReply):
                last = RemoteError(hdr.code, _from(hdr.message, address, self.servers), hdr.retryable)
                if hdr.code == "version_unavailable" and seq and len(self.servers) > 1:
                    self.balancer.not_held(address, seq, time.monotonic())
                    continue
                if hdr.retryable and attempt <= retries:
                    self.balancer.failed(address, time.monotonic(), f"{hdr.code}: {hdr.message}")
                    await asyncio.sleep(self.backoff_s * attempt)
                    continue
                self.balancer.settled(address)
                raise last
            self.balancer.answered(address, time.perf_counter() - t0, getattr(hdr, "seq", 0))
            self.last_node = address
            return hdr, tensors, attempt
        assert last is not None
        raise last

    async def _attempt(self, rid: str, frames: list[Any], timeout: float, tried: list[str],
                       seq: int) -> tuple[Any, list[Any]] | str:
        """One try on the node the balancer picks: the reply, or why there is none."""
        now = time.monotonic()
        address = self.balancer.pick(now, tried=tried, seq=seq)
        tried.append(address)
        self.balancer.sent(address, now)
        link = self._link(address)
        assert self._loop is not None
        fut = self._loop.create_future()  # a late reply to an earlier try lands in the newest
        self._waiting[rid] = (fut, address)
        timer = self._loop.call_later(timeout, _expire, fut)
        try:
            send_frames(link.sock, frames, _NOBLOCK, copy=False)
        except zmq.Again:
            pass  # no peer connected yet (nothing was queued): the timeout sends it again
        self._drain(link)  # a send may consume the FD's edge: look for replies now
        self._watch(link)
        try:
            return await fut
        except TimeoutError:
            self._waiting.pop(rid, None)
            return f"no reply within {timeout:g}s"
        except _Refused:
            return "connection refused (nothing listens there?)"
        finally:
            timer.cancel()

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


class _Refused(Exception):
    pass


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())

