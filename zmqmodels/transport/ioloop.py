"""The one I/O-thread skeleton every shell (hub, subscriber, node) is built on.

An :class:`IOThread` owns a context's sockets from one thread (pyzmq's ``AuthenticationThread``
shape): it opens them in :meth:`IOThread._open` (a failure there is a start error, raised by
:meth:`start` at once), polls them with a mailbox for other threads, hands each message to its
handler in bounded bursts (so one busy socket cannot starve the others, the timers or the
mailbox), and calls :meth:`IOThread._tick` on time. A handler that raises is counted and
logged, and the loop goes on: one bad message never stops a hub or a node.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .. import defaults
from ..errors import DeadlineError, ZmqModelsError
from ..protocol.messages import Word
from .mailbox import Mailbox
from .wire import NOBLOCK, recv_frames

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["IOThread", "LoopState", "Handler"]

log = logging.getLogger("zmqmodels.ioloop")
Handler = Callable[[list[zmq.Frame]], None]


class LoopState(Word):
    NEW = "new"  # constructed; start() not called
    RUNNING = "running"  # started (its thread polls)
    CLOSED = "closed"  # closed, or its start failed; cannot be started again


class IOThread(abc.ABC):
    """Subclass and implement :meth:`_open` and :meth:`_tick` (and optionally
    :meth:`_teardown`). ``burst``: messages taken from one socket before the others get a
    turn."""

    kind = "io"  # for thread names and messages
    burst = 256

    def __init__(self, context: zmq.Context) -> None:
        self._ctx = context
        self.mailbox = Mailbox(context, self.kind)
        self.state = LoopState.NEW
        self.stats: Counter[str] = Counter()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sockets: list[zmq.Socket] = []
        self._offloaded = concurrent.futures.ThreadPoolExecutor(1, f"zmqmodels-{self.kind}-work")

    # -- for subclasses ----------------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> list[tuple[zmq.Socket, Handler]]:
        """I/O thread: create (with :meth:`_socket`), configure, bind and connect the sockets;
        return those to poll with their handlers."""

    def _tick(self, now: float) -> float:
        """I/O thread: timers; return the seconds until the next tick."""
        return 0.1  # overridden by every shell; a plain poll period otherwise

    def _wake_at(self) -> float:
        """I/O thread: the monotonic time a core asked to be ticked at (checked after every
        message, so a timer a handler set is kept to within the poll granularity)."""
        return math.inf

    def _teardown(self) -> None:
        """I/O thread: last words before the sockets close."""
        return None  # noqa: B027 (an optional hook)

    def _socket(self, kind: int) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.linger = defaults.LINGER_MS
        self._sockets.append(s)
        return s

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Self:
        if self.state is not LoopState.NEW:
            raise ZmqModelsError(f"a {type(self).__name__} can be started once")
        self.state = LoopState.RUNNING
        self._thread = threading.Thread(target=self._run, name=f"zmqmodels-{self.kind}-io", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            error = self._start_error or f"not up within {timeout:g}s"
            self.close()
            raise ZmqModelsError(f"{self.kind} failed to start: {error}")
        return self

    def close(self) -> None:
        if self.state is LoopState.CLOSED:
            return
        self.state = LoopState.CLOSED
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self.mailbox.wake()
            self._thread.join(timeout=10)
        self._offloaded.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self.start() if self.state is LoopState.NEW else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def serving(self) -> bool:
        """Started, its loop up and still running (not closing, not failed)."""
        return (self.state is LoopState.RUNNING and self._start_error is None and self._ready.is_set()
                and self._thread is not None and self._thread.is_alive())

    # -- other threads -----------------------------------------------------------------------
    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread soon."""
        self.mailbox.post(fn)

    def call(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run ``fn`` on the I/O thread and return its result (or raise its error)."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                fut.set_exception(exc)

        self.post(run)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise DeadlineError(f"{self.kind} did not act within {timeout:g}s") from None

    def offload(self, work: Callable[[], Any], then: Callable[[Any], None],
                fail: Callable[[BaseException], None]) -> None:
        """Run ``work`` on this shell's one worker thread (store and disk work never runs on
        the I/O thread), then, back on the I/O thread, ``then(result)`` or ``fail(error)``."""
        def done(fut: concurrent.futures.Future[Any]) -> None:
            exc = fut.exception()
            self.post(lambda: fail(exc) if exc is not None else then(fut.result()))

        try:
            self._offloaded.submit(work).add_done_callback(done)
        except RuntimeError:  # closing: the work would outlive the loop
            fail(ZmqModelsError(f"the {self.kind} is closing"))

    # -- the loop ----------------------------------------------------------------------------
    def _contain(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except ZmqModelsError as exc:
            self.stats[f"dropped_{exc.code}"] += 1
            log.warning("%s: dropped a message: %s", self.kind, exc)
        except Exception:
            self.stats["handler_errors"] += 1
            log.exception("%s: a handler failed; the loop goes on", self.kind)

    def _run(self) -> None:
        wake = self.mailbox.bind()
        try:
            handlers = self._open()
        except Exception as exc:
            self._start_error = exc
            for s in [*self._sockets, wake]:
                s.close()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        for sock, _ in handlers:
            poller.register(sock, zmq.POLLIN)
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_tick:
                    delay = 0.1
                    try:
                        delay = self._tick(now)
                    except Exception:
                        self.stats["tick_errors"] += 1
                        log.exception("%s: a timer failed; the loop goes on", self.kind)
                    next_tick = now + delay
                next_tick = min(next_tick, self._wake_at())
                left = next_tick - time.monotonic()
                if left >= 0.001:
                    events = dict(poller.poll(int(left * 1000)))
                else:  # a timer under a millisecond away (a held batch): zmq_poll counts in ms
                    events = dict(poller.poll(0))
                    if not events:
                        time.sleep(max(0.0, min(left, 0.0001)))
                        continue
                if wake in events:
                    self.mailbox.run_pending(wake, self._contain)
                for sock, handler in handlers:
                    if sock not in events:
                        continue
                    for _ in range(self.burst):
                        try:
                            frames = recv_frames(sock, NOBLOCK)
                        except zmq.Again:
                            break
                        self._contain(handler, frames)
        finally:
            self._contain(self._teardown)
            for s in [*self._sockets, wake]:
                s.close()
