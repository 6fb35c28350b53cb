"""Which node takes a request (core/balance.py), driven directly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqmodels.core.balance import SUSPECT_MAX_S, SUSPECT_S, Balancer

NODES = ["a", "b", "c"]


def test_least_loaded_then_longest_unused() -> None:
    b = Balancer(NODES)
    b.sent("a", 0.0)
    b.sent("b", 0.1)
    assert b.pick(0.2) == "c"  # nothing in flight there
    b.sent("c", 0.2)
    b.answered("a", 0.050, 1)
    b.answered("b", 0.010, 1)
    b.answered("c", 0.030, 1)
    assert b.pick(1.0) == "a"  # all idle: the one used longest ago, not the fastest
    picked = []
    for t in range(6):  # one request at a time goes round every node
        node = b.pick(2.0 + t)
        b.sent(node, 2.0 + t)
        b.answered(node, 0.01, 1)
        picked.append(node)
    assert sorted(picked[:3]) == NODES and picked[3:] == picked[:3]


def test_a_failing_node_backs_off_doubling_and_an_answer_restores_it() -> None:
    b = Balancer(NODES)
    for n, t in ((1, 0.0), (2, 1.0), (3, 3.0)):
        b.sent("a", t)
        b.failed("a", t, "no reply")
        assert b.peers["a"].out_until == pytest.approx(t + SUSPECT_S * 2 ** (n - 1))
    assert "a" not in b.live(3.1) and b.failures() == "a: no reply"
    b.sent("a", 10.0)
    b.answered("a", 0.01, 1)
    assert "a" in b.live(10.0) and b.failures() == ""
    for t in range(20):
        b.failed("b", float(t), "x")
    assert b.peers["b"].out_until <= 19 + SUSPECT_MAX_S


def test_when_every_node_is_out_the_first_due_back_is_tried() -> None:
    b = Balancer(NODES)
    b.failed("a", 0.0, "x")
    b.failed("a", 0.1, "x")  # out until 1.1
    b.failed("b", 0.0, "x")  # out until 0.5
    b.failed("c", 0.2, "x")  # out until 0.7
    assert b.pick(0.3) == "b"


def test_duplicate_or_no_addresses_are_refused() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        Balancer(["a", "a"])
    with pytest.raises(ValueError, match="no node"):
        Balancer([])


_EVENTS = st.lists(st.tuples(st.sampled_from(["sent", "answered", "failed", "not_held", "settled"]),
                             st.sampled_from(NODES), st.floats(0, 0.5), st.integers(1, 3)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(_EVENTS, st.lists(st.sampled_from(NODES), max_size=3, unique=True), st.integers(0, 3))
def test_any_event_order_never_repeats_a_node_while_an_untried_live_one_exists(events, tried, seq) -> None:
    """Whatever happened before: an attempt goes to a node this request has not tried if one
    is live, never to a node that said it lacks the pinned seq while another may hold it, and
    in-flight counts never go negative."""
    b, now = Balancer(NODES), 0.0
    for kind, node, dt, s in events:
        now += dt
        if kind == "sent":
            b.sent(node, now)
        elif kind == "answered":
            b.answered(node, dt, s)
        elif kind == "failed":
            b.failed(node, now, "x")
        elif kind == "not_held":
            b.not_held(node, s, now)
        else:
            b.settled(node)
        assert all(p.in_flight >= 0 for p in b.peers.values())
    got = b.pick(now, tried=tried, seq=seq)
    may_hold = [n for n in NODES if not (seq and b.peers[n].not_here.get(seq, 0) > now)] or NODES
    assert got in may_hold
    untried_live = [n for n in may_hold if n not in tried and b.peers[n].live(now)]
    if untried_live:
        assert got in untried_live
