"""The assembly core: a subscriber's follow/repair decisions without sockets, including a
property test over random loss, duplication and reordering."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import raw_release
from zmqmodels import protocol as P
from zmqmodels.core.assembly import Assembler, Deliver, Send
from zmqmodels.defaults import Limits
from zmqmodels.release.manifest import Release, decode_manifest, encode_manifest

pytestmark = pytest.mark.timeout(120)

ARCHIVE = bytes(range(256)) * 64 * 9 + b"tail"  # ~147 KB, 10 chunks of 16 KiB


def release(seq: int = 1, data: bytes = ARCHIVE) -> Release:
    r = raw_release("m", data, chunk_bytes=16 * 1024, label=f"v{seq}")
    m = decode_manifest(encode_manifest(r.manifest))
    import msgspec

    m = msgspec.structs.replace(m, seq=seq)
    return Release(m, r.chunks)


def make(**kw) -> Assembler:
    return Assembler(["m"], node_id="n", host="h", pid=1, device="cpu",
                     take=lambda name, size: bytearray(size), give=lambda name, buf: None, **kw)


def sends(actions, kind):
    return [a.msg for a in actions if isinstance(a, Send) and isinstance(a.msg, kind)]


def delivered(actions):
    return [a for a in actions if isinstance(a, Deliver)]


def test_manifest_then_chunks_delivers_with_the_right_digest() -> None:
    a, r = make(), release()
    out = a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 0.0)
    assert sends(out, P.Report)[0].state == "receiving"
    for i, c in enumerate(r.chunks):
        out = a.on_chunk(P.ChunkHeader("m", 1, i), c, 0.0, fetched=False)
    (d,) = delivered(out)
    assert d.digest == hashlib.sha256(ARCHIVE).hexdigest() == r.manifest.archive_sha256
    assert bytes(d.asm.buf[: len(ARCHIVE)]) == ARCHIVE
    # a replay of the same or an older seq is dropped
    assert a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 1.0) == []
    assert a.stats["stale_manifest"] == 1


def test_late_joiner_asks_snapshot_and_missed_manifest_is_fetched() -> None:
    a = make()
    assert sends(a.start(0.0), P.FetchManifest) == [P.FetchManifest("m", 0)]
    r = release(3)
    out = a.on_chunk(P.ChunkHeader("m", 3, 0), r.chunks[0], 0.5, fetched=False)
    assert sends(out, P.FetchManifest) == [P.FetchManifest("m", 3)]
    assert a.on_chunk(P.ChunkHeader("m", 3, 1), r.chunks[1], 0.6, fetched=False) == []  # asked already


def test_gap_repairs_with_bounded_credit_and_reasks_after_timeout() -> None:
    a, r = make(limits=Limits(fetch_credit=4)), release()
    a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 0.0)
    a.on_chunk(P.ChunkHeader("m", 1, 0), r.chunks[0], 0.0, fetched=False)
    assert a.tick(0.1) == []
    beat = P.Heartbeat("hub", "m", 1, r.manifest.archive_sha256)  # the broadcast is over
    (fetch,) = sends(a.on_beat(beat, 0.3), P.FetchChunks)
    assert fetch.indices == [1, 2, 3, 4]
    assert sends(a.tick(0.4), P.FetchChunks) == []  # credit used up
    (again,) = sends(a.tick(2.5), P.FetchChunks)  # unanswered past fetch timeout
    assert again.indices == [1, 2, 3, 4]


def test_a_slow_steady_broadcast_is_not_a_loss_and_a_skip_fetches_only_the_skipped() -> None:
    """bench_fleet: 27 nodes on one 1 Gbit/s hub link get a chunk every ~0.25 s; a fixed idle
    timer called that loss and fetched what was on its way, and the hub sent 60 copies."""
    a, r = make(), release()
    a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 0.0)
    t = 0.0
    for i in range(4):  # one chunk every 0.4 s: slower than repair_idle_s, but steady
        t += 0.4
        assert sends(a.tick(t - 0.01), P.FetchChunks) == []
        assert sends(a.on_chunk(P.ChunkHeader("m", 1, i), r.chunks[i], t, fetched=False), P.FetchChunks) == []
    out = a.on_chunk(P.ChunkHeader("m", 1, 6), r.chunks[6], t + 0.4, fetched=False)  # 4 and 5 dropped
    assert [f.indices for f in sends(out, P.FetchChunks)] == [[4, 5]]
    assert a.stats["broadcast_gaps"] == 1
    assert sends(a.tick(t + 1.5), P.FetchChunks) == []  # silent, but the broadcast may be on its way
    beat = P.Heartbeat("hub", "m", 1, r.manifest.archive_sha256)  # sent after every chunk: the rest was lost
    (tail,) = sends(a.on_beat(beat, t + 1.6), P.FetchChunks)
    assert tail.indices == [7, 8, 9]


def test_a_broadcast_silent_for_long_is_fetched_without_the_beat() -> None:
    a, r = make(), release()
    a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 0.0)
    a.on_chunk(P.ChunkHeader("m", 1, 0), r.chunks[0], 0.1, fetched=False)
    assert sends(a.tick(1.9), P.FetchChunks) == []
    (fetch,) = sends(a.tick(2.2), P.FetchChunks)  # 2 s with nothing: fetch what is missing
    assert fetch.indices == list(range(1, 9))


def test_beat_for_a_newer_seq_asks_for_its_manifest() -> None:
    a = make()
    a.start(0.0)
    out = a.on_beat(P.Heartbeat("hub", "m", 4, "x"), 5.0)
    assert sends(out, P.FetchManifest) == [P.FetchManifest("m", 4)]


def test_over_limit_manifest_refused_once_and_does_not_block_the_seq() -> None:
    a, r = make(limits=Limits(max_archive_bytes=1000)), release(5)
    raw = encode_manifest(r.manifest)
    out = a.on_manifest(r.manifest, raw, b"", 0.0)
    reports = sends(out, P.Report)
    assert [x.state for x in reports] == ["rejected", "idle"] and "1000" in reports[0].reason
    assert a.on_manifest(r.manifest, raw, b"", 0.1) == []  # reported once
    beat = P.Heartbeat("hub", "m", 5, r.manifest.archive_sha256)
    assert a.on_beat(beat, 9.0) == []  # and not fetched again on every heartbeat
    other = P.Heartbeat("hub", "m", 5, "f" * 64)  # the genuine seq 5 (another archive) is
    assert sends(a.on_beat(other, 9.0), P.FetchManifest) == [P.FetchManifest("m", 5)]
    a.intake.limits = Limits()
    assert sends(a.on_manifest(r.manifest, raw, b"", 0.2), P.Report)[0].state == "receiving"


def test_chunk_corrupt_at_the_source_rejects_after_three_fetches() -> None:
    a, r = make(), release()
    a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 0.0)
    bad = bytes(len(r.chunks[0]))
    for n in range(3):
        out = a.on_chunk(P.ChunkHeader("m", 1, 0), bad, 0.1 * n, fetched=True)
    reports = sends(out, P.Report)
    assert reports[0].state == "rejected" and "corrupt at its source" in reports[0].reason
    assert a.on_beat(P.Heartbeat("hub", "m", 1, "x"), 1.0) == []  # never fetched again


def test_hub_silent_past_ttl_asks_again_once() -> None:
    a = make(hub_ttl_s=3.0)
    a.start(0.0)
    a.heard(0.5)
    assert sends(a.tick(3.4), P.FetchManifest) == []
    assert sends(a.tick(4.0), P.FetchManifest) == [P.FetchManifest("m", 0)]
    assert sends(a.tick(4.1), P.FetchManifest) == []


@settings(max_examples=150, deadline=None)
@given(order=st.permutations(range(10)), lost=st.sets(st.integers(0, 9)), dup=st.sets(st.integers(0, 9)),
       corrupt=st.sets(st.integers(0, 9), max_size=2))
def test_any_loss_order_and_corruption_ends_in_one_verified_delivery(order, lost, dup, corrupt) -> None:
    a, r = make(), release()
    out = a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", 0.0)
    now = 0.0
    for i in order:
        if i in lost:
            continue
        payload = bytes(len(r.chunks[i])) if i in corrupt else r.chunks[i]
        for _ in range(2 if i in dup else 1):
            out += a.on_chunk(P.ChunkHeader("m", 1, i), payload, now, fetched=False)
    for _ in range(40):  # the hub answers every fetch faithfully
        now += 0.3
        for fetch in sends(out, P.FetchChunks):
            for i in fetch.indices:
                out += a.on_chunk(P.ChunkHeader("m", 1, i), r.chunks[i], now, fetched=True)
        if delivered(out):
            break
        out = [*delivered(out), *a.tick(now)]
    (d,) = delivered(out)
    assert d.digest == r.manifest.archive_sha256


def test_hub_silence_is_measured_from_the_last_message_not_the_last_reask() -> None:
    """A re-ask every TTL must not count as hearing from the hub: a node whose hub went away
    after it was heard has to be able to say so after 30 s (Node.hub_silence reads this)."""
    a = make(hub_ttl_s=3.0)
    a.start(0.0)
    a.heard(1.0)
    for t in range(2, 40):
        a.tick(float(t))
    assert a.hub_seen == 1.0
    asks = sum(len(sends(a.tick(40.0 + 3.1 * k), P.FetchManifest)) for k in range(1, 4))
    assert asks == 3  # still one re-ask per TTL of silence


def _unstored(a: Assembler, now: float):
    r = release()
    a.on_manifest(r.manifest, encode_manifest(r.manifest), b"", now)
    for i, c in enumerate(r.chunks):
        out = a.on_chunk(P.ChunkHeader("m", 1, i), c, now, fetched=False)
    (d,) = delivered(out)
    return d


def test_a_failed_cache_write_is_retried_as_soon_as_the_disk_has_room() -> None:
    """A full disk given room: the write waits no longer for a back-off grown to a minute."""
    from zmqmodels.core.assembly import RetryStore

    a = make()
    d = _unstored(a, 0.0)
    for k in range(7):  # back-off 1, 2, 4 ... 60 s
        delay = a.store_failed(d.asm, d.digest, 100.0 * k)
    assert delay == 60.0
    assert a.unstored.pending() == {"m": len(ARCHIVE)}
    assert a.tick(601.0) == []
    a.unstored.room("m", 601.0)  # the shell saw room on the disk
    (retry,) = [x for x in a.tick(601.0) if isinstance(x, RetryStore)]
    assert retry.asm is d.asm
    a.unstored.stored("m")
    assert a.unstored.pending() == {}


def test_a_write_that_fails_with_room_keeps_its_back_off() -> None:
    """Room was not the trouble (EIO, a read-only file system): no retry every second."""
    from zmqmodels.core.assembly import RetryStore

    a = make()
    d = _unstored(a, 0.0)
    a.store_failed(d.asm, d.digest, 0.0)
    a.store_failed(d.asm, d.digest, 1.0)  # back-off 2 s: due at 3.0
    a.unstored.room("m", 1.5)
    assert [x for x in a.tick(1.5) if isinstance(x, RetryStore)]
    assert a.store_failed(d.asm, d.digest, 1.6) == 4.0  # failed although there was room
    assert a.unstored.pending() == {}  # the shell stops asking the disk
    a.unstored.room("m", 2.0)
    assert not [x for x in a.tick(2.0) if isinstance(x, RetryStore)]
    assert [x for x in a.tick(5.7) if isinstance(x, RetryStore)]


def test_a_kept_release_is_tried_again_after_another_write_of_its_model_succeeded() -> None:
    """A write of the same model succeeding while a release is kept resets the back-off; the
    kept release is still tried again (it never loses its timer)."""
    from zmqmodels.core.assembly import RetryStore

    a = make()
    d = _unstored(a, 0.0)
    a.store_failed(d.asm, d.digest, 0.0)
    a.unstored.stored("m")
    assert a.unstored.pending() == {"m": len(ARCHIVE)}
    assert [x for x in a.tick(100.0) if isinstance(x, RetryStore)]
