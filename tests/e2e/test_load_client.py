"""The native load generator (``cpp/build/zmqmodels-load``) against real servers: a Python node
answers everything it sends (outputs checked by the node's protocol, replies matched by id),
and a wrong address or peer is one clear line, not a silent table (issue 31: the benchmarks'
own Python clients capped what they could show)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.helpers import built_binary, free_port
from tests.models import Rows
from zmqmodels import Node, build_release, compile_model

pytestmark = pytest.mark.timeout(240)


def load_binary():
    node = built_binary()  # also: every source older than the build
    if node is None:
        pytest.skip("the C++ tools are not built: scripts/test builds them first (or run scripts/build_cpp)")
    load = node.parent / "zmqmodels-load"
    assert load.exists(), "scripts/build_cpp builds zmqmodels-load beside the node"
    return load


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(load_binary()), *args], capture_output=True, text=True, timeout=timeout)


def test_the_native_client_keeps_many_in_flight_and_every_request_is_answered(hub, tmp_path) -> None:
    rows_v1 = build_release(compile_model(Rows(2.0), [torch.ones(1, 4), torch.ones(2, 4)]), "rows", "v1")
    m = hub.publish(rows_v1)
    with Node(hub.address, ["rows"], "tcp://127.0.0.1:0", workers=2, cache=tmp_path / "c") as node:
        assert hub.wait_for("rows", m.seq, 1, 120)[0]
        out = tmp_path / "rows.json"
        p = run("--connect", node.address, "--model", "rows", "--shape", "1,4", "--inflight", "48",
                "--sockets", "3", "--seconds", "1.5", "--out", str(out))
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["failures"] == 0 and summary["errors"] == {}
    assert summary["requests"] > 48 and summary["req_s"] > 0 and summary["p99_ms"] >= summary["p50_ms"] > 0
    assert summary["batch"] > 1  # 48 in flight on two workers: the node joined them
    assert sum(int(size) * n for size, n in summary["forwards"].items()) <= summary["requests"]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == summary["requests"] and all(lat > 0 and batch >= 1 for _, lat, batch in rows)


def test_a_wrong_port_a_wrong_peer_and_a_wrong_model_are_each_one_line(hub, tmp_path) -> None:
    nobody = f"tcp://127.0.0.1:{free_port()}"
    p = run("--connect", nobody, "--model", "rows", "--connect-timeout", "1")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == f"zmqmodels-load: error: no reply from {nobody} within 1s: is a zmqmodels " \
                               "node serving there?"
    p = run("--connect", hub.address, "--model", "rows", "--connect-timeout", "10")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith(f"zmqmodels-load: error: {hub.address} answered wrong_peer: this address is a "
                               "zmqmodels hub, not a node"), p.stderr
    with Node(hub.address, ["rows"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c") as node:
        p = run("--connect", node.address, "--model", "nope", "--connect-timeout", "30")
    assert p.returncode == 1 and "answered unknown_model: this node serves ['rows'], not 'nope'" in p.stderr
    p = run("--connect", nobody, "--model", "rows", "--inflight", "zero")
    assert p.returncode == 1 and p.stderr.strip() == "zmqmodels-load: error: --inflight zero: not a number"
