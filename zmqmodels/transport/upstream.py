"""The upstream side every follower of a hub shares (a node's follower, a relay): a SUB for
the broadcasts of the models it follows (and the hub's own beat) and a DEALER for fetches and
reports, both bounded to the largest frame accepted and, with ``curve``, secured to the
upstream's key (the ZeroMQ guide's "Clone" pattern: subscribe, then ask for what was missed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import zmq

from .. import protocol as P
from ..defaults import Limits
from .curve import Curve

__all__ = ["connect_upstream", "Upstream", "hub_list"]


def hub_list(hubs: str | Sequence[str]) -> list[str]:
    """One hub address or several (hubs on one shared store), as a list."""
    out = [hubs] if isinstance(hubs, str) else list(hubs)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"give one or more distinct hub addresses, not {out!r}")
    return out


class Upstream:
    """The sockets to every upstream hub: one SUB subscribed to all of their PUBs and one
    DEALER per hub. A report goes to every hub (each keeps the fleet table); any other request
    (a fetch) to one hub, taking turns, skipping a hub with no connection (with several hubs
    the DEALERs are ``IMMEDIATE``: a dead hub's share is not queued for it, it goes to the next)."""

    def __init__(self, sub: Any, dealers: list[Any]) -> None:
        self.sub, self.dealers = sub, dealers
        self._turn = 0

    def send(self, msg: Any) -> bool:
        frames = P.pack(msg)
        if len(self.dealers) == 1:
            self.dealers[0].send_multipart(frames)
            return True
        if isinstance(msg, P.Report):
            return sum(self._try(d, frames) for d in self.dealers) > 0
        for _ in range(len(self.dealers)):
            self._turn = (self._turn + 1) % len(self.dealers)
            if self._try(self.dealers[self._turn], frames):
                return True
        return False  # no hub connected: the intake asks again after its timeout

    @staticmethod
    def _try(dealer: Any, frames: list[Any]) -> bool:
        try:
            dealer.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False


def connect_upstream(socket: Callable[[int], Any], hubs: str | Sequence[str], models: Sequence[str], *,
                     limits: Limits, rcvhwm: int, curve: Curve | None = None,
                     every: bool = False) -> Upstream:
    """The :class:`Upstream` of the hubs or relays at ``hubs`` (each's PUB one port up);
    ``socket(kind)`` makes each socket (the shell's, so it owns and closes them); ``every``:
    every topic (a relay that forwards all models)."""
    addresses = hub_list(hubs)
    sub = socket(zmq.SUB)
    dealers = [socket(zmq.DEALER) for _ in addresses]
    sub.rcvhwm = rcvhwm
    for s in (sub, *dealers):  # never buffer a frame bigger than any we accept
        s.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
        if curve is not None:
            curve.connect(s)
    if len(dealers) > 1:
        for d in dealers:
            d.setsockopt(zmq.IMMEDIATE, 1)
    sub.setsockopt(zmq.SUBSCRIBE, P.HUB_TOPIC)
    for topic in [b""] if every else [P.topic(name) for name in models]:
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    for address, dealer in zip(addresses, dealers, strict=True):
        sub.connect(P.pub_endpoint(address))
        dealer.connect(address)
    return Upstream(sub, dealers)
