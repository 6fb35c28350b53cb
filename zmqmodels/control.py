"""A client for the hub's control requests (publish, rollback, status), as the CLI uses it.

Each request opens its own DEALER, waits for one reply under a deadline and closes the socket
(linger 0), so a dead hub costs a timeout, never a hang.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from . import protocol as P
from .errors import DeadlineError, ProtocolError, RemoteError
from .release import Release, encode_manifest

__all__ = ["HubClient"]


class HubClient:
    """Talk to a hub at its one address: ``HubClient("tcp://hub:5555").status()``."""

    def __init__(self, hub: str, *, timeout: float = 10.0, context: zmq.Context | None = None) -> None:
        self.hub = hub
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()

    def _request(self, frames: list[Any], expect: bytes, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        s = self._ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect(self.hub)
            s.send_multipart(frames, copy=False)
            if not s.poll(int(timeout * 1000)):
                raise DeadlineError(f"no reply from hub {self.hub} within {timeout:g}s")
            reply = s.recv_multipart()
        finally:
            s.close()
        kind = reply[0] if reply else b""
        if kind == b"ERROR" and len(reply) == 2:
            err = P.decode_header(kind, reply[1])
            raise RemoteError(err.code, err.message, err.retryable)
        if kind != expect or len(reply) != 2:
            raise ProtocolError(f"unexpected reply {kind[:32]!r} from hub")
        return P.decode_header(kind, reply[1])

    def publish(self, release: Release, timeout: float | None = 120.0) -> P.Published:
        """Hand a release to the hub, which verifies, stores (assigning seq) and broadcasts it."""
        frames = [b"PUBLISH", P.encode(P.Publish()), encode_manifest(release.manifest),
                  *release.chunks]
        return self._request(frames, b"PUBLISHED", timeout)

    def rollback(self, name: str, to: str, timeout: float | None = 60.0) -> P.Published:
        return self._request([b"ROLLBACK", P.encode(P.Rollback(name, to))], b"PUBLISHED", timeout)

    def status(self, timeout: float | None = None) -> P.StatusReply:
        return self._request([b"STATUS", P.encode(P.StatusRequest())], b"STATUS_REPLY", timeout)

    def wait_for(self, name: str, seq: int, count: int, timeout: float,
                 poll_s: float = 0.2) -> tuple[bool, P.StatusReply]:
        """Poll status until ``count`` nodes serve ``name`` at ``seq``; False on a rejection or
        at the deadline (the same rule as :meth:`Publisher.wait_for`)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            serving, rejected = P.rollout(st, name, seq)
            if rejected or serving >= count or time.monotonic() >= deadline:
                return serving >= count and not rejected, st
            time.sleep(poll_s)
