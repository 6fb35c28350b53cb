"""The inference client: one REQ socket per node, Lazy-Pirate retries across nodes.

Each attempt goes to the node :class:`~zmqmodels.core.balance.Balancer` picks (the least
loaded live one this request has not tried). On a timeout that node's REQ socket is closed
(linger 0) and reopened and the request goes to another node; an error reply whose code is
retryable (``not_ready``, ``worker_lost``, ``unavailable``) does the same after a short
back-off; ``version_unavailable`` (a pinned seq not held there) tries a node that may hold it;
any other error raises :class:`RemoteError` at once. A node that refuses the connection
(nothing listens there) fails its attempt at once rather than at the timeout; an address that
is a hub, not a node, is named at once (``wrong_peer``). One client per thread: a REQ socket
must not be shared.

Time: ``timeout`` bounds each attempt, ``retries`` is how many more attempts a request may
make, so a request ends within ``timeout * (retries + 1)`` plus back-offs; every error says
which attempts were made where and how long they took in all.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.monitor

from .. import protocol as P
from ..core.balance import Balancer
from ..errors import DeadlineError, ProtocolError, RemoteError, ZmqModelsError
from ..protocol.tensors import decode, encode
from ..transport.curve import Curve
from ..transport.wire import NOBLOCK, recv_frames, send_frames

__all__ = ["Client", "Result", "Link", "addresses"]

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
    node: str = ""  # the address of the node that answered


def addresses(servers: str | Sequence[str]) -> list[str]:
    """One address or several, as a list."""
    return [servers] if isinstance(servers, str) else list(servers)


class Link:
    """A socket to one node and a monitor of its connection: whether the node refuses it (a
    connect retried and none made since the socket was opened or the connection dropped:
    nothing listens there, or the node went away)."""

    def __init__(self, ctx: zmq.Context, kind: int, address: str, curve: Curve | None, *,
                 immediate: bool = False) -> None:
        self.address = address
        self.sock = ctx.socket(kind)
        self.sock.linger = 0
        if immediate:
            self.sock.setsockopt(zmq.IMMEDIATE, 1)
        if curve is not None:
            curve.connect(self.sock)
        self.monitor = self.sock.get_monitor_socket(_WATCHED)
        self.connected = False
        self.retried = 0
        self.sock.connect(address)

    def refused(self) -> bool:
        """Read what the monitor saw; True if connecting was retried and never succeeded."""
        while self.monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.connected, self.retried = True, 0
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self.retried += 1
        return self.retried > 0 and not self.connected

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close()
        self.sock.close()


_WATCHED = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_DISCONNECTED
_REFUSED_CHECK_S = 0.02


class Client:
    """``Client("tcp://node:6000").infer("lenet", x)`` -> :class:`Result`;
    ``Client(["tcp://a:6000", "tcp://b:6000"])`` spreads requests over several nodes and
    retries elsewhere when one fails.

    ``curve``: this client's CURVE keys and the server's public key. A server that does not
    admit the key never completes the handshake: the call ends in :class:`DeadlineError`.
    ``arrays``: outputs as torch tensors (``"torch"``) or numpy arrays (``"numpy"``: torch is
    never imported; inputs may be either). ``on_retry(attempt, error)`` is called for each
    failed attempt that will be retried (the CLI prints it, so a wrong port is not silent).
    """

    def __init__(self, server: str | Sequence[str], *, timeout: float = 5.0, retries: int = 3,
                 backoff_s: float = 0.05, context: zmq.Context | None = None,
                 curve: Curve | None = None, arrays: str = "torch",
                 on_retry: Callable[[int, Exception], None] | None = None) -> None:
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays must be 'torch' or 'numpy', not {arrays!r}")
        self.servers = addresses(server)
        self.server = ", ".join(self.servers)
        self.balancer = Balancer(self.servers)
        self.arrays = arrays
        self.on_retry = on_retry
        self.curve = curve
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._ctx = context or zmq.Context.instance()
        self._links: dict[str, Link] = {}
        self._closed = False

    def _link(self, address: str) -> Link:
        if self._closed:
            raise ZmqModelsError("the Client is closed")
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = Link(self._ctx, zmq.REQ, address, self.curve)
        return link

    def _reset(self, address: str) -> None:
        link = self._links.pop(address, None)
        if link is not None:
            link.close()

    def close(self) -> None:
        for address in list(self._links):
            self._reset(address)
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
                                            *bufs), rid, timeout, seq)

    def _call(self, frames_for: Any, rid: str, timeout: float | None, seq: int = 0) -> Result:
        timeout = self.timeout if timeout is None else timeout
        last: Exception | None = None
        tried: list[str] = []
        t0 = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            now = time.monotonic()
            address = self.balancer.pick(now, tried=tried, seq=seq)
            tried.append(address)
            self.balancer.sent(address, now)
            got = self._attempt(address, frames_for(round(timeout * 1000, 3)), timeout)
            if isinstance(got, str):  # no answer: refused, or none within the timeout
                self._reset(address)  # Lazy Pirate: a REQ socket that lost its reply is unusable
                self.balancer.failed(address, time.monotonic(), got)
                last = DeadlineError(_summary(tried, attempt, timeout, t0, got, self.curve))
                if attempt <= self.retries:
                    if self.on_retry is not None:
                        self.on_retry(attempt, DeadlineError(f"{got} from {address}"))
                    if len(set(tried)) == len(self.servers):  # every node failed once: breathe
                        time.sleep(self.backoff_s * attempt)
                continue
            hdr, tensors = got
            if isinstance(hdr, P.ErrorReply):
                last = RemoteError(hdr.code, _from(hdr.message, address, self.servers), hdr.retryable)
                if hdr.code == "version_unavailable" and seq:
                    self.balancer.not_held(address, seq, time.monotonic())
                    if len(self.servers) > 1 and attempt <= self.retries:
                        continue
                    raise last
                if not hdr.retryable or attempt > self.retries:
                    self.balancer.settled(address)
                    raise last
                self.balancer.failed(address, time.monotonic(), f"{hdr.code}: {hdr.message}")
                if self.on_retry is not None:
                    self.on_retry(attempt, last)
                time.sleep(self.backoff_s * attempt)
                continue
            if not isinstance(hdr, P.InferReply):
                raise ProtocolError(f"unexpected reply {type(hdr).__name__} from {address}")
            if hdr.id != rid:
                raise ProtocolError(f"reply for request {hdr.id!r}, expected {rid!r}")
            took = time.perf_counter() - t0
            self.balancer.answered(address, took, hdr.seq)
            outputs = decode(hdr.outputs, [f.buffer for f in tensors], arrays=self.arrays)
            return Result(outputs, hdr.model, hdr.label, hdr.seq, hdr.worker, hdr.queue_ms,
                          hdr.infer_ms, took * 1000, attempt, hdr.batch, address)
        assert last is not None
        raise last

    def _attempt(self, address: str, frames: list[Any], timeout: float) -> tuple[Any, Any] | str:
        """Send to ``address`` and wait for its answer: the reply, or why there is none."""
        link = self._link(address)
        deadline = time.monotonic() + timeout
        try:  # a refused CURVE handshake drops the pipe: a blocking send would wait for ever
            if not link.sock.poll(int(timeout * 1000), zmq.POLLOUT):
                raise zmq.Again()
            send_frames(link.sock, frames, NOBLOCK, copy=False)
        except zmq.Again:
            return f"could not send within {timeout:g}s"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"no reply within {timeout:g}s"
            if link.sock.poll(int(min(left, _REFUSED_CHECK_S) * 1000) or 1):
                return P.unpack(recv_frames(link.sock))
            if link.refused():  # nothing listens there, or the node went away mid-request
                return "connection refused (nothing listens there?)"


def _from(message: str, address: str, servers: list[str]) -> str:
    """A node's error message; with several nodes, which one said it."""
    return message if len(servers) == 1 else f"{message} (from {address})"


def _summary(tried: list[str], attempt: int, timeout: float, t0: float, why: str, curve: Any) -> str:
    """The error a request ends with: the last failure, then every attempt made, once."""
    where = ", ".join(dict.fromkeys(tried))
    hint = " (CURVE: is this client's key allowed there?)" if curve and "refused" not in why else ""
    return (f"{why} from {tried[-1]}{hint}; {attempt} attempt{'s' * (attempt > 1)} (to {where}) of at "
            f"most {timeout:g}s each, {time.perf_counter() - t0:.1f}s in all")
