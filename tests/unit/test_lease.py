"""Who drives a rollout in waves on a shared store (core/lease.py), driven directly."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqmodels import protocol as P
from zmqmodels.core.lease import Taken, TakeOver, WaveLease, decode, orphaned, renew

PLAN = P.WavePlan(["1", "100%"], wave_wait_s=1.0)


def lease(holder: str, until: float, seq: int = 5, state: str = "running") -> WaveLease:
    return WaveLease("m", seq, 4, PLAN, holder, until, P.WaveState(state))


def test_the_holder_renews_and_another_hub_cannot() -> None:
    raw = renew(None, lease("a", 10.0))
    raw = renew(raw, lease("a", 20.0))
    assert decode(raw) == lease("a", 20.0)
    with pytest.raises(Taken, match="hub a drives m seq 5"):
        renew(raw, lease("b", 30.0))
    assert decode(renew(raw, lease("b", 30.0, seq=6))).holder == "b"  # a newer rollout replaces it


def test_only_a_running_rollout_whose_lease_ran_out_is_orphaned() -> None:
    raw = msgspec.json.encode(lease("a", 10.0))
    assert orphaned(raw, "b", 9.9) is None  # still held
    assert orphaned(raw, "a", 11.0) is None  # its own
    assert orphaned(raw, "b", 11.0) == lease("a", 10.0)
    assert orphaned(msgspec.json.encode(lease("a", 10.0, state="done")), "b", 11.0) is None
    assert orphaned(b"{damaged", "b", 11.0) is None and orphaned(None, "b", 11.0) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 3)), min_size=1, max_size=30))
def test_of_hubs_racing_to_take_over_exactly_one_wins_and_then_nobody_else(order) -> None:
    """Take-overs applied one after another (what the store's atomic update makes of a race):
    the first hub whose write lands wins; every later one finds the rollout no longer orphaned."""
    raw: bytes | None = msgspec.json.encode(lease("dead", 0.0))
    winners = []
    for hub, dt in order:
        t = TakeOver(hub, 10.0 + dt)
        new = t(raw)
        if new is not None:
            raw = new
            winners.append(hub)
            assert "hub dead driving the rollout stopped renewing its lease" == t.reason
    assert len(winners) == 1
    final = decode(raw)
    assert final is not None and (final.holder, final.state) == (winners[0], "halted")
