"""Clients across several nodes (the Freelance pattern) and clients that fail fast and say why."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.fleet import ROOT
from tests.helpers import free_port, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import AsyncClient, Client, Hub, Node, RemoteError, build_release, compile_model
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(300)
X = np.ones((1, 4), np.float32)


def _cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "zmqmodels", *args], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    return out, time.monotonic() - t0


def _serve(hub: str, port: int, cache) -> subprocess.Popen:  # noqa: ANN001
    return subprocess.Popen([sys.executable, "-m", "zmqmodels", "serve", "--hub", hub, "--model", "probe",
                             "--bind", f"tcp://127.0.0.1:{port}", "--workers", "1", "--cache", str(cache)],
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(10)


def test_a_port_nobody_listens_on_is_named_at_once() -> None:
    """Milestone 3: `infer --server` at a dead address printed `attempt 1 of 4: no reply …:
    1 attempt(s) of 5s each, 5.0s in all; retrying` and ended after 20.4 s."""
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(Exception, match="connection refused") as err, \
            Client(f"tcp://127.0.0.1:{port}", arrays="numpy") as c:
        c.infer("m", X)
    assert time.monotonic() - t0 < 3.0
    assert "4 attempts (to tcp://" in str(err.value)
    out, took = _cli("infer", "--server", f"tcp://127.0.0.1:{port}", "--model", "m", "--input", "1x4")
    assert out.returncode == 1 and took < 15, (took, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert lines[0] == ("attempt 1 of 4: connection refused (nothing listens there?) from "
                        f"tcp://127.0.0.1:{port}; retrying"), lines
    assert "4 attempts (to tcp://127.0.0.1:" in lines[-1] and "of at most 5s each" in lines[-1], lines


def test_a_client_pointed_at_a_hub_is_told_at_once(tmp_path) -> None:
    """Milestone 3: pointed at a hub's port a client just timed out, with no hint it was a hub."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s")) as hub:
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match="is a zmqmodels hub, not a node") as err, \
                Client(hub.address, arrays="numpy") as c:
            c.infer("m", X)
        assert err.value.code == "wrong_peer" and time.monotonic() - t0 < 2.0

        async def ask() -> None:
            async with AsyncClient(hub.address, arrays="numpy") as c:
                await c.infer("m", X)
        with pytest.raises(RemoteError, match="wrong_peer"):
            asyncio.run(asyncio.wait_for(ask(), 10))
        out, _ = _cli("infer", "--server", hub.address, "--model", "m", "--input", "1x4")
        assert out.returncode == 1 and "is a zmqmodels hub, not a node" in out.stderr, out.stderr


