"""A subscriber fed malformed broadcasts by a fake hub drops them, counts why, and keeps working."""

from __future__ import annotations

import os
import threading

import msgspec
import pytest
import zmq

from tests.helpers import raw_release, wait_until
from zmqmodels import FollowOptions, Subscriber
from zmqmodels import protocol as P
from zmqmodels.defaults import Limits
from zmqmodels.release.manifest import encode_manifest


@pytest.fixture
def fake_hub(short_tmp):
    ctx = zmq.Context.instance()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for s in (router, pub):
        s.linger = 0
    addr = f"ipc://{short_tmp}/hub"
    router.bind(addr)
    pub.bind(P.pub_endpoint(addr))
    yield addr, router, pub
    router.close()
    pub.close()


def test_malformed_broadcasts_are_dropped_and_counted(fake_hub) -> None:
    addr, router, pub = fake_hub
    got: list[bytes] = []
    done = threading.Event()

    def on_release(m, archive) -> None:  # noqa: ANN001
        got.append(bytes(archive))
        done.set()

    sub = Subscriber(addr, ["m"], on_release=on_release,
                     follow=FollowOptions(limits=Limits(max_archive_bytes=1 << 20), repair_idle_s=30))
    with sub:
        def connected() -> bool:
            pub.send_multipart([P.HUB_TOPIC, b"HEARTBEAT", P.encode(P.Heartbeat(hub="fake"))])
            return sub.hub_seen > 0

        wait_until(connected, 10, interval=0.05, what="the SUB connection")
        t = P.topic("m")
        rel = raw_release("m", os.urandom(300_000), chunk_bytes=100_000)
        m = msgspec.structs.replace(rel.manifest, seq=5)
        big = msgspec.structs.replace(m, archive_bytes=10 << 20, chunk_count=100,
                                      chunk_sizes=[100_000] * 100, chunk_xxh3=[0] * 100,
                                      compressed_bytes=10_000_000)
        garbage = [
            [t],  # too few frames
            [t, b"MANIFEST", b"\xc1"],  # not msgpack
            [t, b"MANIFEST", encode_manifest(big)],  # over the size limit: refused before allocating
            [t, b"WHAT", b"x"],  # unknown type
            [t, b"CHUNK", P.encode(P.ChunkHeader("m", 5, 0))],  # chunk without payload
            [t, b"CHUNK", P.encode(P.ChunkHeader("m", 5, 9)), b"x"],  # chunk before its manifest
            [t, b"MANIFEST", encode_manifest(msgspec.structs.replace(m, name="other"))],  # wrong topic
        ]
        for frames in garbage:
            pub.send_multipart(frames)
        pub.send_multipart([t, b"MANIFEST", encode_manifest(m)])
        pub.send_multipart([t, b"CHUNK", P.encode(P.ChunkHeader("m", 5, 7)), b"x"])  # out of range
        pub.send_multipart([t, b"CHUNK", P.encode(P.ChunkHeader("m", 5, 0)), b"bad digest"])
        for i, c in enumerate(rel.chunks):
            pub.send_multipart([t, b"CHUNK", P.encode(P.ChunkHeader("m", 5, i)), c])
        assert done.wait(10), dict(sub.stats)
        assert got == [bytes(rel.archive())]
        st = sub.stats
        assert st["too_large"] == 1  # refused (and reported to the hub), nothing allocated
        assert st["dropped_bad_release"] == 1
        assert st["dropped_bad_message"] == 5
        assert st["chunk_corrupt"] >= 1
        assert st["chunk_unexpected"] >= 1
        # an older seq replayed afterwards is ignored
        pub.send_multipart([t, b"MANIFEST", encode_manifest(msgspec.structs.replace(m, seq=4))])
        wait_until(lambda: sub.stats["stale_manifest"] >= 1, 5, what="the stale manifest")
