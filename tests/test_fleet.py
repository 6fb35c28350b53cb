"""The fleet core: the hub's table of node reports and the --wait-for rule."""

from __future__ import annotations

import pytest

from zmqmodels import protocol as P
from zmqmodels.errors import ProtocolError
from zmqmodels.fleet import Fleet, rollout

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
    assert rollout(status, "m", 1) == (2, [])
    assert rollout(status, "m", 2) == (0, ["b"])


def test_bounded_forgets_the_longest_silent() -> None:
    f = Fleet(max_entries=3)
    for i in range(5):
        f.report(rep(f"n{i}", "idle", 0), float(i))
    assert len(f) == 3 and f.evicted == 2
    assert [r.node for r in f.rows(5.0)] == ["n2", "n3", "n4"]


def test_unknown_state_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        Fleet().report(rep("a", "dancing", 1), 0.0)
