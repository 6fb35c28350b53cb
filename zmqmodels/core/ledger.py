"""What a node tells the hub about each model, sans I/O.

The node's I/O thread feeds a :class:`Ledger` the broker's view of a model (``state, seq,
label``), the workers' start error, a roll's start, a rejection and every answered request;
it returns the report to send (only when the state or seq changed) and keeps the counts a
rollout's error-rate halt is measured on (``Report.requests``/``errors``, per served seq).

Rules (docs/protocol.md §Reports):

- A model with no worker able to start reports ``error`` with the start error, not ``idle``.
- The ``roll`` stage of a release is the time from its verification (:meth:`rolling`) to the
  first report of it ``serving``; a release superseded before it served has no roll stage.
- Requests count against the seq that answered them; server-side codes (``model_error``,
  ``internal``, ``worker_lost``) are errors; only the newest ``KEEP_SEQS`` seqs are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..protocol import ModelState
from ..protocol.codes import SERVER_ERRORS

__all__ = ["Ledger", "Tell", "KEEP_SEQS"]

KEEP_SEQS = 4


@dataclass(frozen=True)
class Tell:
    """Report ``name`` to the hub as ``state`` at ``seq``; ``roll_s``: its roll stage, if it
    just finished rolling (None otherwise)."""

    name: str
    state: ModelState
    seq: int
    label: str
    reason: str = ""
    roll_s: float | None = None
    changed: bool = True  # False: only the roll stage is new


class Ledger:
    def __init__(self, models: Sequence[str]) -> None:
        self.answered: dict[str, dict[int, list[int]]] = {m: {} for m in models}  # seq -> [req, err]
        self.reported: dict[str, tuple[ModelState, int]] = {}
        self._rolling: dict[tuple[str, int], float] = {}  # (name, seq) -> verified at
        self._cpu: dict[tuple[str, int], float] = {}  # (name, seq) -> its workers' CPU so far
        # :meth:`counts` as of the last change, replaced whole (another thread may read it)
        self.counted: dict[str, tuple[int, int]] = {}

    def answer(self, model: str, seq: int, code: str) -> None:
        """A request for ``model`` was answered by ``seq`` with ``code`` ("" = OK)."""
        by_seq = self.answered.get(model)
        if by_seq is None:
            return  # a name this node does not serve
        counts = by_seq.setdefault(seq, [0, 0])
        counts[0] += 1
        counts[1] += code in SERVER_ERRORS
        if len(by_seq) > KEEP_SEQS:
            del by_seq[min(by_seq)]
        self.counted = self.counts()

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per model: (requests, errors) answered by the seq last reported."""
        out = {}
        for name, by_seq in self.answered.items():
            c = by_seq.get(self.reported.get(name, (ModelState.IDLE, 0))[1], (0, 0))
            out[name] = (c[0], c[1])
        return out

    def rolling(self, name: str, seq: int, now: float) -> None:
        """Release ``seq`` is verified: its roll through the workers starts now."""
        for key in [k for k in self._rolling if k[0] == name and k[1] < seq]:
            del self._rolling[key]  # superseded before it served: no stage to time
        for key in [k for k in self._cpu if k[0] == name and k[1] < seq]:
            del self._cpu[key]
        self._rolling[(name, seq)] = now
        self._cpu[(name, seq)] = 0.0

    def worker_cpu(self, name: str, seq: int, cpu_s: float) -> float:
        """A worker spent ``cpu_s`` taking ``seq``: what all its workers spent so far."""
        total = self._cpu[(name, seq)] = self._cpu.get((name, seq), 0.0) + cpu_s
        return total

    def is_rolling(self, name: str, seq: int) -> bool:
        return (name, seq) in self._rolling

    def rejected(self, name: str, seq: int) -> None:
        self._rolling.pop((name, seq), None)
        self.reported.pop(name, None)  # what is served next is reported again

    def forget(self, name: str) -> None:
        """Report ``name`` again on the next view, changed or not."""
        self.reported.pop(name, None)

    def view(self, name: str, state: str, seq: int, label: str, start_error: str, now: float) -> Tell | None:
        """The broker's view of ``name``; the report to send if it changed."""
        st = ModelState(state)
        roll = None
        if st == ModelState.SERVING:
            since = self._rolling.pop((name, seq), None)
            roll = now - since if since is not None else None
        reason = start_error if st == ModelState.IDLE else ""
        if reason:
            st = ModelState.ERROR
        changed = self.reported.get(name) != (st, seq)
        if not changed and roll is None:
            return None
        self.reported[name] = (st, seq)
        self.counted = self.counts()
        return Tell(name, st, seq, label, reason, roll, changed)
