"""The hub's fleet table, sans I/O: node reports in, rows and the rollout verdict out.

A plain class fed ``(report, now)``; the hub's I/O thread owns one and reads it under a lock.
:func:`tally` is the one rule behind ``publish --wait-for`` (hub side and client side).

**Liveness**: a node sends a report for each model every heartbeat interval (0.5 s). A row not
refreshed for ``lost_after_s`` is shown as ``lost`` (with its last state in the reason and
the time since it was heard in ``age_s``) and never counts as serving; after
``forget_after_s`` it is dropped from the table. A node that stops cleanly says so last
(``stopped``): its row stays ``stopped``, never lost, until it is forgotten or the node
(the same id: a restart) reports again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

from .. import defaults
from .. import protocol as P
from ..errors import ProtocolError, ReleaseError

__all__ = ["FleetEntry", "Fleet", "Tally", "base_seq", "tally", "wait_for", "wait_rollout"]


@dataclass(frozen=True)
class FleetEntry:
    """The newest report of one (node, model), when it came, and the last rejection."""

    report: P.Report
    seen: float  # monotonic time of the newest report
    rejected_seq: int = 0  # the last seq this node rejected for this model, 0 = none
    rejected_reason: str = ""

    def row(self, now: float, lost_after_s: float = math.inf) -> P.NodeStatus:
        r = self.report
        age = now - self.seen
        state, reason = r.state, r.reason
        if age > lost_after_s and state != P.ModelState.STOPPED:
            state = P.ModelState.LOST
            reason = f"not heard from for {age:.0f}s (last: {r.state} seq {r.seq})"
        return P.NodeStatus(r.node, r.model, state, r.seq, r.label, reason, r.host, r.pid,
                            r.device, round(age, 3), self.rejected_seq, self.rejected_reason,
                            r.stages, r.stages_seq, r.via, r.staged, r.labels, r.requests,
                            r.errors, r.moved, r.how, r.how_reason, r.format)


class Fleet:
    """``(node, model) -> FleetEntry``, bounded at ``max_entries`` (node ids come from peers:
    the longest-silent entry is forgotten first, so the table never grows without bound)."""

    def __init__(self, max_entries: int = 10_000, *, lost_after_s: float = defaults.NODE_LOST_AFTER_S,
                 forget_after_s: float = defaults.NODE_FORGET_AFTER_S) -> None:
        self.max_entries = max_entries
        self.lost_after_s, self.forget_after_s = lost_after_s, forget_after_s
        self._entries: dict[tuple[str, str], FleetEntry] = {}
        self.evicted = 0
        self.forgotten = 0

    def __len__(self) -> int:
        return len(self._entries)

    def report(self, report: P.Report, now: float) -> FleetEntry | None:
        """Record ``report``; return the entry it replaced (None for a new row)."""
        if report.state == P.ModelState.LOST:
            raise ProtocolError(f"a node cannot report state {report.state!r}")
        key = (report.node, report.model)
        prev = self._entries.get(key)
        entry = FleetEntry(report, now) if prev is None else replace(prev, report=report, seen=now)
        if report.state == P.ModelState.REJECTED:
            entry = replace(entry, rejected_seq=report.seq, rejected_reason=report.reason)
        elif report.state == P.ModelState.SERVING and 0 < entry.rejected_seq < report.seq:
            entry = replace(entry, rejected_seq=0, rejected_reason="")  # a newer one serves: past
        if prev is None and len(self._entries) >= self.max_entries:
            del self._entries[min(self._entries, key=lambda k: self._entries[k].seen)]
            self.evicted += 1
        self._entries[key] = entry
        return prev

    def rows(self, now: float) -> list[P.NodeStatus]:
        return [e.row(now, self.lost_after_s) for _, e in sorted(self._entries.items())]

    def prune(self, now: float) -> list[FleetEntry]:
        """Forget rows silent for ``forget_after_s``; return them."""
        gone = [k for k, e in self._entries.items() if now - e.seen > self.forget_after_s]
        self.forgotten += len(gone)
        return [self._entries.pop(k) for k in gone]

    def highest_seq(self, model: str) -> int:
        """The highest seq of ``model`` any node in the table has reported (held, arriving or
        refused): a store behind it must number past it."""
        return max((max(e.report.seq, e.report.staged) for (_, m), e in self._entries.items() if m == model),
                   default=0)

    def lost(self, now: float) -> list[FleetEntry]:
        return [e for e in self._entries.values()
                if now - e.seen > self.lost_after_s and e.report.state != P.ModelState.STOPPED]


@dataclass(frozen=True)
class Tally:
    """Where the fleet stands on one release: the one rule behind ``publish --wait-for``, the
    hub's :meth:`~zmqmodels.hub.hub.Hub.wait_for`, the CLI's progress line and ``releases``."""

    serving: int  # nodes serving it (lost nodes never count)
    on_the_way: int  # receiving, verified or loading it
    rejected: list[str]  # nodes that rejected it
    broken: int  # nodes lost or in error (whatever release)
    rows: int  # nodes following the model
    held: int = 0  # nodes holding it staged (verified and cached, served once activated)

    def reached(self, count: int, *, staged: bool = False) -> bool:
        """``count`` nodes serve it (``staged``: serve it or hold it staged) and none refused it."""
        return self.serving + (self.held if staged else 0) >= count and not self.rejected


_ON_THE_WAY = (P.ModelState.RECEIVING, P.ModelState.VERIFIED, P.ModelState.LOADING)


def tally(rows: Sequence[P.NodeStatus], name: str, seq: int, *, or_newer: bool = False,
          nodes: Collection[str] | None = None) -> Tally:
    """The :class:`Tally` of ``name`` ``seq`` over fleet ``rows`` (of ``nodes`` only, if
    given); ``or_newer``: a node serving a newer seq counts as serving it (activation)."""
    mine = [r for r in rows if r.model == name and (nodes is None or r.node in nodes)]
    at = [r for r in mine if r.state == P.ModelState.SERVING and (r.seq >= seq if or_newer else r.seq == seq)]
    return Tally(len(at), sum(r.seq == seq and r.state in _ON_THE_WAY for r in mine),
                 [r.node for r in mine if r.rejected_seq == seq],
                 sum(r.state in (P.ModelState.LOST, P.ModelState.ERROR) for r in mine), len(mine),
                 sum(r.staged == seq and r.state != P.ModelState.LOST for r in mine))


def base_seq(status: P.StatusReply, name: str) -> int | None:
    """The release of ``name`` that new weights build on (``publish_weights``, ``--like``, a
    delta): the newest that some node serves or that is active fleet-wide, never one the
    fleet refused (some node rejected it and none serves it). Nothing serves and no active
    release stands (only staged ones, or the active one was refused): the newest stored, unless
    refused too (:class:`ReleaseError`). None: no release of ``name`` is stored."""
    model = next((m for m in status.models if m.name == name), None)
    if model is None:
        return None
    rows = [r for r in status.nodes if r.model == name and r.state != P.ModelState.LOST]
    serving = {r.seq for r in rows if r.state == P.ModelState.SERVING}
    refused = {r.rejected_seq for r in rows if r.rejected_seq} - serving
    candidates = serving | ({model.active} - refused - {0})
    if candidates:
        return max(candidates)
    if model.seq not in refused:
        return model.seq
    return _refused(name, model.seq, rows)


def _refused(name: str, seq: int, rows: Sequence[P.NodeStatus]) -> int:
    why = next((r.last_error for r in rows if r.rejected_seq == seq and r.last_error), "")
    raise ReleaseError(f"no release of {name} to build on: {sum(r.rejected_seq == seq for r in rows)} "
                       f"node(s) rejected seq {seq} and none serves another"
                       + (f" ({why[:200]})" if why else "") + "; publish a whole release or roll back")


def wait_for(status: Callable[[], P.StatusReply], name: str, seq: int, count: int, timeout: float, *,
             clock: Callable[[], float], pause: Callable[[float], None],
             on_status: Callable[[P.StatusReply], None] | None = None,
             staged: bool = False) -> tuple[bool, P.StatusReply]:
    """Ask ``status`` (a hub's or a :class:`HubClient`'s) until ``count`` nodes serve ``name``
    at ``seq`` (``staged``: serve it or hold it staged; the rule of
    :class:`~zmqmodels.core.fleet.Tally`); ``(ok, last status)``, ok False as soon as a node
    rejects that seq or at the deadline. ``clock()`` tells the time; ``pause(s)`` waits up to ``s``
    seconds between asks (both the shell's: a test drives them)."""
    deadline = clock() + timeout
    while True:
        st = status()
        if on_status is not None:
            on_status(st)
        t = tally(st.nodes, name, seq)
        left = deadline - clock()
        if t.rejected or t.reached(count, staged=staged) or left <= 0:
            return t.reached(count, staged=staged), st
        pause(min(left, 0.5))



def wait_rollout(status: Callable[[], P.StatusReply], name: str, seq: int, timeout: float, *,
                 clock: Callable[[], float], pause: Callable[[float], None],
                 on_status: Callable[[P.StatusReply], None] | None = None
                 ) -> tuple[P.WaveStatus | None, P.StatusReply]:
    """Poll ``status`` (a hub's or a :class:`HubClient`'s) until the rollout in waves of
    ``name`` ``seq`` is done or halted, or the deadline; returns its last
    :class:`~zmqmodels.protocol.WaveStatus` (None: the hub has none) and the last status;
    ``clock`` and ``pause`` as :func:`wait_for`'s."""
    deadline = clock() + timeout
    while True:
        st = status()
        if on_status is not None:
            on_status(st)
        wave = next((w for w in st.rollouts if w.name == name and w.seq == seq), None)
        if (wave is not None and wave.state != P.WaveState.RUNNING) or clock() >= deadline:
            return wave, st
        pause(min(0.2, max(0.0, deadline - clock())))
