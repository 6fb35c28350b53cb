"""Live processes take fuzzed frame lists, then still serve a normal request. (More examples
with --slow.)"""


from __future__ import annotations

import hashlib
import os
import time

import msgspec
import pytest
import torch
import zmq
from hypothesis import given

from tests.fuzzing import LIVE, _drain, fake_hub, frame_lists, fuzz_as_hub, fuzz_front, live_fuzz
from tests.helpers import raw_release, wait_until
from tests.models import Probe, probe_examples
from zmqmodels import Client, FollowOptions, Hub, Node, Subscriber, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.clients.hub import HubClient
from zmqmodels.release.manifest import encode_manifest
from zmqmodels.release.store import Store


def test_live_hub_keeps_serving_after_fuzzed_frames(short_tmp, tmp_path) -> None:
    addr = f"ipc://{short_tmp}/hub"
    rel = raw_release("m", os.urandom(5000), chunk_bytes=1000)
    with Hub(addr, Store(tmp_path)) as hub:
        seq = hub.publish(rel).seq
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(addr)
        sent = [0]

        @live_fuzz
        @given(frames=frame_lists())
        def send(frames: list[bytes]) -> None:
            if frames[0] in (b"PUBLISH", b"ROLLBACK", b"RESERVE"):
                frames[0] = b"STATUS"  # keep the store out of it: control is fuzzed as headers
            dealer.send_multipart(frames)
            sent[0] += 1
            _drain(dealer)

        try:
            send()
            wait_until(lambda: hub.stats["error_bad_message"] + hub.stats["error_too_large"] > 0, 10)
            _drain(dealer)
        finally:
            dealer.close()
        assert sent[0] >= LIVE * 0.9
        client = HubClient(addr, timeout=10)
        assert client.status().models[0].seq == seq  # still answering, nothing lost
        assert hub.stats["fetch_manifest"] >= 0 and hub._thread.is_alive()


def test_live_subscriber_keeps_receiving_after_fuzzed_frames(short_tmp) -> None:
    """A fake hub feeds the subscriber garbage on both sockets, then a real release."""
    addr = f"ipc://{short_tmp}/fake"
    router, pub = fake_hub(addr)
    got: list[tuple[int, str]] = []
    sub = Subscriber(addr, ["m"], on_release=lambda m, a: got.append((m.seq, hashlib.sha256(a).hexdigest())),
                     load=False, follow=FollowOptions(hub_ttl_s=60))
    try:
        sub.start()
        ident = router.recv_multipart()[0]  # its first FETCH_MANIFEST: now we can answer it
        wait_until(lambda: pub.poll(0, zmq.POLLOUT), 5)
        time.sleep(0.2)  # the SUB's subscription reaches the PUB
        fuzz_as_hub(router, pub, ident, b"m")
        wait_until(lambda: sum(v for k, v in sub.stats.items() if k.startswith("dropped_")) > 0, 10)
        archive = os.urandom(3000)
        rel = raw_release("m", archive, chunk_bytes=1000)
        m = msgspec.structs.replace(rel.manifest, seq=10**6)
        pub.send_multipart([b"m\0", b"MANIFEST", encode_manifest(m), b""])
        for i, c in enumerate(rel.chunks):
            pub.send_multipart([b"m\0", b"CHUNK", P.encode(P.ChunkHeader("m", m.seq, i)), c])
        wait_until(lambda: (m.seq, hashlib.sha256(archive).hexdigest()) in got, 20,
                   what="the real release after the garbage")
    finally:
        sub.close()
        router.close()
        pub.close()


@pytest.mark.timeout(180)
def test_live_node_keeps_serving_after_fuzzed_requests(short_tmp, tmp_path) -> None:
    hub_addr, node_addr = f"ipc://{short_tmp}/hub", f"ipc://{short_tmp}/node"
    with Hub(hub_addr, Store(tmp_path / "store")) as hub, \
            Node(hub_addr, ["probe"], node_addr, workers=1, cache=tmp_path / "cache") as node:
        m = hub.publish(build_release(compile_model(Probe(2.0), probe_examples()), "probe", "v1"))
        assert hub.wait_for("probe", m.seq, 1, 90)[0]
        codes = fuzz_front(node_addr)
        assert node.stats["error_bad_request"] > 0 and "bad_request" in codes
        with Client(node_addr, timeout=10) as c:
            r = c.infer("probe", torch.ones(1, 4))
        assert (r.label, r.seq, float(r.outputs[0, 0])) == ("v1", m.seq, 2.0)
