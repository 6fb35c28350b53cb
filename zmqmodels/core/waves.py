"""A staged rollout in waves, sans I/O: which nodes to activate next, when to halt and why.

The hub owns one :class:`WaveRollout` per release published with ``--waves`` and feeds it the
fleet table's rows and the clock; it returns :class:`ActivateNodes` (tell these nodes to serve
the release), :class:`Finish` (every wave served: activate it fleet-wide) or :class:`Halt`.

Rules (docs/protocol.md §Staged rollouts):

- The nodes are the live ones following the model when the rollout starts, nodes labelled
  ``canary`` first, then by node id. Waves are cumulative: ``1,10%,50%,100%`` of 40 nodes
  activates 1, then 4, 20 and 40 in all (a wave that adds nobody is skipped).
- A wave is *confirmed* when each of its nodes reports the release serving. A node that
  rejects it, or is lost, fails the wave at once; one that is not serving it after
  ``confirm_s`` fails with its last state and reason.
- A confirmed wave is *watched* for ``wave_wait_s``: a node that rejects or is lost, or an
  error rate above ``error_rate`` over the requests the activated nodes answered with this
  release (``Report.requests``/``errors`` count per served seq), halts the rollout.
- A halted rollout activates nobody else. Its :class:`Halt` names the failed nodes and why,
  and ``rollback``: the activated nodes that did not reject it (they serve it, or soon will),
  which the hub moves back by publishing the previous release's content under a new seq.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import protocol as P
from ..errors import ZmqModelsError

__all__ = ["ActivateNodes", "Finish", "Halt", "WaveRollout", "wave_counts", "parse_halt_on", "check_plan",
           "CANARY", "activation_refusal"]

CANARY = "canary"
HALT_ON_REJECTED = "rejected"  # always on
RUNNING, DONE, HALTED = P.WaveState.RUNNING, P.WaveState.DONE, P.WaveState.HALTED
_RATE = re.compile(r"^error-rate>(\d+(?:\.\d+)?)(%?)$")


@dataclass(frozen=True)
class ActivateNodes:
    name: str
    seq: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Finish:
    """Every wave served ``seq``; with ``fleet`` the last wave was the whole fleet."""

    name: str
    seq: int
    fleet: bool


@dataclass(frozen=True)
class Halt:
    name: str
    seq: int
    reason: str
    failed: dict[str, str]
    rollback: tuple[str, ...]


Action = ActivateNodes | Finish | Halt


def wave_counts(specs: Sequence[str], n: int) -> list[int]:
    """Cumulative node counts of each wave for a fleet of ``n``: ``"3"`` is three nodes,
    ``"10%"`` a tenth (rounded up); counts that add nobody are dropped."""
    counts: list[int] = []
    for spec in specs:
        s = spec.strip()
        try:
            c = math.ceil(float(s[:-1]) * n / 100) if s.endswith("%") else int(s)
        except ValueError:
            raise ZmqModelsError(f"bad wave {spec!r}: use a node count (1) or a share (10%)") from None
        if c <= 0 or (s.endswith("%") and float(s[:-1]) > 100):
            raise ZmqModelsError(f"bad wave {spec!r}: a count above 0, a share up to 100%")
        c = min(c, n)
        if not counts or c > counts[-1]:
            counts.append(c)
    if not specs:
        raise ZmqModelsError("no waves given")
    return counts


def parse_halt_on(specs: Sequence[str]) -> float | None:
    """The error-rate threshold (a fraction) of ``--halt-on`` conditions; ``rejected`` is
    always on. ``error-rate>1%`` and ``error-rate>0.01`` are the same."""
    rate = None
    for spec in specs:
        s = spec.replace(" ", "")
        if s == HALT_ON_REJECTED:
            continue
        m = _RATE.match(s)
        if not m:
            raise ZmqModelsError(f"bad --halt-on {spec!r}: use rejected or error-rate>N%")
        rate = float(m.group(1)) / (100 if m.group(2) else 1)
    return rate


@dataclass
class WaveRollout:
    """``nodes``: ``(node id, labels)`` of the live nodes following ``name`` at the start."""

    name: str
    seq: int
    plan: P.WavePlan
    nodes: Sequence[tuple[str, Sequence[str]]]
    now: float
    started_at: float = 0.0  # wall-clock, for the status
    before: int = 0  # the seq active fleet-wide when it started: what a halt rolls back to
    order: list[str] = field(init=False)
    counts: list[int] = field(init=False)
    error_rate: float | None = field(init=False)
    state: P.WaveState = RUNNING
    wave: int = 0  # waves activated so far
    activated: list[str] = field(default_factory=list)
    serving: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    rollback_seq: int = 0
    _since: float = 0.0  # when the current wave was activated
    _watch_until: float | None = None  # set once the current wave is confirmed

    def __post_init__(self) -> None:
        canary = sorted(n for n, labels in self.nodes if CANARY in labels)
        self.order = canary + sorted(n for n, _ in self.nodes if n not in set(canary))
        self.counts = wave_counts(self.plan.waves, max(1, len(self.order)))
        self.error_rate = parse_halt_on(self.plan.halt_on)
        self._since = self.now
        if not self.order:  # halted before it starts: the publisher is told why, nothing hangs
            self.state, self.reason = HALTED, f"no live node follows {self.name!r}: nothing to roll out to"

    # -- events ------------------------------------------------------------------------------
    def start(self, now: float) -> list[Action]:
        return self._next_wave(now) if self.state == RUNNING else []

    def step(self, now: float, rows: Sequence[P.NodeStatus]) -> list[Action]:
        """The fleet table's rows (any models) at ``now``."""
        if self.state != RUNNING:
            return []
        mine = {r.node: r for r in rows if r.model == self.name}
        current = self.activated[(self.counts[self.wave - 2] if self.wave > 1 else 0):]
        for node in self.activated:
            row = mine.get(node)
            if row is None or row.state in (P.ModelState.LOST, P.ModelState.STOPPED):
                self.failed[node] = (f"{row.state}: {row.reason or 'stopped cleanly'}" if row
                                     else "lost: no longer in the fleet table")
            elif row.rejected_seq == self.seq:
                self.failed[node] = f"rejected seq {self.seq}: {row.last_error}"
            elif row.state == P.ModelState.SERVING and row.seq >= self.seq:
                self.serving.add(node)
        if self.failed:
            return self._halt(f"{len(self.failed)} node(s) failed wave {self.wave}")
        if self._watch_until is None:
            if all(n in self.serving for n in current):
                self._watch_until = now + self.plan.wave_wait_s
            elif now - self._since > self.plan.confirm_s:
                for n in current:
                    if n not in self.serving:
                        row = mine[n]
                        why = f": {row.reason}" if row.reason else ""
                        self.failed[n] = (f"not serving seq {self.seq} after {self.plan.confirm_s:.0f}s "
                                          f"({row.state} seq {row.seq}{why})")
                return self._halt(f"wave {self.wave} not serving after {self.plan.confirm_s:.0f}s")
        if self.error_rate is not None:
            halted = self._check_errors(mine)
            if halted:
                return halted
        if self._watch_until is not None and now >= self._watch_until:
            return self._next_wave(now)
        return []

    def supersede(self, seq: int) -> None:
        """A newer release ``seq`` of the model was published: this rollout stops here."""
        if self.state == RUNNING:
            self.state, self.reason = HALTED, f"superseded by seq {seq}"

    def halt(self, reason: str, now: float, rows: Sequence[P.NodeStatus]) -> list[Action]:
        """Stop here from outside (a hub taking over an orphaned rollout): the nodes ``rows``
        show serving this seq or newer count as activated, so the halt rolls them back."""
        if self.state != RUNNING:
            return []
        self.activated = sorted({r.node for r in rows if r.model == self.name
                                 and r.state == P.ModelState.SERVING and r.seq >= self.seq})
        return self._halt(reason)

    def taken_over(self, holder: str) -> bool:
        """Another hub took this rollout's lease: stop here (True if it was running)."""
        if self.state != RUNNING:
            return False
        self.state, self.reason = HALTED, f"hub {holder} took the rollout over"
        return True

    def rolled_back(self, seq: int) -> None:
        """The halt's rollback went out as ``seq``."""
        self.rollback_seq = seq

    def rollback_failed(self, why: str) -> None:
        self.reason += f"; {why}"

    def status(self) -> P.WaveStatus:
        return P.WaveStatus(self.name, self.seq, self.state, self.wave, list(self.counts),
                            list(self.activated), sorted(self.serving), dict(self.failed),
                            self.reason, self.rollback_seq, self.started_at)

    # -- internals ---------------------------------------------------------------------------
    def _check_errors(self, mine: dict[str, P.NodeStatus]) -> list[Action]:
        assert self.error_rate is not None
        total_req = total_err = 0
        per: dict[str, tuple[int, int]] = {}
        for node in self.serving:
            row = mine.get(node)
            if row is None:
                continue
            per[node] = (row.requests, row.errors) if row.seq == self.seq else (0, 0)
            total_req += per[node][0]
            total_err += per[node][1]
        if total_err == 0 or total_err <= self.error_rate * total_req:
            return []
        for node, (req, err) in sorted(per.items()):
            if err and err > self.error_rate * req:
                self.failed[node] = f"error rate {err}/{req} = {err / max(req, 1):.1%} on seq {self.seq}"
        return self._halt(f"error rate {total_err}/{total_req} = {total_err / max(total_req, 1):.1%} "
                          f"> {self.error_rate:.1%} in wave {self.wave}")

    def _next_wave(self, now: float) -> list[Action]:
        if self.wave == len(self.counts):
            self.state = DONE
            return [Finish(self.name, self.seq, fleet=self.counts[-1] == len(self.order))]
        start = len(self.activated)
        self.wave += 1
        new = self.order[start:self.counts[self.wave - 1]]
        self.activated += new
        self._since, self._watch_until = now, None
        return [ActivateNodes(self.name, self.seq, tuple(new))]

    def _halt(self, reason: str) -> list[Action]:
        self.state, self.reason = HALTED, reason
        rejected = {n for n, why in self.failed.items() if why.startswith("rejected")}
        back = tuple(n for n in self.activated if n not in rejected)
        return [Halt(self.name, self.seq, reason, dict(self.failed), back)]


def check_plan(plan: P.WavePlan | None) -> None:
    """Check a staged rollout's parameters before anything is stored (the syntax, whatever
    the fleet's size)."""
    if plan is None:
        return
    wave_counts(plan.waves, 1000)
    parse_halt_on(plan.halt_on)


def activation_refusal(name: str, seq: int, active: int, staged: bool | None) -> str:
    """Why activating ``name`` ``seq`` must be refused ("" if it may go ahead): activation
    never goes backwards by accident. ``active``: the seq active fleet-wide; ``staged``: whether
    that release was published staged (None: the hub does not have it)."""
    if staged is None:
        return f"the hub has no release {name} seq {seq}"
    if seq < active:
        return (f"{name} seq {seq} is older than the active seq {active}, and activation never "
                f"steps back; to serve its content again, publish it as a new seq: "
                f"zmqmodels rollback {name} --to {seq} --hub HUB")
    if not staged:
        return f"{name} seq {seq} was not published staged: nodes serve it without activation"
    return ""
