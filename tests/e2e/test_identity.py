"""A node's identity in the hub's table: stable across restarts by default, and a clean stop
said as `stopped` (never left to go `lost`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.fleet import ROOT
from tests.helpers import free_port, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Hub, Subscriber, build_release, compile_model
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(240)


def _serve(hub: str, cache: Path, port: int) -> subprocess.Popen:
    """`zmqmodels serve` with no --node-id."""
    return subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub, "--model", "probe",
                             "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--cache", str(cache)],
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _rows(hub: Hub) -> list[tuple[str, str, int]]:
    return sorted((n.node, n.state, n.seq) for n in hub.status().nodes)


def test_a_restarted_node_keeps_its_row_and_a_sigterm_says_stopped(tmp_path) -> None:
    """Milestone 3: a node restarted on the same port and cache came back as a new row while the
    old one stayed `lost` for 600 s (and was listed under every later --wait-for failure); a
    node stopped with SIGTERM showed as `lost`, not stopped."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s"), heartbeat_interval_s=0.25,
             lost_after_s=2.0) as hub:
        v1 = hub.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        port, cache = free_port(), tmp_path / "cache"
        node = _serve(hub.address, cache, port)
        try:
            assert hub.wait_for("probe", v1.seq, 1, 90)[0]
            (first,) = {r[0] for r in _rows(hub)}
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(10)
            node = _serve(hub.address, cache, port)
            wait_until(lambda: _rows(hub) == [(first, "serving", v1.seq)], 90, interval=0.2,
                       what="the restarted node in its old row")
            time.sleep(2.5)  # past lost_after_s: no second, lost row appears
            rows = _rows(hub)  # (a worker restarted on a loaded machine may show idle a moment)
            assert [r[0] for r in rows] == [first] and rows[0][1] != "lost", rows
            node.send_signal(signal.SIGTERM)
            node.wait(60)
            wait_until(lambda: _rows(hub) == [(first, "stopped", v1.seq)], 30, what="the row stopped")
            time.sleep(2.5)
            assert _rows(hub) == [(first, "stopped", v1.seq)]  # not lost
            assert not hub.wait_for("probe", v1.seq, 1, 0.1)[0]  # a stopped node never counts
        finally:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(10)


def test_an_embedded_subscriber_in_a_short_script_leaves_a_stopped_row(tmp_path) -> None:
    """Milestone 3: an embedded Subscriber in a short script left a `lost` row behind."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s"), heartbeat_interval_s=0.25, lost_after_s=1.0) as hub:
        v1 = hub.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        with Subscriber(hub.address, ["probe"], cache=tmp_path / "c") as sub:
            wait_until(lambda: sub.model("probe") is not None, 60, what="the model loaded")
            node_id = sub.node_id
        wait_until(lambda: [(r[0], r[1]) for r in _rows(hub)] == [(node_id, "stopped")], 10,
                   what="a stopped row")
        time.sleep(1.5)
        assert [(r[0], r[1]) for r in _rows(hub)] == [(node_id, "stopped")]
        assert v1.seq


def test_the_cpp_node_says_stopped_and_keeps_its_id_across_restarts(binary, tmp_path) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s"), heartbeat_interval_s=0.25, lost_after_s=1.0) as hub:
        v1 = hub.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        ids = []
        for _ in range(2):
            node = subprocess.Popen([str(binary), "--hub", hub.address, "--bind",
                                     f"tcp://127.0.0.1:{free_port()}", "--cache", str(tmp_path / "cache"),
                                     "--model", "probe"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                assert hub.wait_for("probe", v1.seq, 1, 90)[0]
                ids.append(next(n.node for n in hub.status().nodes if n.state == "serving"))
            finally:
                node.send_signal(signal.SIGTERM)
                node.wait(30)
            wait_until(lambda: [r[1] for r in _rows(hub)] == ["stopped"], 10, what="the C++ node stopped")
        assert ids[0] == ids[1] and len(_rows(hub)) == 1


def test_the_docs_systemd_and_kubernetes_examples_set_the_node_id() -> None:
    """Milestone 3: `--node-id` existed but no doc or example used it."""
    ops = (Path(ROOT) / "docs" / "operations.md").read_text()
    starts = re.findall(r"^ExecStart=.* serve .*(?:\n .*)*", ops, re.M)
    assert starts and all("--node-id" in s for s in starts), starts
    blocks = re.findall(r"```yaml\n(.*?)```", ops, re.S)
    manifests = [d for b in blocks for d in yaml.safe_load_all(b) if d]
    containers = [c for d in manifests if d.get("kind") in ("StatefulSet", "Deployment", "DaemonSet")
                  for c in d["spec"]["template"]["spec"]["containers"]]
    serving = [c for c in containers if "serve" in (c.get("args") or c.get("command") or [])]
    assert serving and all("--node-id" in (c.get("args") or c.get("command")) for c in serving), serving
