"""The intake and repair rules, once: the node's Assembler and the relay's Forwarder run the
same Intake, so the same arrivals make them ask upstream for the same things. Before, the
rules were written twice in Python (and the milestone-2 repair-storm fix made twice)."""

from __future__ import annotations

import inspect

import msgspec
import pytest

from tests.helpers import raw_release
from zmqmodels import defaults
from zmqmodels import protocol as P
from zmqmodels.core import assembly, forward
from zmqmodels.core.assembly import Assembler
from zmqmodels.core.forward import Forwarder
from zmqmodels.core.intake import Intake, Send
from zmqmodels.core.serve import ReleaseServer
from zmqmodels.defaults import Limits
from zmqmodels.release.manifest import encode_manifest

pytestmark = pytest.mark.timeout(60)
DATA = bytes(range(256)) * 4096 * 6  # 6 MiB: 6 chunks of 1 MiB


def release(seq: int = 4):
    r = raw_release("m", DATA, chunk_bytes=1 << 20)
    m = msgspec.structs.replace(r.manifest, seq=seq)
    return m, encode_manifest(m), [bytes(c) for c in r.chunks]


def node() -> Assembler:
    return Assembler(["m"], node_id="n", host="h", pid=1, device="cpu",
                     take=lambda _n, size: bytearray(size), give=lambda _n, _b: None,
                     limits=Limits(fetch_credit=2))


def relay() -> Forwarder:
    return Forwarder(["m"], "r", limits=Limits(fetch_credit=2))


LAYERS = {"node": node, "relay": relay}


def asks(actions) -> list:
    return [a.msg for a in actions if isinstance(a, Send) and not isinstance(a.msg, P.Report)]


def feed(layer, m, raw, chunks, indices, now, fetched=False) -> list:
    out = []
    for i in indices:
        out += asks(layer.on_chunk(P.ChunkHeader("m", m.seq, i), chunks[i], now, fetched=fetched))
    return out


@pytest.mark.parametrize("kind", LAYERS)
def test_a_gap_in_the_broadcast_fetches_the_skipped_chunks_within_credit(kind) -> None:
    layer, (m, raw, chunks) = LAYERS[kind](), release()
    layer.on_manifest(m, raw, b"", 0.0)
    assert feed(layer, m, raw, chunks, [0, 3], 0.1) == [P.FetchChunks("m", 4, [1, 2])]


@pytest.mark.parametrize("kind", LAYERS)
def test_a_slow_broadcast_is_not_a_loss_but_the_end_beat_is(kind) -> None:
    layer, (m, raw, chunks) = LAYERS[kind](), release()
    layer.on_manifest(m, raw, b"", 0.0)
    assert feed(layer, m, raw, chunks, [0, 1], 0.1) == []
    assert asks(layer.tick(1.0)) == []  # 0.9 s of silence on a slow link: nothing asked
    beat = P.Heartbeat("hub", "m", 4, m.archive_sha256)
    assert asks(layer.on_beat(beat, 1.1)) == [P.FetchChunks("m", 4, [2, 3])]  # the tail was lost


@pytest.mark.parametrize("kind", LAYERS)
def test_a_stalled_broadcast_is_fetched_without_the_beat(kind) -> None:
    layer, (m, raw, chunks) = LAYERS[kind](), release()
    layer.on_manifest(m, raw, b"", 0.0)
    feed(layer, m, raw, chunks, [0], 0.1)
    assert asks(layer.tick(0.1 + 8 * defaults.REPAIR_IDLE_S + 0.5)) == [P.FetchChunks("m", 4, [1, 2])]


@pytest.mark.parametrize("kind", LAYERS)
def test_fetched_chunks_corrupt_too_often_are_given_up(kind) -> None:
    layer, (m, raw, chunks) = LAYERS[kind](), release()
    layer.on_manifest(m, raw, b"", 0.0, fetched=True)
    bad = b"\0" * len(chunks[0])
    for k in range(defaults.CORRUPT_FETCHES_MAX):
        layer.on_chunk(P.ChunkHeader("m", 4, 0), bad, 0.1 * k, fetched=True)
    assert layer.intake.coming == {}  # nothing is asked for it any more
    assert layer.stats["corrupt_at_source"] == 1
    assert asks(layer.tick(100.0)) == []


@pytest.mark.parametrize("kind", LAYERS)
def test_a_missed_manifest_is_asked_for_once_per_timeout(kind) -> None:
    layer, (m, _raw, chunks) = LAYERS[kind](), release()
    assert asks(layer.on_chunk(P.ChunkHeader("m", 4, 2), chunks[2], 0.0, fetched=False)) == \
        [P.FetchManifest("m", 4)]
    assert asks(layer.on_beat(P.Heartbeat("hub", "m", 4, m.archive_sha256), 0.5)) == []
    later = 0.5 + defaults.FETCH_TIMEOUT_S + 0.1
    beat = P.Heartbeat("hub", "m", 4, m.archive_sha256)
    assert asks(layer.on_beat(beat, later)) == [P.FetchManifest("m", 4)]


@pytest.mark.parametrize("kind", LAYERS)
def test_a_silent_upstream_is_asked_for_every_model_once_per_ttl(kind) -> None:
    layer = LAYERS[kind]()
    layer.heard(1.0)
    assert asks(layer.tick(1.0 + defaults.HUB_TTL_S + 0.1)) == [P.FetchManifest("m", 0)]
    assert asks(layer.tick(1.0 + defaults.HUB_TTL_S + 0.2)) == []


def test_both_layers_are_built_on_the_one_intake_and_the_relay_on_the_one_server() -> None:
    assert isinstance(node().intake, Intake) and isinstance(relay().intake, Intake)
    assert isinstance(relay().server, ReleaseServer)
    for mod in (assembly, forward):
        src = inspect.getsource(mod)
        for rule in ("def next_fetch", "class Pace", "pace.stalls(", "CORRUPT_FETCHES_MAX:", "hub_ttl_s and",
                     "def _pump"):
            assert rule not in src, f"{mod.__name__} has its own copy of {rule!r}"


def test_the_release_server_answers_fetches_by_one_rule() -> None:
    srv = ReleaseServer("relay", Limits(fetch_credit=2))
    m, raw, chunks = release()

    class Held:
        manifest, manifest_bytes, signature = m, raw, b""

    Held.chunks = [chunks[0], None, chunks[2], None, None, None]
    (err,) = srv.chunks(b"p", P.FetchChunks("m", 4, [0, 1, 2]), Held).replies
    assert P.unpack(err.frames)[0].code == "too_large"
    answer = srv.chunks(b"p", P.FetchChunks("m", 4, [0, 1]), Held)
    assert [P.unpack(r.frames)[0].index for r in answer.replies] == [0] and answer.pending == [1]
    (err,) = srv.chunks(b"p", P.FetchChunks("m", 4, [9]), Held).replies
    assert P.unpack(err.frames)[0].code == "bad_message"
    (err,) = srv.chunks(b"p", P.FetchChunks("m", 5, [0]), None).replies
    assert P.unpack(err.frames)[0].code == "not_found" and P.unpack(err.frames)[0].indices == [0]
    (err,) = srv.manifest(b"p", P.FetchManifest("x", 0), None)
    assert P.unpack(err.frames)[0].message == "relay has no release of 'x'"
    beats = ReleaseServer.beats("r", {"m": m}, {"m": 3}, ["hub", "r"])
    assert [P.unpack(b.frames)[0].path for b in beats][0] == ["hub", "r"]
    assert P.unpack(beats[1].frames)[0].active == 3
