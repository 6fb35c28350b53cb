"""Rollouts on real node processes under saturation and faults (milestone 1's fleet bugs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.helpers import wait_until
from tests.models import Heavy, Probe, probe_examples
from zmqmodels import Client, Node, build_release, compile_model
from zmqmodels.errors import DeadlineError

pytestmark = pytest.mark.timeout(300)
HEAVY_EXAMPLES = [torch.ones(1, 4), torch.full((1, 4), 0.5)]


@pytest.fixture(scope="module")
def heavy_releases():
    torch.manual_seed(0)
    return {s: build_release(compile_model(Heavy(s), HEAVY_EXAMPLES), "heavy", f"x{s:g}") for s in (2.0, 3.0)}


@pytest.mark.parametrize(("workers", "device"), [(1, "cpu"), (2, "cpu"),
                                                 pytest.param(1, "cuda:0", marks=pytest.mark.cuda)])
def test_saturated_node_rolls_out_with_no_failures_and_no_step_back(hub, tmp_path, heavy_releases,
                                                                   workers, device) -> None:
    """Milestone 1: with more clients than workers a 100 MB release sat in `loading` for a
    minute (K=2) or forever (K=1), and replies stepped back from v2 to v1."""
    node = Node(hub.address, ["heavy"], "tcp://127.0.0.1:0", workers=workers, devices=[device],
                cache=tmp_path / "cache").start()
    try:
        first = hub.publish(heavy_releases[2.0])
        ok, status = hub.wait_for("heavy", first.seq, 1, 120)
        assert ok, status
        stop = threading.Event()
        errors: list[BaseException] = []
        seen: list[list[int]] = [[] for _ in range(4)]
        depth: list[int] = []

        def client(i: int) -> None:
            x = torch.full((1, 4), 1.0 + i)
            with Client(node.address, timeout=30, retries=0) as c:
                while not stop.is_set():
                    try:
                        r = c.infer("heavy", x)
                        scale = 2.0 if r.seq == first.seq else 3.0
                        assert torch.equal(r.outputs, x * scale), (r.seq, r.outputs)
                        seen[i].append(r.seq)
                    except BaseException as exc:  # asserted below
                        errors.append(exc)
                        return

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: depth.append(len(node.broker.pending)) or max(depth) > 0, 30,
                       what="a queue: the node saturated")
            second = hub.publish(heavy_releases[3.0])
            ok, status = hub.wait_for("heavy", second.seq, 1, 60)
            assert ok, status
            wait_until(lambda: all(s and s[-1] == second.seq for s in seen), 30,
                       what="every client on the new release")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert errors == []
        for s in seen:
            new = s.index(second.seq)
            assert set(s[new:]) == {second.seq}, "a client saw the version step back"
    finally:
        node.close()


def test_request_whose_client_gave_up_is_dropped_not_served(hub, tmp_path) -> None:
    node = Node(hub.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "cache").start()
    try:
        m = hub.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "a"))
        assert hub.wait_for("probe", m.seq, 1, 60)[0]
        def slow_call() -> None:
            with Client(node.address, timeout=30) as c:
                c.infer("probe", torch.tensor([[-2.0, 0, 0, 0]]))

        slow = threading.Thread(target=slow_call)
        slow.start()  # the only worker is busy for about a second
        wait_until(lambda: any(w.busy for w in node.broker.workers.values()), 10, what="the slow request")
        replies = node.stats["replies"]
        with pytest.raises(DeadlineError), Client(node.address, timeout=0.2, retries=0) as c:
            c.infer("probe", torch.ones(1, 4))
        slow.join(30)
        wait_until(lambda: node.stats["expired"] >= 1, 10, what="the expired request dropped")
        time.sleep(0.2)
        assert node.stats["replies"] == replies + 1  # the slow one only: the other never ran
    finally:
        node.close()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_node_paused_and_resumed_keeps_its_healthy_worker(hub, tmp_path) -> None:
    """Milestone 1: SIGSTOP/SIGCONT of a node killed its healthy worker on resume."""
    m = hub.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "a"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "node.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub.address,
                             "--model", "probe", "--bind", "tcp://127.0.0.1:0", "--workers", "1",
                             "--cache", str(tmp_path / "cache")], env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    try:
        assert hub.wait_for("probe", m.seq, 1, 60)[0]
        workers = wait_until(lambda: _children(proc.pid), 10, what="the worker process")
        for pid in [proc.pid, *workers]:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(7.0)  # longer than the idle worker's 5 s TTL
        os.kill(proc.pid, signal.SIGCONT)  # the front first: it sees the silence first
        time.sleep(0.3)
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        time.sleep(2.5)  # several ticks and heartbeats
        assert _children(proc.pid) == workers, (tmp_path / "node.log").read_text()[-2000:]
        row = next(n for n in hub.status().nodes if n.model == "probe")
        assert row.state == "serving" and row.seq == m.seq
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
