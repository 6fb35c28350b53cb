"""Nodes at start: many started at once on one machine all come up (a run dir is never taken
for a dead node's by another node's start-up cleaner), and a started node has paid its
start-up costs before its first release arrives."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import ROOT
from zmqmodels.node.host import STARTING_GRACE_S, make_run_dir, remove_dead_run_dirs

# one "node start" per loop: make the run dir, use it (as the front binds its ipc endpoint),
# hold it a moment, leave it; a dir that vanished under its owner is a lost node
_STARTER = textwrap.dedent("""
    import os, shutil, sys, time
    from zmqmodels.node.host import make_run_dir
    tmp, rounds = sys.argv[1], int(sys.argv[2])
    lost = 0
    for _ in range(rounds):
        d, lock = make_run_dir(tmp)
        try:
            with open(os.path.join(d, "workers"), "wb"):
                pass
        except FileNotFoundError:
            lost += 1
        time.sleep(0.001)
        if not os.path.exists(os.path.join(d, "workers")):
            lost += 1
        shutil.rmtree(d, ignore_errors=True)
        lock.close()
    print(lost)
""")


def test_sixteen_starters_at_once_never_lose_a_run_dir(short_tmp: str) -> None:
    """16 processes making, using and leaving run dirs in one directory as fast as they can
    (each start cleans up the dirs of nodes that are gone): no dir vanishes under its owner."""
    procs = [subprocess.Popen([sys.executable, "-c", _STARTER, short_tmp, "150"], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for _ in range(16)]
    lost = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0
        lost.append(int(out.strip()))
    assert sum(lost) == 0, f"run dirs lost under their nodes: {lost}"
    assert not os.listdir(short_tmp)  # each starter removed its own dirs


def test_a_cleaner_never_removes_a_live_dir_nor_a_half_made_one(short_tmp: str) -> None:
    mine, lock = make_run_dir(short_tmp)
    # a dir some node is making right now: its lock file exists, not yet locked
    half = os.path.join(short_tmp, ".zmqm-starting-abc")
    os.mkdir(half)
    open(os.path.join(half, ".lock"), "wb").close()
    # a dead node's dir (lock free) and a dead node's half-made one, long ago
    dead = os.path.join(short_tmp, "zmqm-node-dead")
    os.mkdir(dead)
    open(os.path.join(dead, ".lock"), "wb").close()
    stale = os.path.join(short_tmp, ".zmqm-starting-old")
    os.mkdir(stale)
    open(os.path.join(stale, ".lock"), "wb").close()
    old = time.time() - STARTING_GRACE_S - 5
    os.utime(stale, (old, old))
    try:
        gone = remove_dead_run_dirs(short_tmp)
        assert sorted(gone) == sorted([dead, stale])
        assert os.path.isdir(mine) and os.path.isdir(half)
        # the live node's lock is still its own
        with open(os.path.join(mine, ".lock"), "rb") as f, pytest.raises(OSError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        lock.close()
    assert remove_dead_run_dirs(short_tmp) == [mine]  # once its node let go


@pytest.mark.timeout(300)
def test_sixteen_serve_processes_started_at_once_all_report_and_publish_counts_the_known(tmp_path) -> None:
    """16 ``zmqmodels serve`` started together (a DaemonSet restart, a host reboot) all reach
    the hub; a ``--wait-for`` asking for more nodes than the hub knows says ``k of N nodes
    known`` while it waits and, at the end, how many were never seen."""
    from tests.helpers import wait_until
    from tests.models import Probe, probe_examples
    from zmqmodels import Hub, build_release, compile_model
    from zmqmodels.release.store import Store

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    release = build_release(compile_model(Probe(2.0), probe_examples()), "probe", "a")
    built = Store(tmp_path / "built")
    path = built.path("probe", built.put(release).release.manifest.seq)
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "store")) as hub:
        logs = [open(tmp_path / f"n{i}.log", "w") for i in range(16)]  # noqa: SIM115
        nodes = [subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--model", "probe",
                                   "--hub", hub.address, "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                                   "--node-id", f"n{i}", "--cache", str(tmp_path / f"cache{i}")],
                                  env=env, stdout=subprocess.DEVNULL, stderr=logs[i]) for i in range(16)]
        try:
            def known() -> set[str]:
                return {n.node for n in hub.status().nodes if n.model == "probe"}

            wait_until(lambda: len(known()) == 16 or any(p.poll() is not None for p in nodes), 240,
                       interval=0.2, what="16 nodes reporting")
            dead = [(i, (tmp_path / f"n{i}.log").read_text()[-300:]) for i, p in enumerate(nodes)
                    if p.poll() is not None]
            assert not dead, dead
            assert known() == {f"n{i}" for i in range(16)}
            out = subprocess.run([sys.executable, "-m", "zmqmodels", "publish", str(path),
                                  "--hub", hub.address, "--wait-for", "17", "--timeout", "15"],
                                 env=env, capture_output=True, text=True, timeout=200)
            assert out.returncode == 1, out.stdout + out.stderr
            assert "16 of 17 nodes known" in out.stdout, out.stdout
            assert "1 of 17 node(s) never seen by the hub; it knows 16: n0, n1," in out.stdout, out.stdout
        finally:
            for p in nodes:
                p.terminate()
            for p in nodes:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            for f in logs:
                f.close()


def test_a_started_node_has_loaded_its_decompressor_before_the_first_release(tmp_path) -> None:
    """The first release to 8 nodes got slower than before milestone 3: each node's front
    imported blosc2 (~0.4 CPU-s) on the first chunk of its first release, inside the rollout,
    all nodes at once. A started node loads it while it starts (its shared library is mapped
    before any release is published)."""
    from tests.helpers import wait_until
    from zmqmodels import Hub
    from zmqmodels.release.store import Store

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "store")) as hub:
        node = subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--model", "probe", "--hub",
                                 hub.address, "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                                 "--cache", str(tmp_path / "cache")], env=env, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: any(n.model == "probe" for n in hub.status().nodes), 120, interval=0.2,
                       what="the node reporting")

            def mapped() -> bool:
                with open(f"/proc/{node.pid}/maps") as f:
                    return "blosc2" in f.read()

            wait_until(mapped, 30, interval=0.1, what="blosc2 loaded by the node's front")
            assert hub.status().models == []  # nothing was published
        finally:
            node.terminate()
            node.wait(30)
