"""The swap policy of one node, sans I/O: which seq each model is headed for, which workers are
stale, and which may answer a request.

Rules (docs/protocol.md §Serving):

- **Targets**: the newest verified release of each model; a rejected seq is never a target again.
- **One load at a time** per node: the other workers keep serving (``torch.jit.load`` holds
  the loading process's GIL, so a loading worker serves nobody).
- **Monotonic versions**: the *floor* of a model is the newest seq any worker of this node has
  loaded. Unpinned requests go only to workers on the floor, and only once no unpinned request
  is still running on an older seq, so the node never sends an unpinned reply older than one it
  already sent. Pinned requests (``seq``) go to workers holding exactly that seq.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..protocol.messages import Word

__all__ = ["SwapPolicy", "Version", "Target", "Swaps"]


class SwapPolicy(Word):
    """How a worker replaces a model (``serve --swap-policy``)."""

    AVAILABILITY = "availability"  # load the new version beside the old, then swap: no gap
    UNLOAD_FIRST = "unload-first"  # free the old one first (a GPU that cannot hold two)


@dataclass(frozen=True, order=True)
class Version:
    """A loaded release: ordered by ``seq``; ``label`` is the user's name for it."""

    seq: int
    label: str = field(default="", compare=False)


@dataclass(frozen=True)
class Target:
    """A verified release, in the cache at ``path``, that every worker should serve."""

    name: str
    seq: int
    path: str
    label: str = ""


class Swaps:
    def __init__(self, models: list[str], policy: SwapPolicy = SwapPolicy.AVAILABILITY) -> None:
        self.policy = SwapPolicy(policy)
        self.targets: dict[str, Target] = {}
        # seqs above the floor that failed to load (older ones can never be offered again)
        self.rejected: dict[str, set[int]] = {m: set() for m in models}
        self.floor: dict[str, int] = dict.fromkeys(models, 0)
        self.floor_label: dict[str, str] = dict.fromkeys(models, "")
        self.missing: dict[str, int] = {}  # name -> a seq whose cache file is being fetched again

    def offer(self, target: Target) -> bool:
        """A new verified release; True if it became the model's target."""
        if target.seq in self.rejected[target.name] or target.seq <= self.goal(target.name):
            return False
        self.targets[target.name] = target
        return True

    def goal(self, name: str) -> int:
        """The seq every worker of ``name`` should hold."""
        t = self.targets.get(name)
        return max(t.seq if t else 0, self.floor[name])

    def stale(self, name: str, held: Version | None) -> bool:
        goal = self.goal(name)
        return goal > 0 and (held is None or held.seq < goal)

    def eligible(self, name: str, held: Version | None, pin: int, older_in_flight: bool) -> bool:
        """May a worker holding ``held`` of ``name`` answer a request pinned to ``pin`` (0: any)?"""
        if held is None:
            return False
        if pin:
            return held.seq == pin
        return held.seq >= self.floor[name] and not older_in_flight

    def loaded(self, name: str, seq: int, label: str) -> None:
        """A worker now holds ``seq`` (a load, or a worker that came up with it cached)."""
        if seq > self.floor[name]:  # the target stays until every worker holds it
            self.floor[name], self.floor_label[name] = seq, label
            self.rejected[name] = {s for s in self.rejected[name] if s > seq}  # bounded

    def floor_target(self, name: str, path: str) -> Target:
        """The floor as a target: what a worker that came up on an older release loads."""
        return Target(name, self.floor[name], path, self.floor_label[name])

    def reject(self, name: str, seq: int) -> None:
        self.rejected[name].add(seq)
        t = self.targets.get(name)
        if t is not None and t.seq == seq:
            del self.targets[name]

    def lower_floor(self, name: str, held: Version | None) -> None:
        """Nobody can hold the floor any more (its only holders died and the cache lost it):
        fall back to the newest version still held, rather than refusing everything."""
        self.floor[name] = held.seq if held else 0
        self.floor_label[name] = held.label if held else ""
