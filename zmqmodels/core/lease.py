"""Who drives a rollout in waves when several hubs share a store, sans I/O.

A rollout in waves lives in the memory of the hub that started it. On a shared store that hub
also holds a **lease** on it: the ``WAVE`` record of the model, ``{seq, before, plan, holder,
until, state, reason}``, renewed every store poll (``until`` = now + ``WAVE_LEASE_S``, wall
clock) by a conditional write. Another hub that finds a running wave whose lease has run out
takes it over (one conditional write: of hubs racing, one wins) and halts it, rolling back the
nodes the fleet table shows serving it, with the reason; a hub that finds its lease taken
stops driving. A finished or halted wave's record says so and is never taken over.

These functions turn the record as read (bytes or None) into the record to write, or say
that there is nothing to write; :class:`~zmqmodels.hub.watch.StoreWatch` applies them with
the store's atomic update.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .. import protocol as P

__all__ = ["WaveLease", "Taken", "TakeOver", "renew", "orphaned"]


class WaveLease(msgspec.Struct, frozen=True):
    name: str
    seq: int
    before: int
    plan: P.WavePlan
    holder: str
    until: float  # wall-clock seconds; the lease is the holder's until then
    state: P.WaveState = P.WaveState.RUNNING  # or how the rollout ended
    reason: str = ""


class Taken(Exception):
    """The lease is another hub's now: stop driving that rollout."""

    def __init__(self, lease: WaveLease) -> None:
        super().__init__(f"hub {lease.holder} drives {lease.name} seq {lease.seq} now")
        self.lease = lease


def decode(raw: bytes | None) -> WaveLease | None:
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw, type=WaveLease)
    except msgspec.DecodeError:
        return None  # a damaged record is nobody's lease: the next write replaces it


def renew(raw: bytes | None, mine: WaveLease) -> bytes:
    """The record once this hub renews (or records the end of) its rollout ``mine``; raises
    :class:`Taken` when another hub holds the lease of this seq or a newer rollout's."""
    held = decode(raw)
    if held is not None and held.holder != mine.holder and held.seq >= mine.seq:
        raise Taken(held)
    return msgspec.json.encode(mine)


def orphaned(raw: bytes | None, me: str, now: float) -> WaveLease | None:
    """A running rollout whose holder (not this hub) let its lease run out, else None."""
    held = decode(raw)
    if held is None or held.state != P.WaveState.RUNNING or held.holder == me or held.until > now:
        return None
    return held


@dataclass
class TakeOver:
    """The record writer for a take-over: it checks again, inside the atomic update, that the
    rollout is still orphaned (of hubs racing, the first write wins and the rest see it taken)."""

    me: str
    now: float
    reason: str = ""
    taken: WaveLease | None = None

    def __call__(self, raw: bytes | None) -> bytes | None:
        """The new record, or None: leave it (no longer orphaned)."""
        held = orphaned(raw, self.me, self.now)
        self.taken = held
        if held is None:
            return None
        self.reason = f"hub {held.holder} driving the rollout stopped renewing its lease"
        return msgspec.json.encode(msgspec.structs.replace(held, holder=self.me, state=P.WaveState.HALTED,
                                                           reason=self.reason))
