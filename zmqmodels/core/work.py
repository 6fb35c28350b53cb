"""What the node's :class:`~.broker.Broker` takes and returns: a queued :class:`Request`, a
:class:`WorkerSlot` (a worker as the broker sees it) and its actions."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from ..protocol.messages import Word
from .swap import Target, Version

__all__ = [
    "WorkerState",
    "Request",
    "WorkerSlot",
    "Dispatch",
    "Load",
    "Refuse",
    "Expire",
    "Rejected",
    "Refetch",
    "Changed",
    "Action",
]


@dataclass(frozen=True)
class Request:
    """A queued inference request. ``seq`` pins a release (0: any); ``deadline``: the node's
    queue limit; ``expires``: when the client stops waiting (``inf``: it gave no limit).
    ``payload`` is the shell's (the frames to forward). ``key``: requests with equal keys
    may share a forward (:func:`~.batching.batch_key`; None: never joined); ``rows``: its
    size along the batch dimension."""

    client: bytes
    model: str
    rid: str
    received: float
    deadline: float
    seq: int = 0
    expires: float = math.inf
    payload: Any = None
    key: Hashable | None = None
    rows: int = 1


class WorkerState(Word):
    """What a worker process is doing, as the broker sees it (the metrics' ``state`` label)."""

    IDLE = "idle"
    BUSY = "busy"
    LOADING = "loading"
    DOWN = "down"  # not started, starting, or dead


@dataclass
class WorkerSlot:
    wid: str
    ready: bool = False
    busy: tuple[Request, ...] = ()  # the requests in hand (one forward)
    busy_seq: int = 0  # the seq they run on
    busy_since: float = 0.0  # when they were handed over
    loading: Target | None = None
    applying: bool = False  # loading by writing new weights into a spare module: it serves on
    serving: dict[str, Version] = field(default_factory=dict)
    batch: dict[str, int] = field(default_factory=dict)  # per model: the most rows it joins
    free_since: float = 0.0

    @property
    def free(self) -> bool:
        return self.ready and not self.busy and (self.loading is None or self.applying)

    @property
    def state(self) -> WorkerState:
        if self.loading:
            return WorkerState.LOADING
        if self.busy:
            return WorkerState.BUSY
        return WorkerState.IDLE if self.ready else WorkerState.DOWN


@dataclass(frozen=True)
class Dispatch:
    """Send ``requests`` (one forward: a batch when more than one) to worker ``wid``;
    ``waited``: how long the broker held them back for more."""

    wid: str
    requests: tuple[Request, ...]
    waited: float = 0.0


@dataclass(frozen=True)
class Load:
    wid: str
    target: Target
    unload_first: bool


@dataclass(frozen=True)
class Refuse:
    """Answer ``request`` with an error ``code`` (docs/protocol.md §Inference errors)."""

    request: Request
    code: str
    message: str


@dataclass(frozen=True)
class Expire:
    """Drop ``request`` unanswered: its client stopped waiting."""

    request: Request


@dataclass(frozen=True)
class Rejected:
    """``seq`` of ``name`` failed to load: discard it and tell the hub ``reason``."""

    name: str
    seq: int
    reason: str


@dataclass(frozen=True)
class Refetch:
    """The cached copy of ``seq`` of ``name`` is damaged or gone: fetch it from the hub again
    (not a rejection: the release itself was fine)."""

    name: str
    seq: int
    reason: str


@dataclass(frozen=True)
class Changed:
    """What the node would report for ``name`` may have changed."""

    name: str


Action = Dispatch | Load | Refuse | Expire | Rejected | Refetch | Changed
