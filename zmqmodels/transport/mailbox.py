"""The mailbox of an I/O thread: how other threads hand it work (the sockets stay with their
one owner).

Callers queue a callable and wake the I/O thread through a short-lived inproc PUSH of their
own; the I/O thread owns the PULL end, polls it beside its other sockets and runs what is
queued. The pattern of pyzmq's ``ThreadAuthenticator`` pipe, without a shared socket.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable

import zmq

__all__ = ["Mailbox"]


class Mailbox:
    def __init__(self, ctx: zmq.Context, name: str) -> None:
        self._ctx = ctx
        self.addr = f"inproc://zmqmodels-{name}-wake-{uuid.uuid4().hex}"
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def bind(self) -> zmq.Socket:
        """I/O thread: create and bind the PULL end (register it with the poller)."""
        sock = self._ctx.socket(zmq.PULL)
        sock.linger = 0
        sock.bind(self.addr)
        return sock

    def wake(self) -> None:
        s = self._ctx.socket(zmq.PUSH)
        s.linger = 100
        try:
            s.connect(self.addr)
            s.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the pipe is full: the I/O thread is awake anyway
        finally:
            s.close()

    def post(self, fn: Callable[[], None]) -> None:
        """Any thread: run ``fn`` on the I/O thread soon."""
        self._queue.put(fn)
        self.wake()

    def run_pending(self, sock: zmq.Socket,
                    run: Callable[[Callable[[], None]], None] = lambda fn: fn()) -> None:
        """I/O thread: drain the wake-ups on ``sock``, then ``run`` every queued command."""
        while sock.poll(0):
            sock.recv()
        while True:
            try:
                fn = self._queue.get_nowait()
            except queue.Empty:
                return
            run(fn)


