"""What a node tells the hub, without sockets: the node shell kept this accounting itself
(`_report`, `_count`, `_counts`) and the follower's thread read it live."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmqmodels.core.ledger import KEEP_SEQS, Ledger, Tell
from zmqmodels.protocol import ModelState


def test_a_report_is_told_only_when_state_or_seq_changes() -> None:
    led = Ledger(["m"])
    assert led.view("m", "idle", 0, "", "", 0.0) == Tell("m", ModelState.IDLE, 0, "")
    assert led.view("m", "idle", 0, "", "", 1.0) is None
    assert led.view("m", "loading", 2, "v2", "", 2.0).state == ModelState.LOADING


def test_no_worker_able_to_start_is_an_error_with_the_reason_never_idle() -> None:
    led = Ledger(["m"])
    tell = led.view("m", "idle", 0, "", "worker exits at start: ImportError", 0.0)
    assert tell.state == ModelState.ERROR and "ImportError" in tell.reason


def test_the_roll_stage_runs_from_verified_to_serving_and_a_superseded_one_has_none() -> None:
    led = Ledger(["m"])
    led.rolling("m", 2, 10.0)
    led.rolling("m", 3, 11.0)  # 2 superseded before it served
    assert led.view("m", "serving", 2, "", "", 12.0).roll_s is None
    assert led.view("m", "serving", 3, "", "", 14.5).roll_s == 3.5
    assert not led.is_rolling("m", 3)


def test_requests_count_against_the_seq_that_answered_and_server_codes_are_errors() -> None:
    led = Ledger(["m"])
    led.view("m", "serving", 1, "", "", 0.0)
    for code in ("", "", "model_error", "bad_input", "worker_lost"):
        led.answer("m", 1, code)
    led.answer("m", 2, "internal")
    led.answer("other", 1, "internal")  # a name this node does not serve: not counted
    assert led.counted == {"m": (5, 2)}
    led.view("m", "serving", 2, "", "", 1.0)
    assert led.counted == {"m": (1, 1)}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.sampled_from(["", "model_error", "bad_input"])),
                max_size=80))
def test_counts_stay_bounded_and_errors_never_exceed_requests(answers) -> None:
    led = Ledger(["m"])
    for seq, code in answers:
        led.answer("m", seq, code)
        assert len(led.answered["m"]) <= KEEP_SEQS
        assert all(err <= req for req, err in led.answered["m"].values())
