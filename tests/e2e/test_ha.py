"""Hubs that stand in for each other on one S3 bucket: real hub processes, a real S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.fleet import ROOT
from tests.helpers import free_port_pair, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Client, HubClient, Node, RemoteError, build_release, compile_model
from zmqmodels.errors import DeadlineError

pytestmark = pytest.mark.timeout(300)


class HubProcess:
    def __init__(self, store: str, tmp_path) -> None:  # noqa: ANN001
        self.address = f"tcp://127.0.0.1:{free_port_pair()}"
        self.log = open(tmp_path / f"hub-{self.address.rsplit(':', 1)[1]}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "zmqmodels", "hub", "--bind", self.address,
                                      "--store", store, "--heartbeat", "0.25"],
                                     env={**os.environ, "PYTHONPATH": ROOT}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._up, 60, interval=0.2, what=f"hub {self.address} answering")

    def _up(self) -> bool:
        try:
            HubClient(self.address, timeout=1).status()
            return True
        except (DeadlineError, RemoteError):
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def _asker(addresses: list[str], failures: list[BaseException], stop: threading.Event) -> threading.Thread:
    """A thread inferring back to back through ``addresses`` until ``stop``; every failure kept."""
    def ask() -> None:
        with Client(addresses, timeout=10, retries=5) as c:
            while not stop.is_set():
                try:
                    c.infer("probe", torch.ones(1, 4))
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(exc)
    return threading.Thread(target=ask)


def _probe(scale: float, label: str, ballast_mb: int = 0):  # noqa: ANN202
    return build_release(compile_model(Probe(scale, ballast_mb), probe_examples()), "probe", label,
                         codec="none")


def test_a_hub_killed_mid_broadcast_the_other_completes_it_with_no_failed_request(s3server, tmp_path) -> None:
    """kill -9 the hub that published, mid-broadcast: the other hub on the bucket serves the
    release to the node (which follows both) within its store poll; inference never fails;
    a client listing both hubs keeps working."""
    url = s3server.url()
    a, b = HubProcess(url, tmp_path), HubProcess(url, tmp_path)
    node = Node([a.address, b.address], ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c",
                node_id="n").start()
    failures: list[BaseException] = []
    stop = threading.Event()
    asker = _asker([node.address], failures, stop)
    try:
        both = HubClient([a.address, b.address], timeout=30)
        v1 = HubClient(a.address, timeout=60).publish(_probe(1.0, "v1"))
        assert both.wait_for("probe", v1.seq, 1, 90)[0]
        assert HubClient(b.address).wait_for("probe", v1.seq, 1, 30)[0]  # reports reach both hubs
        asker.start()
        big = _probe(2.0, "v2", ballast_mb=200)
        def send() -> None:
            try:
                HubClient(a.address, timeout=120).publish(big)
            except (DeadlineError, RemoteError):
                pass  # its hub is killed before it answers
        sent = threading.Thread(target=send)
        sent.start()
        wait_until(lambda: any(n.state == "receiving" and n.seq == v1.seq + 1
                               for n in HubClient(b.address, timeout=5).status().nodes),
                   120, interval=0.002, what="the node receiving v2")
        a.kill()
        sent.join(30)
        ok, status = HubClient([a.address, b.address], timeout=10).wait_for("probe", v1.seq + 1, 1, 120)
        assert ok, status
        stop.set()
        asker.join(60)
        assert failures == [], failures[:3]
        assert [r.seq for r in both.releases("probe")] == [v1.seq, v1.seq + 1]  # a's address is dead
    finally:
        stop.set()
        node.close()
        a.kill()
        b.kill()


def test_two_hubs_publishing_at_once_never_share_a_seq_and_agree(s3server, tmp_path) -> None:
    """Publishes of one model sent to two hubs at the same moment, many times: every release
    gets a distinct seq or a one-line retryable refusal; the node ends on the highest;
    `releases` agrees on both hubs."""
    url = s3server.url()
    a, b = HubProcess(url, tmp_path), HubProcess(url, tmp_path)
    node = Node([a.address, b.address], ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c",
                node_id="n").start()
    module = compile_model(Probe(1.0), probe_examples())
    try:
        seqs: list[int] = []
        refused: list[str] = []
        for round_ in range(8):
            gate = threading.Barrier(2)

            def publish(hub: HubProcess, tag: str, round_: int = round_,
                        gate: threading.Barrier = gate) -> None:
                release = build_release(module, "probe", f"r{round_}{tag}")
                gate.wait(30)
                try:
                    seqs.append(HubClient(hub.address, timeout=60).publish(release, rebase=False).seq)
                except RemoteError as exc:
                    assert "\n" not in str(exc)
                    refused.append(str(exc))
            threads = [threading.Thread(target=publish, args=(h, t)) for h, t in ((a, "a"), (b, "b"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert len(seqs) == len(set(seqs)) and len(seqs) + len(refused) == 16, (seqs, refused)
        assert all("reserve a new seq" in r or "try again" in r for r in refused), refused
        top = max(seqs)
        ok, status = HubClient(b.address).wait_for("probe", top, 1, 120)
        assert ok, status
        wait_until(lambda: HubClient(a.address).releases("probe") == HubClient(b.address).releases("probe"),
                   30, interval=0.5, what="both hubs listing the same releases")
        assert max(r.seq for r in HubClient(a.address).releases("probe")) == top
    finally:
        node.close()
        a.kill()
        b.kill()


def test_a_hub_killed_mid_wave_another_halts_the_rollout_within_its_lease(s3server, tmp_path) -> None:
    """kill -9 the hub driving a rollout in waves: another hub on the bucket takes its lease
    over once it runs out and halts the rollout with the reason, rolling back the nodes that
    served it; no inference request fails."""
    from zmqmodels import protocol as P
    from zmqmodels.defaults import STORE_POLL_S, WAVE_LEASE_S

    url = s3server.url()
    a, b = HubProcess(url, tmp_path), HubProcess(url, tmp_path)
    nodes = [Node([a.address, b.address], ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / f"c{i}",
                  node_id=f"n{i}").start() for i in range(2)]
    failures: list[BaseException] = []
    stop = threading.Event()
    asker = _asker([n.address for n in nodes], failures, stop)
    try:
        v1 = HubClient(a.address, timeout=60).publish(_probe(1.0, "v1"))
        assert HubClient(b.address).wait_for("probe", v1.seq, 2, 90)[0]
        asker.start()
        v2 = HubClient(a.address, timeout=60).publish(_probe(2.0, "v2"),
                                                      plan=P.WavePlan(["1", "100%"], wave_wait_s=120))
        assert HubClient(b.address).wait_for("probe", v2.seq, 1, 90)[0]  # the first wave serves it
        a.kill()
        killed = time.monotonic()

        def halted() -> P.WaveStatus | None:
            st = HubClient(b.address, timeout=5).status()
            return next((w for w in st.rollouts if w.seq == v2.seq and w.state == "halted"), None)
        wait_until(lambda: halted() is not None, WAVE_LEASE_S + 30, interval=0.2, what="the rollout halted")
        took = time.monotonic() - killed
        wave = halted()
        assert "stopped renewing its lease" in wave.reason, wave
        assert took < WAVE_LEASE_S + 10 * STORE_POLL_S + 10, took
        back = HubClient(b.address).releases("probe")[-1]
        assert back.rollback_of == v1.seq
        ok, status = HubClient(b.address).wait_for("probe", back.seq, 2, 90)
        assert ok, status
        stop.set()
        asker.join(60)
        assert failures == [], failures[:3]
    finally:
        stop.set()
        for n in nodes:
            n.close()
        a.kill()
        b.kill()
