"""Broadcast with real subscriber processes on loopback tcp and ipc."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import zmq

from tests.fleet import ROOT, Proc, subscriber
from tests.helpers import raw_release, wait_until
from zmqmodels import protocol as P
from zmqmodels.clients.hub import HubClient
from zmqmodels.errors import RemoteError
from zmqmodels.hub.hub import Hub
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def test_four_processes_receive_the_same_release_bit_identically(tmp_path, procs) -> None:
    data = os.urandom(12 << 20)
    with Hub("tcp://127.0.0.1:0", Store(tmp_path)) as hub:
        procs += [subscriber(hub.address, "m", node_id=f"n{i}") for i in range(4)]
        for p in procs:
            p.wait_event(event="started")
        wait_until(lambda: len(hub.status().nodes) == 4, 30, what="4 nodes reporting")
        m = hub.publish(raw_release("m", data, chunk_bytes=1 << 20))
        ok, status = hub.wait_for("m", m.seq, 4, timeout=60)
        assert ok, status
        want = hashlib.sha256(data).hexdigest()
        for p in procs:
            e = p.wait_event(event="release", seq=m.seq)
            assert (e["sha256"], e["bytes"]) == (want, len(data))


def test_late_joiner_catches_up_by_fetch_over_ipc(short_tmp, tmp_path, procs) -> None:
    data = os.urandom(5 << 20)
    with Hub(f"ipc://{short_tmp}/hub", Store(tmp_path)) as hub:
        m = hub.publish(raw_release("m", data, chunk_bytes=1 << 20))
        procs.append(subscriber(hub.address, "m"))
        e = procs[0].wait_event(event="release", seq=m.seq)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["stats"]["chunks_fetched"] == 5 and e["stats"].get("chunks_broadcast", 0) == 0


def test_tiny_rcvhwm_loses_chunks_and_still_completes(tmp_path, procs) -> None:
    data = os.urandom(24 << 20)
    with Hub("tcp://127.0.0.1:0", Store(tmp_path), sndhwm=2) as hub:
        procs.append(subscriber(hub.address, "m", rcvhwm=1))
        procs[0].wait_event(event="started")
        wait_until(lambda: hub.status().nodes, 30, what="the node reporting")
        m = hub.publish(raw_release("m", data, chunk_bytes=256 << 10))
        e = procs[0].wait_event(event="release", seq=m.seq, timeout=60)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["stats"]["chunks_fetched"] > 0  # what the HWM dropped came through the ROUTER
        assert e["stats"]["chunks_fetched"] + e["stats"].get("chunks_broadcast", 0) == 96


def test_chunk_corrupted_in_flight_is_fetched_again(tmp_path, procs) -> None:
    def corrupt(name, seq, index, payload):
        if index != 2:
            return payload
        bad = bytearray(payload)
        bad[100] ^= 0xFF
        return bytes(bad)

    data = os.urandom(6 << 20)
    with Hub("tcp://127.0.0.1:0", Store(tmp_path), fault=corrupt) as hub:
        procs.append(subscriber(hub.address, "m"))
        procs[0].wait_event(event="started")
        wait_until(lambda: hub.status().nodes, 30, what="the node reporting")
        m = hub.publish(raw_release("m", data, chunk_bytes=1 << 20))
        e = procs[0].wait_event(event="release", seq=m.seq)
        assert e["sha256"] == hashlib.sha256(data).hexdigest()
        assert e["stats"]["chunk_corrupt"] == 1 and e["stats"]["chunks_fetched"] >= 1


def test_restarted_hub_keeps_seq_and_serves_stored_releases(tmp_path, procs) -> None:
    store = tmp_path / "store"
    with Hub("tcp://127.0.0.1:0", Store(store)) as hub:
        hub.publish(raw_release("m", b"one" * 1000))
        second = hub.publish(raw_release("m", b"two" * 1000, label="v2"))
    assert second.seq == 2
    with Hub("tcp://127.0.0.1:0", Store(store)) as hub:
        procs.append(subscriber(hub.address, "m"))
        e = procs[0].wait_event(event="release")
        assert (e["seq"], e["label"], e["sha256"]) == (2, "v2", second.archive_sha256)
        assert hub.publish(raw_release("m", b"three")).seq == 3


def test_two_models_never_cross(tmp_path, procs) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path)) as hub:
        procs += [subscriber(hub.address, "ab"), subscriber(hub.address, "abc")]
        for p in procs:
            p.wait_event(event="started")
        wait_until(lambda: len(hub.status().nodes) == 2, 30, what="2 nodes reporting")
        abc = hub.publish(raw_release("abc", b"C" * 50_000))
        ab = hub.publish(raw_release("ab", b"A" * 50_000))
        assert hub.wait_for("ab", ab.seq, 1, 30)[0] and hub.wait_for("abc", abc.seq, 1, 30)[0]
        e_ab = procs[0].wait_event(event="release")
        e_abc = procs[1].wait_event(event="release")
        assert e_ab["name"] == "ab" and e_ab["sha256"] == ab.archive_sha256
        assert e_abc["name"] == "abc" and e_abc["sha256"] == abc.archive_sha256
        hub.publish(raw_release("abc", b"D" * 50_000))
        procs[1].wait_event(event="release", seq=2)
        assert all(e["name"] == "ab" for e in procs[0].seen if e["event"] == "release")
        assert "dropped_error" not in procs[0].seen[-1]["stats"]


def test_publish_wait_for_fails_when_too_few_nodes_report(tmp_path, procs) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "store")) as hub:
        procs.append(subscriber(hub.address, "lenet", load=True))
        procs[0].wait_event(event="started")
        cli = [sys.executable, "-m", "zmqmodels", "publish", "tests.models:make_lenet",
               "--name", "lenet", "--hub", hub.address, "--json"]
        env = {**os.environ, "PYTHONPATH": ROOT}
        ok = subprocess.run([*cli, "--label", "v1", "--wait-for", "1", "--timeout", "60"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert '"serving": 1' in ok.stdout
        short = subprocess.run([*cli, "--label", "v2", "--wait-for", "2", "--timeout", "3"],
                               capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert short.returncode == 1, short.stderr
        assert '"ok": false' in short.stdout and '"serving": 1' in short.stdout
        status = subprocess.run([sys.executable, "-m", "zmqmodels", "status", "--hub", hub.address],
                                capture_output=True, text=True, timeout=60, env=env)
        assert status.returncode == 0 and "lenet" in status.stdout and "serving" in status.stdout


def test_rollback_rebroadcasts_old_content_under_a_new_seq(tmp_path, procs) -> None:
    with Hub("tcp://127.0.0.1:0", Store(tmp_path)) as hub:
        v1 = hub.publish(raw_release("m", b"1" * 10_000, label="v1"))
        hub.publish(raw_release("m", b"2" * 10_000, label="v2"))
        procs.append(subscriber(hub.address, "m"))
        procs[0].wait_event(event="release", seq=2)
        back = HubClient(hub.address).rollback("m", "v1")
        assert back.seq == 3 and back.sha256 == v1.archive_sha256
        e = procs[0].wait_event(event="release", seq=3)
        assert e["sha256"] == v1.archive_sha256
        with pytest.raises(RemoteError, match="no stored release"):
            HubClient(hub.address).rollback("m", "v9")


def test_hub_answers_bad_requests_and_keeps_running(tmp_path) -> None:
    ctx = zmq.Context.instance()
    with Hub("tcp://127.0.0.1:0", Store(tmp_path)) as hub:
        hub.publish(raw_release("m", b"x" * 1000))
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(hub.address)

        def ask(*frames: bytes) -> P.ErrorReply:
            s.send_multipart(list(frames))
            assert s.poll(5000), "hub did not answer"
            reply = s.recv_multipart()
            assert reply[0] == b"ERROR", reply
            return P.decode_header(b"ERROR", reply[1])

        try:
            assert ask(b"FETCH_CHUNKS").code == "bad_message"
            assert ask(b"NOPE", b"\x80").code == "bad_message"
            assert ask(b"FETCH_MANIFEST", b"\xc1garbage").code == "bad_message"
            err = ask(b"FETCH_CHUNKS", P.encode(P.FetchChunks("m", 99, [0])))
            assert (err.code, err.seq) == ("not_found", 99)
            assert ask(b"FETCH_CHUNKS", P.encode(P.FetchChunks("m", 1, [5]))).code == "bad_message"
            assert ask(b"FETCH_CHUNKS", P.encode(P.FetchChunks("m", 1, list(range(100))))).code == \
                "too_large"
            assert ask(b"FETCH_MANIFEST", P.encode(P.FetchManifest("nope"))).code == "not_found"
            assert ask(b"PUBLISH", P.encode(P.Publish()), b"not a manifest").code == "bad_release"
            assert ask(b"REPORT", P.encode(P.Report("n", "m", "dancing"))).code == "bad_message"
        finally:
            s.close()
        assert HubClient(hub.address).status().models[0].name == "m"
        assert hub.stats["error_bad_message"] >= 5


def test_hub_refuses_more_concurrent_store_jobs_than_its_limit(tmp_path) -> None:
    import threading

    from zmqmodels.defaults import Limits

    big = raw_release("m", os.urandom(64 << 20), chunk_bytes=4 << 20)
    with Hub("tcp://127.0.0.1:0", Store(tmp_path), limits=Limits(max_store_jobs=1)) as hub:
        results: list[object] = []

        def send() -> None:
            try:
                results.append(HubClient(hub.address, timeout=60).publish(big))
            except RemoteError as exc:
                results.append(exc)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        busy = [r for r in results if isinstance(r, RemoteError)]
        assert len(results) == 4 and busy and all(e.code == "busy" and e.retryable for e in busy)
        assert len(busy) < 4  # the first one was stored


def test_fleet_table_is_bounded_against_invented_node_ids(tmp_path) -> None:
    from zmqmodels.defaults import Limits

    ctx = zmq.Context.instance()
    with Hub("tcp://127.0.0.1:0", Store(tmp_path), limits=Limits(max_fleet_entries=5)) as hub:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(hub.address)
        try:
            for i in range(20):
                s.send_multipart([b"REPORT", P.encode(P.Report(f"n{i}", "m", "idle"))])
            wait_until(lambda: hub.stats["fleet_evicted"] == 15, 10, what="evictions")
        finally:
            s.close()
        nodes = [n.node for n in hub.status().nodes]
        assert nodes == [f"n{i}" for i in range(15, 20)]  # the newest five stay
