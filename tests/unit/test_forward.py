"""The relay's core without sockets: pass-through, digests, repairs, waiters, loops."""

from __future__ import annotations

import pytest

from tests.helpers import raw_release
from zmqmodels import protocol as P
from zmqmodels.core.forward import Forwarder, Keep
from zmqmodels.core.intake import Send
from zmqmodels.core.serve import Broadcast, Reply

pytestmark = pytest.mark.timeout(30)
DATA = bytes(range(256)) * 4096 * 3  # 3 MiB, 3 chunks of 1 MiB


def release(seq: int = 4):
    import msgspec

    r = raw_release("m", DATA, chunk_bytes=1 << 20)
    return msgspec.structs.replace(r.manifest, seq=seq), r.chunks


def raw(m):
    from zmqmodels.release.manifest import encode_manifest

    return encode_manifest(m)


def test_chunks_pass_straight_through_and_the_complete_release_is_kept() -> None:
    f, (m, chunks) = Forwarder(["m"], "r1"), release()
    out = f.on_manifest(m, raw(m), b"", 0.0)
    assert isinstance(out[0], Broadcast) and P.unpack(out[0].frames)[0] == P.ManifestFrames()
    for i, c in enumerate(chunks):
        out = f.on_chunk(P.ChunkHeader("m", 4, i), c, 0.1, fetched=False)
        assert isinstance(out[0], Broadcast)  # forwarded as it came, not after the whole release
    assert isinstance(out[-1], Keep) and out[-1].carried.chunks == [bytes(c) for c in chunks]


def test_a_corrupt_chunk_is_never_forwarded_and_is_fetched_again() -> None:
    f, (m, chunks) = Forwarder(["m"], "r1"), release()
    f.on_manifest(m, raw(m), b"", 0.0)
    bad = bytes(len(chunks[1]))
    out = f.on_chunk(P.ChunkHeader("m", 4, 1), bad, 0.1, fetched=False)
    assert not [a for a in out if isinstance(a, Broadcast)]
    # chunk 0 was skipped and 1 is corrupt: both fetched; 2 is still on its way, not fetched
    assert [a.msg for a in out if isinstance(a, Send)] == [P.FetchChunks("m", 4, [0, 1])]


def test_downstream_repairs_are_answered_now_or_when_the_chunk_arrives() -> None:
    f, (m, chunks) = Forwarder(["m"], "r1"), release()
    f.on_manifest(m, raw(m), b"", 0.0)
    f.on_chunk(P.ChunkHeader("m", 4, 0), chunks[0], 0.1, fetched=False)
    out = f.fetch_chunks(b"node", P.FetchChunks("m", 4, [0, 2]))
    assert [P.unpack(a.frames)[0].index for a in out if isinstance(a, Reply)] == [0]
    out = f.on_chunk(P.ChunkHeader("m", 4, 2), chunks[2], 0.2, fetched=False)
    assert [(a.peer, P.unpack(a.frames)[0].index) for a in out if isinstance(a, Reply)] == [(b"node", 2)]
    miss = f.fetch_manifest(b"node", P.FetchManifest("m", 9))
    assert P.unpack(miss[0].frames)[0].code == "not_found"


def test_reports_go_upstream_naming_each_relay_and_loops_are_refused() -> None:
    f = Forwarder(["m"], "r1")
    (up,) = f.report(P.Report("n1", "m", "serving", 4, via=["r2"]))
    assert up.msg.via == ["r2", "r1"]
    f.on_beat(P.Heartbeat("root", path=["r0"]), 0.0)
    assert not f.loop
    f.on_beat(P.Heartbeat("r2", path=["r0", "r1", "r2"]), 1.0)
    assert "leads back to it" in f.loop
    m, _ = release(5)
    assert f.on_manifest(m, raw(m), b"", 2.0) == []  # nothing forwarded in a loop