def test_a_node_killed_under_three_node_clients_costs_retries_not_failures(tmp_path) -> None:
    """A node killed -9 under clients that list three nodes: 0 failed requests (sync and
    pipelined), only retries; restarted, it takes load again."""
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s"), heartbeat_interval_s=0.25) as hub:
        v1 = hub.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        ports = [free_port() for _ in range(3)]
        nodes = [_serve(hub.address, p, tmp_path / f"c{i}") for i, p in enumerate(ports)]
        addresses = [f"tcp://127.0.0.1:{p}" for p in ports]
        try:
            assert hub.wait_for("probe", v1.seq, 3, 120)[0]
            served: list[str] = []
            errors: list[BaseException] = []
            retried = [0]
            stop = threading.Event()

            def ask() -> None:
                with Client(addresses, timeout=5.0, retries=6, arrays="numpy") as c:
                    while not stop.is_set():
                        try:
                            r = c.infer("probe", X)
                            served.append(r.node)
                            retried[0] += r.attempts > 1
                        except Exception as exc:  # noqa: BLE001 - every failure is counted
                            errors.append(exc)

            async def pipelined() -> int:
                async with AsyncClient(addresses, timeout=5.0, retries=6, arrays="numpy") as c:
                    done = 0
                    while not stop.is_set():
                        got = await c.infer_many("probe", [X] * 16, in_flight=8, return_exceptions=True)
                        errors.extend(r for r in got if isinstance(r, BaseException))
                        served.extend(r.node for r in got if not isinstance(r, BaseException))
                        retried[0] += sum(r.attempts > 1 for r in got if not isinstance(r, BaseException))
                        done += len(got)
                    return done

            sync = threading.Thread(target=ask)
            sync.start()
            box: list[int] = []
            aio = threading.Thread(target=lambda: box.append(asyncio.run(pipelined())))
            aio.start()
            wait_until(lambda: len(set(served)) == 3, 60, what="every node answering")
            _kill(nodes[1])
            n = len(served)
            wait_until(lambda: len(served) > n + 50, 60, what="requests after the kill")
            nodes[1] = _serve(hub.address, ports[1], tmp_path / "c1")
            assert hub.wait_for("probe", v1.seq, 3, 120)[0]
            n = len(served)
            wait_until(lambda: addresses[1] in served[n:], 90, interval=0.1,
                       what="the node taking load again")
            stop.set()
            sync.join(60)
            aio.join(60)
            assert errors == [], errors[:3]
            assert retried[0] >= 1, "no request was retried"
            assert box and box[0] > 0, box
        finally:
            for p in nodes:
                _kill(p)


def test_a_pinned_seq_goes_only_to_nodes_that_hold_it(tmp_path) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "a")) as old, \
            Hub("tcp://127.0.0.1:0", Store(tmp_path / "b")) as new:
        old.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        new.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        v2 = new.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "v2"))
        a = Node(old.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "ca").start()
        b = Node(new.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "cb").start()
        try:
            assert old.wait_for("probe", 1, 1, 60)[0] and new.wait_for("probe", v2.seq, 1, 60)[0]
            with Client([a.address, b.address], arrays="numpy") as c:
                got = [c.infer("probe", X, seq=v2.seq) for _ in range(10)]
            assert {(r.node, r.seq, r.label) for r in got} == {(b.address, v2.seq, "v2")}
        finally:
            a.close()
            b.close()


def test_a_gateway_over_two_nodes_stays_ready_and_answers_when_one_stops(tmp_path) -> None:
    from zmqmodels.oip.gateway import Gateway

    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "s")) as hub:
        v1 = hub.publish(build_release(compile_model(Probe(1.0), probe_examples()), "probe", "v1"))
        nodes = [Node(hub.address, ["probe"], "tcp://127.0.0.1:0", workers=1,
                      cache=tmp_path / f"c{i}").start() for i in range(2)]
        try:
            assert hub.wait_for("probe", v1.seq, 2, 60)[0]
            with Gateway([n.address for n in nodes], http="127.0.0.1:0", down_after_s=1.0,
                         poll_s=0.2) as gw:
                base = f"http://127.0.0.1:{gw.http_port}"
                body = json.dumps({"inputs": [{"name": "INPUT__0", "shape": [1, 4], "datatype": "FP32",
                                               "data": [1, 1, 1, 1]}]}).encode()

                def status(path: str, data: bytes | None = None) -> int:
                    try:
                        return urllib.request.urlopen(urllib.request.Request(base + path, data=data),
                                                      timeout=30).status
                    except urllib.error.HTTPError as exc:
                        return exc.code
                wait_until(lambda: status("/v2/health/ready") == 200, 30, what="the gateway ready")
                assert status("/v2/models/probe/infer", body) == 200
                nodes[0].close()
                time.sleep(1.5)  # past down_after_s: the gateway has seen it go
                assert status("/v2/health/ready") == 200
                assert all(status("/v2/models/probe/infer", body) == 200 for _ in range(10))
                nodes[1].close()
                wait_until(lambda: status("/v2/health/ready") == 503, 30, what="not ready with no node")
        finally:
            for n in nodes:
                n.close()
