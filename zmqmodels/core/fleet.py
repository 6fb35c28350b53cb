"""The hub's fleet table, sans I/O: node reports in, rows and the rollout verdict out.

A plain class fed ``(report, now)``; the hub's I/O thread owns one and reads it under a lock.
:func:`tally` is the one rule behind ``publish --wait-for`` (hub side and client side).

**Liveness**: a node sends a report for each model every heartbeat interval (0.5 s). A row not
refreshed for ``lost_after_s`` is shown as ``lost`` (with its last state in the reason and
the time since it was heard in ``age_s``) and never counts as serving; after
``forget_after_s`` it is dropped from the table.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from .. import defaults
from .. import protocol as P
from ..errors import ProtocolError

__all__ = ["FleetEntry", "Fleet", "Tally", "tally"]


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
        if age > lost_after_s:
            state = P.ModelState.LOST
            reason = f"not heard from for {age:.0f}s (last: {r.state} seq {r.seq})"
        return P.NodeStatus(r.node, r.model, state, r.seq, r.label, reason, r.host, r.pid,
                            r.device, round(age, 3), self.rejected_seq, self.rejected_reason,
                            r.stages, r.stages_seq, r.via, r.staged, r.labels, r.requests,
                            r.errors)


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
        return [e for e in self._entries.values() if now - e.seen > self.lost_after_s]


@dataclass(frozen=True)
class Tally:
    """Where the fleet stands on one release: the one rule behind ``publish --wait-for``, the
    hub's :meth:`~zmqmodels.hub.Hub.wait_for`, the CLI's progress line and ``releases``."""

    serving: int  # nodes serving it (lost nodes never count)
    on_the_way: int  # receiving, verified or loading it
    rejected: list[str]  # nodes that rejected it
    broken: int  # nodes lost or in error (whatever release)
    rows: int  # nodes following the model

    def reached(self, count: int) -> bool:
        return self.serving >= count and not self.rejected


_ON_THE_WAY = (P.ModelState.RECEIVING, P.ModelState.VERIFIED, P.ModelState.LOADING)


def tally(rows: Sequence[P.NodeStatus], name: str, seq: int, *, or_newer: bool = False,
          nodes: Collection[str] | None = None) -> Tally:
    """The :class:`Tally` of ``name`` ``seq`` over fleet ``rows`` (of ``nodes`` only, if
    given); ``or_newer``: a node serving a newer seq counts as serving it (activation)."""
    mine = [r for r in rows if r.model == name and (nodes is None or r.node in nodes)]
    at = [r for r in mine if r.state == P.ModelState.SERVING and (r.seq >= seq if or_newer else r.seq == seq)]
    return Tally(len(at), sum(r.seq == seq and r.state in _ON_THE_WAY for r in mine),
                 [r.node for r in mine if r.rejected_seq == seq],
                 sum(r.state in (P.ModelState.LOST, P.ModelState.ERROR) for r in mine), len(mine))
