"""The hub's core without sockets: the catalog, activation, waves driven by random report
orders (lost nodes, rejections, halts), liveness. Before this core existed these rules lived
in the hub shell (`_activate`, `_step_waves`, `_roll_back`, `_find`, `_check_liveness`) and
could be reached only through sockets."""

from __future__ import annotations

import logging

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import raw_release
from zmqmodels import protocol as P
from zmqmodels.core.fleet import Fleet
from zmqmodels.core.hub import OLDER_KEPT, HubCore, Load, Log, RollBack, SendRelease, StoreActive
from zmqmodels.core.serve import Broadcast, Reply
from zmqmodels.errors import ZmqModelsError

pytestmark = pytest.mark.timeout(120)
ARCHIVE = bytes(range(256)) * 64


def rel(seq: int, *, staged: bool = False, name: str = "m"):
    r = raw_release(name, ARCHIVE + seq.to_bytes(4, "little"), chunk_bytes=4096)
    m = msgspec.structs.replace(r.manifest, seq=seq, staged=staged)
    return type(r)(m, r.chunks)


def report(node: str, state: str = "serving", seq: int = 1, *, labels=(), requests=0, errors=0,
           model: str = "m") -> P.Report:
    return P.Report(node=node, model=model, state=P.ModelState(state), seq=seq, labels=list(labels),
                    requests=requests, errors=errors)


def sent(actions, kind):
    return [P.unpack(a.frames)[0] for a in actions if isinstance(a, Broadcast | Reply)
            and isinstance(P.unpack(a.frames)[0], kind)]


def core(**kw) -> HubCore:
    return HubCore("hub-1", fleet=Fleet(lost_after_s=kw.pop("lost_after_s", 5.0),
                                        forget_after_s=kw.pop("forget_after_s", 60.0)), **kw)


def test_a_release_is_broadcast_then_beaten_and_answers_fetches() -> None:
    c = core()
    out = c.released(rel(1), 0.0)
    assert isinstance(out[0], SendRelease)
    beats = sent(out, P.Heartbeat)
    assert [(b.name, b.seq, b.active) for b in beats] == [("", 0, 0), ("m", 1, 1)]
    (manifest,) = c.fetch(b"peer", P.FetchManifest("m", 0))
    assert P.unpack(manifest.frames)[0] == P.ManifestFrames() and manifest.peer == b"peer"
    chunks = c.fetch(b"peer", P.FetchChunks("m", 1, [0, 1]))
    assert [P.unpack(a.frames)[0].index for a in chunks] == [0, 1]


def test_an_older_stored_release_is_read_off_the_io_thread_then_answered() -> None:
    c = core()
    c.restore(rel(3), 3, dict.fromkeys((1, 2, 3), False))
    first = c.fetch(b"a", P.FetchManifest("m", 2))
    again = c.fetch(b"b", P.FetchChunks("m", 2, [0]))
    assert first == [Load("m", 2)] and again == []  # one read for both askers
    out = c.loaded(rel(2))
    assert [a.peer for a in out] == [b"a", b"b"]
    assert c.fetch(b"c", P.FetchManifest("m", 2))[0].peer == b"c"  # kept in memory now
    (err,) = sent(c.fetch(b"d", P.FetchManifest("m", 9)), P.ErrorReply)
    assert err.code == "not_found"


def test_a_failed_read_answers_not_found_and_forgets_the_seq() -> None:
    c = core()
    c.restore(rel(3), 3, dict.fromkeys((1, 3), False))
    assert c.fetch(b"a", P.FetchChunks("m", 1, [0])) == [Load("m", 1)]
    out = c.load_failed("m", 1, "gone")
    assert any(isinstance(a, Log) and a.level == logging.ERROR for a in out)
    (err,) = sent(out, P.ErrorReply)
    assert err.code == "not_found" and err.indices == [0]
    assert c.fetch(b"a", P.FetchManifest("m", 1)) != [Load("m", 1)]


def test_older_releases_kept_in_memory_are_bounded() -> None:
    c = core()
    c.restore(rel(20), 20, dict.fromkeys(range(1, 21), False))
    for seq in range(1, 10):
        c.loaded(rel(seq))
    assert len(c._older) == OLDER_KEPT


def test_over_credit_fetches_are_refused_before_any_read() -> None:
    c = core()
    c.restore(rel(3), 3, dict.fromkeys((1, 3), False))
    (err,) = sent(c.fetch(b"a", P.FetchChunks("m", 1, list(range(c.limits.fetch_credit + 1)))),
                  P.ErrorReply)
    assert err.code == "too_large"


