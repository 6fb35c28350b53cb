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

__all__ = ["connect_upstream"]


def connect_upstream(socket: Callable[[int], Any], address: str, models: Sequence[str], *,
                     limits: Limits, rcvhwm: int, curve: Curve | None = None,
                     every: bool = False) -> tuple[Any, Any]:
    """``(sub, dealer)`` connected to the hub or relay at ``address`` (its PUB one port up);
    ``socket(kind)`` makes each socket (the shell's, so it owns and closes them); ``every``:
    every topic (a relay that forwards all models)."""
    sub, dealer = socket(zmq.SUB), socket(zmq.DEALER)
    sub.rcvhwm = rcvhwm
    for s in (sub, dealer):  # never buffer a frame bigger than any we accept
        s.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
        if curve is not None:
            curve.connect(s)
    sub.setsockopt(zmq.SUBSCRIBE, P.HUB_TOPIC)
    for topic in [b""] if every else [P.topic(name) for name in models]:
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(P.pub_endpoint(address))
    dealer.connect(address)
    return sub, dealer
