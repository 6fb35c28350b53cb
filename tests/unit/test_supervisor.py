"""The supervisor core: silence measured on the loop's own clock, back-off that resets."""

from __future__ import annotations

import pytest

from zmqmodels.core.supervisor import Activity, Kill, Spawn, Supervisor

pytestmark = pytest.mark.timeout(30)


def make(**kw) -> Supervisor:
    kw = {"ttl_s": 5.0, "request_timeout_s": 120.0, "load_timeout_s": 600.0, **kw}
    return Supervisor(["w0", "w1"], **kw)


def test_spawns_every_worker_at_first_tick() -> None:
    s = make()
    assert s.tick(0.0) == [Spawn("w0"), Spawn("w1")]


def test_silent_idle_worker_is_killed_once() -> None:
    s = make()
    for w in ("w0", "w1"):
        s.spawned(w, 0.0)
        s.ready(w, 0.0)
    for t in range(1, 6):
        s.seen("w1", float(t))
        assert s.tick(float(t)) == []
    s.seen("w1", 5.5)
    kills = s.tick(5.5 + 0.1)
    assert kills == [Kill("w0", "silent for 5.6s while idle (limit 5s)")]
    assert s.tick(5.7) == []  # not twice


def test_a_starting_worker_gets_the_start_timeout_not_the_idle_ttl() -> None:
    """bench_fleet --local: eight nodes of two workers starting on two cores take 15-20 s to
    import torch; killed after the 5 s idle TTL, workers were restarted forever and no node
    ever served (the rollout's roll stage read 219 s)."""
    s = make(start_timeout_s=60.0)
    for w in ("w0", "w1"):
        s.spawned(w, 0.0)
    for t in range(1, 120):
        assert s.tick(t * 0.5) == []  # silent while starting: not hung
    s.ready("w1", 59.0)
    assert s.tick(60.5) == [Kill("w0", "silent for 60.5s while starting (limit 60s)")]


def test_pause_of_the_node_is_not_a_dead_worker() -> None:
    """Milestone 1: after SIGSTOP/SIGCONT of a node, the idle check fired on resume and killed
    a healthy worker. The loop's own gap is forgiven."""
    s = make()
    for w in ("w0", "w1"):
        s.spawned(w, 0.0)
        s.ready(w, 0.0)
    s.tick(0.1)
    assert s.tick(30.0) == []  # the loop itself did not run for 30 s
    assert s.pauses_forgiven == 1
    kills = []
    for i in range(1, 80):  # then a real silence, with the loop running, counts again
        kills += s.tick(30.0 + i * 0.1)
    assert {k.wid for k in kills} == {"w0", "w1"}
    assert all(float(k.reason.split()[2][:-1]) > 5.0 for k in kills)


def test_busy_and_loading_have_their_own_limits() -> None:
    s = make()
    s.spawned("w0", 0.0)
    s.spawned("w1", 0.0)
    s.seen("w0", 0.0, Activity.BUSY)
    s.seen("w1", 0.0, Activity.LOADING)
    for t in range(1, 121):
        assert s.tick(float(t)) == [] or t > 119
    assert [k.wid for k in s.tick(121.0)] == ["w0"]


def test_backoff_grows_in_a_crash_loop_and_resets_after_a_healthy_run() -> None:
    """Milestone 1 never reset the back-off: a worker healthy for an hour came back slowly."""
    s = make(healthy_s=30.0, first_backoff_s=0.1, max_backoff_s=5.0)
    s.spawned("w0", 0.0)
    assert s.exited("w0", 1.0) == 1.0  # first death: at once
    s.spawned("w0", 1.0)
    assert s.exited("w0", 1.5) == pytest.approx(1.6)
    s.spawned("w0", 1.6)
    assert s.exited("w0", 2.0) == pytest.approx(2.2)
    s.spawned("w0", 2.2)
    assert s.exited("w0", 2.3) == pytest.approx(2.7)
    s.spawned("w0", 2.7)
    assert s.exited("w0", 100.0) == 100.0  # it ran healthily for 97 s: no back-off
    assert not [a for a in s.tick(99.9) if a == Spawn("w0")]
    assert Spawn("w0") in s.tick(100.0)


def test_exits_before_ready_three_times_is_a_start_error_until_one_comes_up() -> None:
    s = make()
    for n in range(3):
        s.spawned("w0", float(n))
        assert s.start_error() == ""
        s.exited("w0", float(n) + 0.5, code=1)
    assert s.start_error() == "worker w0 exits before it is ready (exit code 1, 3 times in a row); " \
        "see the node's log"
    s.spawned("w0", 5.0)
    s.ready("w0", 6.0)
    assert s.start_error() == ""
    s.exited("w0", 7.0, code=-9)  # dying after READY is not a start failure
    assert s.start_error() == ""