def test_fleet_activation_answers_once_it_is_durable() -> None:
    c = core()
    c.released(rel(1), 0.0)
    c.released(rel(2, staged=True), 0.0)
    reply, actions = c.activate(P.Activate("m", 2), 1.0, b"op")
    assert reply is None and actions == [StoreActive("m", 2, b"op")]
    assert c.active["m"] == 1  # not before the store says so
    out = c.stored_active("m", 2, b"op")
    (done,) = sent(out, P.Activated)
    assert done.fleet and c.active["m"] == 2
    assert [b.active for b in sent(out, P.Heartbeat) if b.name == "m"] == [2]


def test_activation_never_steps_back_and_names_the_way_to_go_back() -> None:
    c = core()
    c.released(rel(1), 0.0)
    c.released(rel(2), 0.0)
    with pytest.raises(ZmqModelsError, match="rollback m --to 1"):
        c.activate(P.Activate("m", 1), 0.0)
    with pytest.raises(ZmqModelsError, match="not published staged"):
        c.activate(P.Activate("m", 2), 0.0)
    with pytest.raises(ZmqModelsError, match="no release"):
        c.activate(P.Activate("m", 7), 0.0)


def test_labels_resolve_to_the_nodes_carrying_them_and_repeat_until_served() -> None:
    c = core()
    c.released(rel(1), 0.0)
    c.released(rel(2, staged=True), 0.0)
    for n, labels in (("a", ["gpu"]), ("b", []), ("c", ["gpu"])):
        c.report(report(n, labels=labels), 0.0)
    reply, out = c.activate(P.Activate("m", 2, labels=["gpu"]), 0.5)
    assert reply is not None and reply.nodes == ["a", "c"]
    assert [a.nodes for a in sent(out, P.Activate)] == [["a", "c"]]
    c.report(report("a", seq=2), 1.0)
    assert [a.nodes for a in sent(c.tick(1.0), P.Activate)] == [["c"]]  # a serves it: only c
    c.report(report("c", seq=2), 1.5)
    c.tick(1.5)
    assert sent(c.tick(2.0), P.Activate) == []
    with pytest.raises(ZmqModelsError, match="no node zz"):
        c.activate(P.Activate("m", 2, nodes=["zz"]), 2.0)


def test_a_halted_wave_rolls_its_nodes_back_and_the_core_records_it() -> None:
    c = core()
    c.released(rel(1), 0.0)
    for n in ("a", "b", "c"):
        c.report(report(n), 0.0)
    out = c.released(rel(2, staged=True), 0.0, P.WavePlan(["1", "100%"], wave_wait_s=10,
                                                        halt_on=["error-rate>10%"]))
    assert [a.nodes for a in sent(out, P.Activate)] == [["a"]]
    c.report(report("a", seq=2, requests=10, errors=5), 1.0)
    out = c.tick(1.0)  # serving, and over the error rate at once
    assert RollBack("m", 1) in out and sent(c.tick(2.0), P.Activate) == []
    assert c.waves["m"].state == P.WaveState.HALTED and "error rate" in c.waves["m"].reason
    out = c.rolled_back("m", rel(3), 3.0)
    assert c.waves["m"].status().rollback_seq == 3 and isinstance(out[0], SendRelease)
    c.rollback_failed("m", 1, "disk full")
    assert "disk full" in c.waves["m"].reason


def test_a_newer_publish_supersedes_a_running_rollout() -> None:
    c = core()
    c.released(rel(1), 0.0)
    c.report(report("a"), 0.0)
    c.released(rel(2, staged=True), 0.0, P.WavePlan(["100%"], wave_wait_s=60))
    c.released(rel(3), 1.0)
    assert c.waves["m"].state == P.WaveState.HALTED and "superseded by seq 3" in c.waves["m"].reason


def test_a_silent_node_is_logged_lost_once_then_forgotten() -> None:
    c = core(lost_after_s=5.0, forget_after_s=20.0)
    c.report(report("a"), 0.0)
    lost = [a for a in c.tick(6.0) if isinstance(a, Log) and "lost" in a.message]
    assert len(lost) == 1 and [a for a in c.tick(7.0) if isinstance(a, Log) and "lost" in a.message] == []
    assert c.status(7.0).nodes[0].state == P.ModelState.LOST
    gone = [a for a in c.tick(21.0) if isinstance(a, Log) and "forgotten" in a.message]
    assert len(gone) == 1 and c.status(21.0).nodes == []


