"""Relays on real sockets: hub -> relay -> followers and nodes, chains, restarts, loops."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from tests.helpers import free_port_pair, raw_release, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Client, Hub, Node, Relay, build_release, compile_model
from zmqmodels.node.follower import Follower, FollowOptions
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(120)


def followers(addr: str, n: int, model: str = "m"):
    got: list[list[tuple[int, str]]] = [[] for _ in range(n)]
    lock = threading.Lock()

    def on(i):
        def cb(m, archive):
            with lock:
                got[i].append((m.seq, hashlib.sha256(archive).hexdigest()))
        return cb

    subs = [Follower(addr, [model], on_release=on(i), options=FollowOptions(node_id=f"f{i}")).start()
            for i in range(n)]
    return subs, got


def test_hub_relay_three_followers_receive_bit_identical_releases(hub, tmp_path) -> None:
    with Relay(hub.address, "tcp://127.0.0.1:0", tmp_path / "relay", ["m"], relay_id="r1") as relay:
        subs, got = followers(relay.address, 3)
        try:
            data = bytes(range(256)) * 4096 * 6  # 6 MiB: several chunks
            m = hub.publish(raw_release("m", data, chunk_bytes=1 << 20))
            want = hashlib.sha256(data).hexdigest()
            wait_until(lambda: all(g and g[-1] == (m.seq, want) for g in got), 30, what="all three")
            # the hub sent it once (to the relay), not once per follower
            assert relay.stats["chunks_broadcast"] + relay.stats["chunks_fetched"] == m.chunk_count
            # reports reach the root hub naming the relay
            wait_until(lambda: {n.node for n in hub.status().nodes if n.via == ["r1"]} >= {"f0", "f1", "f2"},
                       10, what="reports via the relay")
            # the relay stores it off its I/O thread: the followers may be done before that write
            stored = wait_until(lambda: Store(tmp_path / "relay").latest("m"), 30, what="the relay's store")
            assert stored.manifest.seq == m.seq
        finally:
            for s in subs:
                s.close()


def test_hub_relay_relay_node_serves(hub, tmp_path) -> None:
    with Relay(hub.address, "tcp://127.0.0.1:0", tmp_path / "r1", ["probe"], relay_id="r1") as r1, \
            Relay(r1.address, "tcp://127.0.0.1:0", tmp_path / "r2", ["probe"], relay_id="r2") as r2:
        node = Node(r2.address, ["probe"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / "c").start()
        try:
            m = hub.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "a"))
            ok, status = hub.wait_for("probe", m.seq, 1, 60)
            assert ok, status
            row = next(n for n in status.nodes if n.node == node.node_id)
            assert row.via == ["r2", "r1"]
            with Client(node.address, timeout=10) as c:
                assert torch.equal(c.infer("probe", torch.ones(1, 4)).outputs, torch.full((1, 4), 2.0))
        finally:
            node.close()


def test_follower_behind_a_relay_that_restarts_mid_release_completes(tmp_path, short_tmp) -> None:
    dropped = threading.Event()

    def fault(name, seq, index, payload):  # the hub's broadcast loses chunks 3.. once
        return payload if index < 3 or dropped.is_set() else b"x"

    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), fault=fault) as hub:
        # ipc: a restart rebinds the same address, and a TCP port pair in the ephemeral range
        # can be taken by an outgoing connection in between
        address = f"ipc://{short_tmp}/relay"
        relay = Relay(hub.address, address, tmp_path / "relay", ["m"], relay_id="r1").start()
        subs, got = followers(address, 1)
        try:
            data = bytes(range(256)) * 4096 * 8
            m = hub.publish(raw_release("m", data, chunk_bytes=1 << 20))
            relay.close()  # mid-release: it had chunks 0..2 and was repairing the rest
            dropped.set()
            relay = Relay(hub.address, address, tmp_path / "relay", ["m"], relay_id="r1").start()
            want = hashlib.sha256(data).hexdigest()
            wait_until(lambda: got[0] and got[0][-1] == (m.seq, want), 30, what="the follower completing")
        finally:
            for s in subs:
                s.close()
            relay.close()


def test_relay_serves_its_store_at_once_after_a_restart(hub, tmp_path) -> None:
    data = bytes(range(256)) * 4096 * 2
    with Relay(hub.address, "tcp://127.0.0.1:0", tmp_path / "relay", ["m"]) as relay:
        subs, got = followers(relay.address, 1)
        m = hub.publish(raw_release("m", data, chunk_bytes=1 << 20))
        wait_until(lambda: got[0], 30, what="the first delivery")
        subs[0].close()
        wait_until(lambda: Store(tmp_path / "relay").latest("m") is not None, 10, what="the relay's store")
    hub.close()  # no upstream now
    with Relay("tcp://127.0.0.1:1", "tcp://127.0.0.1:0", tmp_path / "relay", ["m"]) as again:
        subs, got = followers(again.address, 1)
        try:
            wait_until(lambda: got[0] and got[0][-1][0] == m.seq, 15, what="delivery from the store")
        finally:
            subs[0].close()


def test_a_relay_loop_is_detected_and_refused(tmp_path) -> None:
    a, b = f"tcp://127.0.0.1:{free_port_pair()}", f"tcp://127.0.0.1:{free_port_pair()}"
    with Relay(b, a, tmp_path / "a", ["m"], relay_id="A") as ra, \
            Relay(a, b, tmp_path / "b", ["m"], relay_id="B") as rb:
        wait_until(lambda: ra.forwarder.loop or rb.forwarder.loop, 15, what="the loop detected")
        assert "leads back to it" in (ra.forwarder.loop or rb.forwarder.loop)


def test_zmqmodels_relay_command(hub, tmp_path) -> None:
    import os
    import subprocess
    import sys

    port = free_port_pair()
    log = open(tmp_path / "relay.log", "w")  # noqa: SIM115 (closed below)
    p = subprocess.Popen([sys.executable, "-m", "zmqmodels", "relay", "--hub", hub.address, "--bind",
                          f"tcp://127.0.0.1:{port}", "--store", str(tmp_path / "rs"), "--model", "m",
                          "--relay-id", "edge"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         stdout=subprocess.DEVNULL, stderr=log)
    try:
        subs, got = followers(f"tcp://127.0.0.1:{port}", 1)
        try:
            data = bytes(range(256)) * 4096
            m = hub.publish(raw_release("m", data))
            wait_until(lambda: got[0] and got[0][-1] == (m.seq, hashlib.sha256(data).hexdigest()), 30,
                       what="delivery through the relay process")
            wait_until(lambda: any(n.via == ["edge"] for n in hub.status().nodes), 10, what="via edge")
        finally:
            subs[0].close()
    finally:
        p.terminate()
        p.wait(15)
        log.close()


def test_curve_per_hop_admits_the_fleet_and_refuses_a_stranger(tmp_path, short_tmp) -> None:
    """Hub -> relay -> follower, each hop CURVE-encrypted with its own server key and allowlist;
    a follower whose key the relay does not admit receives nothing."""
    from zmqmodels.transport.curve import Curve, generate_curve_keys

    generate_curve_keys(tmp_path / "fleet", ["hub", "relay", "node"])
    generate_curve_keys(tmp_path / "other", ["stranger"])
    pub = tmp_path / "fleet" / "public_keys"

    def key(name: str, server: str | None = None, allow=()) -> Curve:  # noqa: ANN001
        base = tmp_path / ("other" if name == "stranger" else "fleet") / "private_keys"
        return Curve.load(base / f"{name}.key_secret", pub / f"{server}.key" if server else None, allow)

    with Hub(f"ipc://{short_tmp}/hub", Store(tmp_path / "hub"), curve=key("hub", allow=[pub])) as hub, \
            Relay(hub.address, f"ipc://{short_tmp}/relay", tmp_path / "relay", ["m"], relay_id="r1",
                  curve=key("relay", allow=[pub]), upstream_curve=key("relay", "hub")) as relay:
        got: list[int] = []
        ok = Follower(relay.address, ["m"], on_release=lambda m, a: got.append(m.seq),
                      options=FollowOptions(node_id="n", curve=key("node", "relay"))).start()
        stranger = Follower(relay.address, ["m"], on_release=lambda m, a: got.append(-m.seq),
                            options=FollowOptions(node_id="x", curve=key("stranger", "relay"))).start()
        try:
            m = hub.publish(raw_release("m", bytes(range(256)) * 8192))
            wait_until(lambda: got == [m.seq], 30, what="the admitted follower")
            wait_until(lambda: {n.node for n in hub.status().nodes} == {"n"}, 10, what="its report")
            assert stranger.hub_seen == 0.0 and stranger.stats["bytes_received"] == 0
        finally:
            ok.close()
            stranger.close()
