"""The store rules every backend shares: seq claims and what retention keeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import raw_release
from zmqmodels.errors import StoreError
from zmqmodels.release.catalog import Retention, SeqState, claim, to_prune


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "put", "put_reserved", "floor"]), st.integers(0, 3)),
                max_size=40))
def test_claims_in_any_order_never_give_one_seq_twice_and_latest_only_grows(ops) -> None:
    """Writers interleave reserve / put (unsigned) / put of a reserved seq / raise_floor in any
    order, each an atomic update of the SEQ record: no seq is stored twice, the newest stored
    only grows, and a reserved seq is refused only when a newer one was stored first."""
    state, stored, reserved = SeqState(), [], []
    for op, arg in ops:
        if op == "reserve":
            state = SeqState(max(state.next, state.latest) + 1, state.latest)
            reserved.append(state.next)
        elif op == "floor":
            state = SeqState(max(state.next, arg * 5), state.latest)
        elif op == "put" or not reserved:
            state, seq = claim(state, 0)
            stored.append(seq)
        else:
            seq = reserved.pop(arg % len(reserved))
            try:
                state, got = claim(state, seq)
            except StoreError as exc:
                assert seq <= state.latest and "reserve a new seq" in str(exc)
                continue
            assert got == seq
            stored.append(seq)
        assert stored == sorted(set(stored))  # distinct and increasing in the order stored
        assert state.latest == (stored[-1] if stored else 0)


def test_seq_record_reads_the_old_plain_number_and_names_damage() -> None:
    assert SeqState.decode(b"7") == SeqState(7, 0)
    assert SeqState.decode(SeqState(9, 4).encode()) == SeqState(9, 4)
    with pytest.raises(StoreError, match="damaged"):
        SeqState.decode(b"{nope")


def _m(seq: int, content: str, *, created: float = 0.0, staged: bool = False):
    m = raw_release("m", content.encode(), label=f"v{seq}").manifest
    import msgspec
    return msgspec.structs.replace(m, seq=seq, created_at=created, staged=staged)


def test_retention_never_prunes_the_active_a_staged_or_a_pinned_release() -> None:
    ms = [_m(s, f"c{s}", staged=(s == 5)) for s in range(1, 10)]
    gone = to_prune(ms, Retention(count=2), active=3, pins=[1], now=0)
    assert gone == [2, 4, 6, 7]  # 8, 9 newest, 5 staged (not yet active), 3 active, 1 pinned
    # once the fleet is active past a staged release, it is an ordinary old one
    assert 5 in to_prune(ms, Retention(count=2), active=8, pins=[], now=0)


def test_retention_by_age_keeps_the_young_and_rollbacks_do_not_push_out_their_source() -> None:
    ms = [_m(s, "same" if s in (2, 6) else f"c{s}", created=100.0 * s) for s in range(1, 7)]
    assert to_prune(ms, Retention(count=2), active=6, pins=[], now=600) == [1, 3, 4]  # 6 restored 2
    assert to_prune(ms, Retention(count=1, max_age_s=250), active=6, pins=[], now=600) == [1, 3]
    assert to_prune(ms, Retention(count=0, max_age_s=250), active=6, pins=[], now=600) == [1, 2, 3]
    assert to_prune(ms, Retention(count=0, max_age_s=0), active=6, pins=[], now=600) == []
