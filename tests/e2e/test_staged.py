"""Staged rollouts on real processes: distribution apart from activation, waves, halts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import wait_until
from tests.models import Probe, explodes_on_nodes, probe_examples
from zmqmodels import Client, Hub, Node, Relay, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.errors import ZmqModelsError
from zmqmodels.release.store import Store, write_release_file

pytestmark = pytest.mark.timeout(180)
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def probe(scale: float, label: str):
    torch.manual_seed(0)
    return build_release(compile_model(Probe(scale), probe_examples()), "probe", label)


def node(hub_addr: str, tmp_path, name: str, labels=(), **kw) -> Node:
    return Node(hub_addr, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / name,
                node_id=name, labels=list(labels), **kw).start()


def answer(n: Node, x: torch.Tensor | None = None):
    with Client(n.address, timeout=10) as c:
        return c.infer("probe", torch.ones(1, 4) if x is None else x)


def row(hub: Hub, name: str):
    return next((r for r in hub.status().nodes if r.node == name and r.model == "probe"), None)


def rollout(hub: Hub, seq: int, state: str):
    return next((w for w in hub.status().rollouts if w.seq == seq and w.state == state), None)


def serving(hub: Hub, name: str, seq: int) -> bool:
    r = row(hub, name)
    return r is not None and r.state == "serving" and r.seq == seq


def test_staged_publish_leaves_every_node_on_the_old_version_until_activate(hub, tmp_path) -> None:
    a = node(hub.address, tmp_path, "a", ["canary"])
    b = node(hub.address, tmp_path, "b", ["zone=b"])
    try:
        v1 = hub.publish(probe(1.0, "v1")).seq
        assert hub.wait_for("probe", v1, 2, 60)[0]
        v2 = hub.publish(probe(2.0, "v2"), staged=True).seq
        wait_until(lambda: all((row(hub, n) or row).staged == v2 for n in "ab"), 30, what="both staged")
        for n in (a, b):  # received, verified, cached: still serving v1
            r = answer(n)
            assert (r.seq, r.label) == (v1, "v1") and torch.equal(r.outputs, torch.ones(1, 4))
        assert (tmp_path / "a" / "probe" / f"{v2:012d}.pt").exists()
        # a node restarted now serves what it served, not the staged release in its cache
        b.close()
        b = node(hub.address, tmp_path, "b", ["zone=b"])
        assert answer(b).seq == v1
        wait_until(lambda: (row(hub, "b") or row).staged == v2 and serving(hub, "b", v1), 30, what="b back")
        # by label: the canary only
        with pytest.raises(ZmqModelsError, match="no node ghost follows probe"):
            hub.activate("probe", v2, nodes=["ghost"])  # a typo is refused, not repeated forever
        done = hub.activate("probe", v2, labels=["canary"])
        assert done.nodes == ["a"] and not done.fleet
        wait_until(lambda: serving(hub, "a", v2), 30, what="canary on v2")
        assert torch.equal(answer(a).outputs, torch.full((1, 4), 2.0))
        assert answer(b).seq == v1 and row(hub, "b").staged == v2
        # fleet-wide
        assert hub.activate("probe", v2).fleet
        wait_until(lambda: serving(hub, "b", v2), 30, what="b on v2")
        assert (answer(b).seq, row(hub, "b").staged) == (v2, 0)
    finally:
        a.close()
        b.close()


def test_waves_halt_when_the_canary_rejects_and_the_others_never_load_it(hub, tmp_path) -> None:
    nodes = [node(hub.address, tmp_path, "c0", ["canary"]), node(hub.address, tmp_path, "c1"),
             node(hub.address, tmp_path, "c2")]
    try:
        v1 = hub.publish(probe(1.0, "v1")).seq
        assert hub.wait_for("probe", v1, 3, 60)[0]
        bad = hub.publish(explodes_on_nodes("probe", "nan"),
                          plan=P.WavePlan(["1", "100%"], wave_wait_s=0.5)).seq

        def ended():
            w = next((w for w in hub.status().rollouts if w.seq == bad), None)
            return w if w is not None and w.state != "running" else None

        wave = wait_until(ended, 60, what="the rollout to end")
        assert wave.state == "halted" and wave.activated == ["c0"] and list(wave.failed) == ["c0"]
        assert "NaN or Inf" in wave.failed["c0"] and wave.rollback_seq == 0
        for n in nodes[1:]:  # received it, never loaded it, still serve v1
            assert n.stats["rejected_load_or_check"] == 0
            r = row(hub, n.node_id)
            assert (r.staged, r.rejected_seq) == (bad, 0) and answer(n).seq == v1
        assert answer(nodes[0]).seq == v1
    finally:
        for n in nodes:
            n.close()


def test_waves_roll_out_in_order_and_an_error_rate_halts_and_rolls_back(hub, tmp_path) -> None:
    nodes = [node(hub.address, tmp_path, f"e{i}", ["canary"] if i == 0 else []) for i in range(3)]
    try:
        v1 = hub.publish(probe(1.0, "v1")).seq
        assert hub.wait_for("probe", v1, 3, 60)[0]
        # a good release goes through every wave
        v2 = hub.publish(probe(2.0, "v2"), plan=P.WavePlan(["1", "100%"], wave_wait_s=0.5)).seq
        wave = wait_until(lambda: rollout(hub, v2, "done"), 60, what="v2 done")
        assert wave.activated[0] == "e0" and sorted(wave.serving) == ["e0", "e1", "e2"]
        assert all(answer(n).seq == v2 for n in nodes)
        # v3 errors on the canary's traffic: the wave halts and the canary goes back to v2's content
        v3 = hub.publish(probe(3.0, "v3"), plan=P.WavePlan(["1", "100%"], wave_wait_s=30,
                                         halt_on=["error-rate>10%"])).seq
        wait_until(lambda: serving(hub, "e0", v3), 30, what="canary on v3")
        with Client(nodes[0].address, timeout=10) as c:
            for _ in range(5):
                with pytest.raises(Exception, match="probe asked to fail"):
                    c.infer("probe", torch.full((1, 4), -1.0))
        w = wait_until(lambda: (w := rollout(hub, v3, "halted")) and w.rollback_seq and w, 30,
                       what="halted and rolled back")
        assert "error rate" in w.reason and "e0" in w.failed and w.rollback_seq > v3
        wait_until(lambda: all(serving(hub, n.node_id, w.rollback_seq) for n in nodes), 60,
                   what="rolled back")
        for n in nodes:  # v2's outputs under the rollback's seq; versions never stepped back
            r = answer(n)
            assert r.seq == w.rollback_seq and torch.equal(r.outputs, torch.full((1, 4), 2.0))
        assert all(row(hub, f"e{i}").seq != v3 for i in (1, 2))
    finally:
        for n in nodes:
            n.close()


def test_status_shows_labels_staged_seqs_and_relays_and_activate_by_cli(hub, tmp_path) -> None:
    with Relay(hub.address, "tcp://127.0.0.1:0", tmp_path / "relay", ["probe"], relay_id="r1") as relay:
        n = node(relay.address, tmp_path, "behind", ["zone=a"])
        try:
            v1 = hub.publish(probe(1.0, "v1")).seq
            assert hub.wait_for("probe", v1, 1, 60)[0]
            v2 = hub.publish(probe(2.0, "v2"), staged=True).seq
            wait_until(lambda: (row(hub, "behind") or row).staged == v2, 30, what="staged via relay")
            out = subprocess.run([sys.executable, "-m", "zmqmodels", "status", "--hub", hub.address],
                                 env=ENV, capture_output=True, text=True, timeout=60)
            line = next(x for x in out.stdout.splitlines() if x.startswith("behind"))
            assert "(via r1)" in line and "zone=a" in line and f" {v2} " in line, out.stdout
            out = subprocess.run([sys.executable, "-m", "zmqmodels", "activate", "probe", "--seq", str(v2),
                                  "--label", "zone=a", "--wait", "--hub", hub.address],
                                 env=ENV, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "activated probe seq" in out.stdout and "1/1 activated node(s) serve" in out.stdout
            assert answer(n).seq == v2
        finally:
            n.close()


def test_cli_publish_in_waves_reports_each_wave_and_exits_1_on_a_halt(hub, tmp_path) -> None:
    n = node(hub.address, tmp_path, "k0", ["canary"])
    try:
        def publish(*source: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "zmqmodels", "publish", *source,
                                   "--hub", hub.address, "--waves", "1,100%", "--wave-wait", "0.5",
                                   "--timeout", "120"], env=ENV, capture_output=True, text=True, timeout=180)

        good = publish("tests.models:make_probe", "--name", "probe")
        assert good.returncode == 0, good.stdout + good.stderr
        assert "rollout probe seq 1: done, wave 1/1 (1 of 1 node(s) activated, 1 serving)" in good.stdout
        write_release_file(tmp_path / "bad.zmqm", explodes_on_nodes("probe", "nan"))  # as `build` writes
        bad = publish(str(tmp_path / "bad.zmqm"))
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "FAILED: rollout probe seq 2: halted" in bad.stdout
        assert "failed k0: rejected seq 2:" in bad.stdout and "NaN or Inf" in bad.stdout
        assert answer(n).seq == 1
    finally:
        n.close()


def test_an_embedded_subscriber_without_a_cache_holds_a_staged_release_until_activated(hub) -> None:
    from zmqmodels import FollowOptions, Subscriber

    with Subscriber(hub.address, ["probe"], follow=FollowOptions(node_id="emb")) as sub:
        v1 = hub.publish(probe(1.0, "v1")).seq
        sub.wait_until_serving("probe", timeout=60)
        v2 = hub.publish(probe(2.0, "v2"), staged=True).seq
        wait_until(lambda: (row(hub, "emb") or row).staged == v2, 30, what="held in memory")
        assert sub.version("probe") == ("v1", v1)
        assert torch.equal(sub.predict("probe", torch.ones(1, 4)), torch.ones(1, 4))
        hub.activate("probe", v2, nodes=["emb"])
        wait_until(lambda: sub.version("probe") == ("v2", v2), 30, what="v2 after activation")
        assert torch.equal(sub.predict("probe", torch.ones(1, 4)), torch.full((1, 4), 2.0))
        wait_until(lambda: serving(hub, "emb", v2) and row(hub, "emb").staged == 0, 10, what="the report")


def _activate_cli(hub: Hub, seq: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zmqmodels", "activate", "probe", "--seq", str(seq),
                           "--hub", hub.address], env=ENV, capture_output=True, text=True, timeout=60)


def test_activation_never_goes_backwards_by_accident(tmp_path) -> None:
    """Activating an older seq than the active one is refused unless asked for, and a hub
    restart keeps the active seq."""
    store = Store(tmp_path / "hub")
    with Hub("tcp://127.0.0.1:0", store, heartbeat_interval_s=0.25) as hub:
        a = node(hub.address, tmp_path, "a")
        try:
            v1 = hub.publish(probe(1.0, "v1")).seq
            wait_until(lambda: serving(hub, "a", v1), 60, what="v1 served")
            out = _activate_cli(hub, v1)  # never staged: there is nothing to activate
            assert out.returncode == 1 and "was not published staged" in out.stderr, out
            v2 = hub.publish(probe(2.0, "v2"), staged=True).seq
            hub.activate("probe", v2)
            wait_until(lambda: serving(hub, "a", v2), 60, what="v2 served fleet-wide")
            out = _activate_cli(hub, v1)
            assert out.returncode == 1, out
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and f"older than the active seq {v2}" in lines[0], out.stderr
            assert f"zmqmodels rollback probe --to {v1}" in lines[0]
            with pytest.raises(ZmqModelsError, match="never steps back"):
                hub.activate("probe", v1, nodes=["a"])  # per node too
            assert store.active("probe") == v2
            assert answer(a).seq == v2
        finally:
            a.close()
    store.activate("probe", v1)  # the store itself keeps the active seq monotonic
    assert store.active("probe") == v2
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), heartbeat_interval_s=0.25) as hub:
        fresh = node(hub.address, tmp_path, "fresh")  # an empty cache, after the restart
        try:
            wait_until(lambda: serving(hub, "fresh", v2), 60, what="the fresh node serving v2")
            assert answer(fresh).seq == v2
        finally:
            fresh.close()


def test_a_node_that_joins_after_a_staged_publish_serves_the_active_release(hub, tmp_path) -> None:
    """A node with an empty cache that joined while seq 2 was staged took seq 2 (the newest),
    held it, and served nothing; it now fetches the active seq 1 as well and serves it."""
    v1 = hub.publish(probe(1.0, "v1")).seq
    v2 = hub.publish(probe(2.0, "v2"), staged=True).seq
    late = node(hub.address, tmp_path, "late")
    try:
        wait_until(lambda: serving(hub, "late", v1) and row(hub, "late").staged == v2, 60,
                   what="the late node serving v1 and holding v2")
        assert answer(late).seq == v1
        hub.activate("probe", v2)
        wait_until(lambda: serving(hub, "late", v2), 60, what="v2 once activated")
        assert answer(late).seq == v2
    finally:
        late.close()
