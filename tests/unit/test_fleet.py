"""The fleet core: the hub's table of node reports and the --wait-for rule."""

from __future__ import annotations

import pytest

from zmqmodels import protocol as P
from zmqmodels.core.fleet import Fleet, tally
from zmqmodels.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)


def rep(node: str, state: str, seq: int, reason: str = "") -> P.Report:
    return P.Report(node, "m", state, seq, f"v{seq}", reason)


def test_rows_ages_and_rejection_kept_after_recovery() -> None:
    f = Fleet()
    f.report(rep("a", "serving", 1), 0.0)
    f.report(rep("b", "rejected", 2, "example 0 differs"), 1.0)
    f.report(rep("b", "serving", 1), 1.5)
    rows = {r.node: r for r in f.rows(3.0)}
    assert rows["a"].age_s == 3.0 and rows["b"].age_s == 1.5
    b = rows["b"]
    assert (b.state, b.rejected_seq, b.last_error) == ("serving", 2, "example 0 differs")
    status = P.StatusReply("hub", [], f.rows(3.0))
    one, two = tally(status.nodes, "m", 1), tally(status.nodes, "m", 2)
    assert (one.serving, one.rejected) == (2, [])
    assert (two.serving, two.rejected) == (0, ["b"])


def test_bounded_forgets_the_longest_silent() -> None:
    f = Fleet(max_entries=3)
    for i in range(5):
        f.report(rep(f"n{i}", "idle", 0), float(i))
    assert len(f) == 3 and f.evicted == 2
    assert [r.node for r in f.rows(5.0)] == ["n2", "n3", "n4"]


def test_unknown_state_is_a_protocol_error() -> None:
    """States are an enum on the wire struct: a report naming another is refused as it is
    decoded, before any table sees it."""
    with pytest.raises(ProtocolError, match="dancing"):
        P.unpack(P.pack(rep("a", "dancing", 1)))
    with pytest.raises(ProtocolError):
        Fleet().report(rep("a", "lost", 1), 0.0)  # the hub's verdict, never a node's


def test_silent_node_turns_lost_is_not_counted_and_is_forgotten() -> None:
    """Milestone 1: a stopped node kept showing `serving` (one for 963 s)."""
    f = Fleet(lost_after_s=5.0, forget_after_s=60.0)
    f.report(rep("a", "serving", 3), 0.0)
    f.report(rep("b", "serving", 3), 0.0)
    f.report(rep("b", "serving", 3), 4.0)
    rows = {r.node: r for r in f.rows(6.0)}
    assert rows["a"].state == "lost" and rows["a"].age_s == 6.0
    assert rows["a"].reason == "not heard from for 6s (last: serving seq 3)"
    assert rows["b"].state == "serving"
    assert tally(f.rows(6.0), "m", 3).serving == 1
    assert f.prune(59.0) == [] and [e.report.node for e in f.prune(61.0)] == ["a"]
    assert [r.node for r in f.rows(61.0)] == ["b"]
    f.report(rep("b", "serving", 3), 62.0)  # heard again: no longer lost
    assert f.rows(63.0)[0].state == "serving"
