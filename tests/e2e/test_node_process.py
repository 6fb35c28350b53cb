"""A whole node as a process (`zmqmodels serve`): crash mid-download, restart from cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.fleet import ROOT
from tests.helpers import wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Client, Hub, RemoteError, build_release, compile_model
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(240)


def release(scale: float, label: str, ballast_mb: int = 0):
    return build_release(compile_model(Probe(scale, ballast_mb), probe_examples()), "probe", label,
                         codec="none")


def serve(hub: str, bind: str, cache: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub, "--model",
                             "probe", "--bind", bind, "--workers", "2", "--cache", cache,
                             "--node-id", "n1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def kill_tree(p: subprocess.Popen) -> None:
    """kill -9 the node and its workers (they are in its process group)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(10)


def infer_label(addr: str, timeout: float = 5) -> str:
    with Client(addr, timeout=timeout, retries=5) as c:
        return c.infer("probe", torch.ones(1, 4)).label


def test_node_killed_mid_download_restarts_from_cache_then_catches_up(short_tmp, tmp_path) -> None:
    hub_addr = f"ipc://{short_tmp}/hub"
    node_addr = f"ipc://{short_tmp}/node"
    cache = str(tmp_path / "cache")
    store = Store(tmp_path / "store")
    big = release(3.0, "v2", ballast_mb=400)
    node = serve(hub_addr, node_addr, cache)
    try:
        with Hub(hub_addr, store, sndhwm=8) as hub:
            v1 = hub.publish(release(2.0, "v1"))
            assert hub.wait_for("probe", v1.seq, 1, 90)[0]
            assert infer_label(node_addr) == "v1"
            v2 = hub.publish(big)
            wait_until(lambda: any(n.state == "receiving" and n.seq == v2.seq
                                   for n in hub.status().nodes), 30, interval=0.001,
                       what="the node receiving v2")
            kill_tree(node)
        # the hub is down now; the restarted node serves v1 from its cache at once
        node = serve(hub_addr, node_addr, cache)
        assert infer_label(node_addr, timeout=30) == "v1"
        with Hub(hub_addr, store) as hub:  # the hub comes back: the node catches up
            ok, status = hub.wait_for("probe", v2.seq, 1, 120)
            assert ok, status
        assert infer_label(node_addr) == "v2"
    finally:
        kill_tree(node)


def test_infer_cli_prints_outputs_and_version(short_tmp, tmp_path) -> None:
    hub_addr = f"ipc://{short_tmp}/hub"
    node_addr = f"ipc://{short_tmp}/node"
    node = serve(hub_addr, node_addr, str(tmp_path / "cache"))
    try:
        with Hub(hub_addr, Store(tmp_path / "store")) as hub:
            m = hub.publish(release(2.0, "v1"))
            assert hub.wait_for("probe", m.seq, 1, 90)[0]
            env = {**os.environ, "PYTHONPATH": ROOT}
            cli = [sys.executable, "-m", "zmqmodels", "infer", "--server", node_addr, "--model", "probe"]
            out = subprocess.run([*cli, "--input", "3x4", "--json"], capture_output=True, text=True,
                                 timeout=60, env=env)
            assert out.returncode == 0, out.stderr
            data = json.loads(out.stdout)
            assert (data["label"], data["seq"]) == ("v1", m.seq)
            assert data["outputs"]["shape"] == [3, 4] and data["worker"].startswith("n1/w")
            bad = subprocess.run([*cli, "--input", "4"], capture_output=True, text=True, timeout=60,
                                 env=env)
            assert bad.returncode == 1 and "bad_input" in bad.stderr
            assert len(bad.stderr.strip().splitlines()) == 1
            with pytest.raises(RemoteError, match="unknown_model"), Client(node_addr) as c:
                c.infer("other", torch.ones(1, 4))
    finally:
        kill_tree(node)