def test_held_tracks_the_highest_seq_any_node_reported() -> None:
    c = core()
    c.report(report("a", seq=4), 0.0)
    c.report(P.Report(node="b", model="m", state=P.ModelState.SERVING, seq=2, staged=9), 0.0)
    c.report(report("a", seq=1), 0.1)
    assert c.held["m"] == 9


# -- properties over random event orders ----------------------------------------------------
NODES = ("n0", "n1", "n2", "n3", "n4")
event = st.one_of(
    st.tuples(st.just("report"), st.sampled_from(NODES),
              st.sampled_from(["serving", "loading", "receiving", "rejected", "error"]),
              st.sampled_from([1, 2, 3]), st.integers(0, 20), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.floats(0.1, 30.0)),
    st.tuples(st.just("activate"), st.sampled_from([1, 2, 3, 4]),
              st.lists(st.sampled_from(NODES), max_size=2)),
    st.tuples(st.just("publish"), st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(event, max_size=60),
       st.lists(st.sampled_from(["1", "2", "50%", "100%"]), min_size=1, max_size=3))
def test_properties_over_random_report_orders(events, waves) -> None:
    """Whatever the order of reports, ticks, operator activations and publishes:
    the active seq never goes down; a halted rollout never activates anybody again; nodes
    are only ever activated for a seq the hub holds; only a finished or an operator's
    fleet-wide activation records an active seq; every rollback names the seq active when
    its rollout began, never a newer one."""
    c = core(lost_after_s=4.0, forget_after_s=40.0)
    now, seq = 0.0, 1
    c.released(rel(1), now)
    for n in NODES[:3]:
        c.report(report(n), now)
    seq = 2
    c.released(rel(2, staged=True), now, P.WavePlan(waves, wave_wait_s=2.0, confirm_s=10.0,
                                                    halt_on=["error-rate>20%"]))
    active_seen, halted_at = c.active["m"], None

    def carry(actions) -> None:
        nonlocal halted_at
        for a in actions:
            if isinstance(a, StoreActive):
                c.stored_active(a.name, a.seq, a.peer)
            if isinstance(a, RollBack):
                assert a.before <= active_seen and a.before < c.waves["m"].seq
            if isinstance(a, Broadcast):
                msg = P.unpack(a.frames)[0]
                if isinstance(msg, P.Activate):
                    assert msg.seq in {r.manifest.seq for r in (c.latest["m"],)} or msg.seq <= seq
        w = c.waves["m"]
        if w.state == P.WaveState.HALTED and halted_at is None:
            halted_at = len(w.activated)

    for ev in events:
        match ev:
            case ("report", node, state, s, req, err):
                carry(c.report(report(node, state, min(s, seq), requests=req, errors=min(err, req)), now))
            case ("tick", dt):
                now += dt
                carry(c.tick(now))
            case ("activate", s, nodes):
                try:
                    _, out = c.activate(P.Activate("m", s, nodes), now, b"op")
                except ZmqModelsError as exc:
                    assert str(exc)
                    continue
                carry(out)
            case ("publish", staged):
                seq += 1
                carry(c.released(rel(seq, staged=staged), now))
        assert c.active["m"] >= active_seen, "the active seq went down"
        active_seen = c.active["m"]
        if halted_at is not None:
            assert len(c.waves["m"].activated) == halted_at, "a halted rollout activated more nodes"
    st_ = c.status(now)
    assert st_.rollouts[0].state in set(P.WaveState)


def test_fetches_waiting_for_one_read_are_bounded_and_the_rest_told_to_retry() -> None:
    from zmqmodels.core.hub import PARKED_MAX

    c = core()
    c.restore(rel(3), 3, dict.fromkeys((1, 3), False))
    outs = [c.fetch(f"p{i}".encode(), P.FetchManifest("m", 1)) for i in range(PARKED_MAX + 1)]
    assert outs[0] == [Load("m", 1)] and all(o == [] for o in outs[1:PARKED_MAX])
    (err,) = sent(outs[-1], P.ErrorReply)
    assert err.code == "busy" and err.retryable
    assert len(c.loaded(rel(1))) == PARKED_MAX


def test_activation_knows_a_stored_release_was_staged_without_reading_it() -> None:
    c = core()
    c.restore(rel(3), 1, {1: False, 2: False, 3: True})
    with pytest.raises(ZmqModelsError, match="not published staged"):
        c.activate(P.Activate("m", 2), 0.0)  # not in memory, and not staged: refused as before
    assert c.activate(P.Activate("m", 3), 0.0)[1] == [StoreActive("m", 3, None)]
