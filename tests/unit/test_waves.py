"""The wave controller core: wave sizes, confirmation, halts, error rates; property-tested."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmqmodels import protocol as P
from zmqmodels.core.waves import ActivateNodes, Finish, Halt, WaveRollout, parse_halt_on, wave_counts
from zmqmodels.errors import ZmqModelsError


def row(node: str, state: str = "serving", seq: int = 1, *, rejected: int = 0, why: str = "",
        requests: int = 0, errors: int = 0, model: str = "m") -> P.NodeStatus:
    return P.NodeStatus(node, model, state, seq, "", "", "h", 1, "cpu", 0.1, rejected, why,
                        requests=requests, errors=errors)


def fleet(n: int, canary: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    return [(f"n{i:02d}", ["canary"] if f"n{i:02d}" in canary else []) for i in range(n)]


def test_wave_counts_are_cumulative_and_skip_empty_waves() -> None:
    assert wave_counts(["1", "10%", "50%", "100%"], 40) == [1, 4, 20, 40]
    assert wave_counts(["1", "10%", "50%", "100%"], 3) == [1, 2, 3]
    assert wave_counts(["5", "100%"], 3) == [3]
    for bad in (["0"], ["x"], ["150%"], []):
        with pytest.raises(ZmqModelsError):
            wave_counts(bad, 10)


def test_halt_on_parses_percent_and_fraction() -> None:
    assert parse_halt_on(["rejected"]) is None
    assert parse_halt_on(["error-rate>1%"]) == pytest.approx(0.01)
    assert parse_halt_on(["rejected", "error-rate > 0.05"]) == pytest.approx(0.05)
    with pytest.raises(ZmqModelsError):
        parse_halt_on(["latency>2"])


def test_canary_goes_first_and_waves_follow_once_each_serves_and_waited() -> None:
    w = WaveRollout("m", 2, P.WavePlan(["1", "50%", "100%"], wave_wait_s=5), fleet(4, canary=("n03",)), 0.0)
    assert w.start(0.0) == [ActivateNodes("m", 2, ("n03",))]
    assert w.step(1.0, [row("n03", "loading", 2)]) == []
    assert w.step(2.0, [row("n03", seq=2)]) == []  # confirmed: now watched for 5 s
    assert w.step(6.0, [row("n03", seq=2)]) == []
    assert w.step(7.5, [row("n03", seq=2)]) == [ActivateNodes("m", 2, ("n00",))]
    rows = [row("n03", seq=2), row("n00", seq=2)]
    assert w.step(8.0, rows) == []
    assert w.step(13.5, rows) == [ActivateNodes("m", 2, ("n01", "n02"))]
    rows += [row("n01", seq=2), row("n02", seq=2)]
    w.step(14.0, rows)
    assert w.step(19.5, rows) == [Finish("m", 2, fleet=True)]
    assert w.status().state == "done" and w.status().serving == ["n00", "n01", "n02", "n03"]


def test_a_canary_that_rejects_halts_without_touching_the_others() -> None:
    w = WaveRollout("m", 2, P.WavePlan(["1", "100%"]), fleet(3), 0.0)
    assert w.start(0.0) == [ActivateNodes("m", 2, ("n00",))]
    out = w.step(1.0, [row("n00", "serving", 1, rejected=2, why="example 0 differs"),
                       row("n01", seq=1), row("n02", seq=1)])
    assert out == [Halt("m", 2, "1 node(s) failed wave 1", {"n00": "rejected seq 2: example 0 differs"}, ())]
    assert w.step(100.0, []) == []  # halted: nobody else is ever activated
    assert w.activated == ["n00"]


def test_a_wave_node_that_never_serves_fails_with_its_last_state() -> None:
    w = WaveRollout("m", 2, P.WavePlan(["100%"], confirm_s=10), fleet(2), 0.0)
    w.start(0.0)
    rows = [row("n00", seq=2), P.NodeStatus("n01", "m", "error", 1, "", "cache write failed: ENOSPC", "h",
                                            1, "cpu", 0.1)]
    assert w.step(5.0, rows) == []
    [halt] = w.step(11.0, rows)
    assert isinstance(halt, Halt)
    assert "cache write failed: ENOSPC" in halt.failed["n01"] and halt.rollback == ("n00", "n01")


def test_error_rate_over_the_threshold_halts_and_names_the_nodes() -> None:
    plan = P.WavePlan(["1", "100%"], wave_wait_s=30, halt_on=["error-rate>1%"])
    w = WaveRollout("m", 2, plan, fleet(3), 0.0)
    w.start(0.0)
    assert w.step(1.0, [row("n00", seq=1, requests=500, errors=300)]) == []  # seq 1's: not counted
    assert w.step(5.0, [row("n00", seq=2, requests=200, errors=1)]) == []  # 1/200 = 0.5 %
    [halt] = w.step(9.0, [row("n00", seq=2, requests=300, errors=5)])  # 5/300 = 1.7 %
    assert isinstance(halt, Halt) and "error rate 5/300" in halt.reason
    assert halt.failed == {"n00": "error rate 5/300 = 1.7% on seq 2"}
    assert halt.rollback == ("n00",)


def test_a_lost_node_halts_the_wave() -> None:
    w = WaveRollout("m", 2, P.WavePlan(["100%"]), fleet(2), 0.0)
    w.start(0.0)
    [halt] = w.step(1.0, [row("n00", seq=2), row("n01", "lost", 1)])
    assert isinstance(halt, Halt) and halt.failed["n01"].startswith("lost")


def test_no_live_node_halts_at_once_with_the_reason() -> None:
    w = WaveRollout("m", 2, P.WavePlan(["100%"]), [], 0.0)
    assert w.start(0.0) == [] and w.status().state == "halted" and "no live node" in w.status().reason


# -- property: any order of reports ------------------------------------------------------------
event = st.tuples(st.integers(0, 5), st.sampled_from(["loading", "serving", "reject", "lost", "idle"]),
                  st.floats(0.0, 40.0))


@settings(max_examples=400, deadline=None)
@given(n=st.integers(1, 6),
       specs=st.sampled_from([["1", "100%"], ["1", "50%", "100%"], ["100%"], ["2", "3"]]),
       events=st.lists(event, max_size=40))
def test_waves_activate_in_order_and_stop_for_good_on_a_failure(n, specs, events) -> None:
    nodes = fleet(n)
    w = WaveRollout("m", 2, P.WavePlan(specs, wave_wait_s=2, confirm_s=15), nodes, 0.0)
    actions = w.start(0.0)
    state: dict[str, P.NodeStatus] = {f"n{i:02d}": row(f"n{i:02d}", seq=1) for i in range(n)}
    now = 0.0
    for who, what, dt in events:
        now += dt
        node = f"n{who % n:02d}"
        state[node] = {"loading": row(node, "loading", 2), "serving": row(node, seq=2),
                       "reject": row(node, seq=1, rejected=2, why="bad"), "lost": row(node, "lost", 1),
                       "idle": row(node, "idle", 0)}[what]
        out = w.step(now, list(state.values()))
        if any(isinstance(a, Finish) for a in out):  # every activated node served seq 2
            assert all(x in w.serving for x in w.activated)
        actions += out
    activated = [x for a in actions if isinstance(a, ActivateNodes) for x in a.nodes]
    ends = [a for a in actions if isinstance(a, Finish | Halt)]
    # each node activated at most once, in the rollout's order, wave by wave
    assert activated == w.order[: len(activated)]
    assert len(ends) <= 1 and (not ends or actions[-1] is ends[0])  # nothing after the end
    if ends and isinstance(ends[0], Halt):
        halt = ends[0]
        assert halt.failed and set(halt.failed) <= set(activated)
        assert not set(halt.rollback) & {x for x, why in halt.failed.items() if why.startswith("rejected")}
    if ends and isinstance(ends[0], Finish):
        assert len(activated) == w.counts[-1]
    # a node whose wave was never reached was never activated
    assert len(activated) in {0, *w.counts}
