"""The framing table: every kind packs and unpacks, arity and kind faults are ProtocolErrors,
and no module but protocol.py spells a frame kind."""

from __future__ import annotations

import pathlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqmodels import protocol as P
from zmqmodels.errors import ProtocolError

pytestmark = pytest.mark.timeout(60)

SAMPLES = {
    P.ChunkHeader: (P.ChunkHeader("m", 3, 1), [b"payload"]),
    P.PatchHeader: (P.PatchHeader("m", 3, 1, 0xFFFF_FFFF_FFFF_FFFF), [b"payload"]),
    P.Heartbeat: (P.Heartbeat("hub", "m", 3, "a" * 64, "v1"), []),
    P.Activate: (P.Activate("m", 3, ["n1"]), []),
    P.Activated: (P.Activated("m", 3, ["n1"]), []),
    P.FetchManifest: (P.FetchManifest("m", 2), []),
    P.FetchChunks: (P.FetchChunks("m", 2, [0, 1]), []),
    P.Report: (P.Report("n", "m", "serving", 2, "v1"), []),
    P.Publish: (P.Publish(b""), [b"manifest", b"c0", b"c1"]),
    P.Published: (P.Published("m", 2, "v1", "a" * 64), []),
    P.Reserve: (P.Reserve("m"), []),
    P.Reserved: (P.Reserved("m", 2), [b"base"]),
    P.Rollback: (P.Rollback("m", "v1"), [b"manifest", b"sig"]),
    P.StatusRequest: (P.StatusRequest(), []),
    P.StatusReply: (P.StatusReply("hub", [], []), []),
    P.ReleasesRequest: (P.ReleasesRequest("m"), []),
    P.ReleasesReply: (P.ReleasesReply([P.ReleaseInfo("m", 2, "v1", 1.5, 10, 8, "lz4/shuffle", "", 0, 3)]),
                      []),
    P.Pin: (P.Pin("m", "v1", on=False), []),
    P.Pinned: (P.Pinned("m", 2, [1, 2]), []),
    P.ErrorReply: (P.ErrorReply("bad_message", "x"), []),
    P.InferRequest: (P.InferRequest("m", "1", {"t": "tuple", "items": []}, 4, timeout_ms=250.0), [b"t"]),
    P.InferReply: (P.InferReply("1", "m", "v1", 2, "w", {"t": "tuple", "items": []}), [b"t"]),
    P.ModelsRequest: (P.ModelsRequest(id="q"), []),
    P.ModelsReply: (P.ModelsReply("n", [P.ServedModel("m", [P.ServedVersion(2, "v1", 1, 8)])], id="q"), []),
    P.WorkerReady: (P.WorkerReady("w", 1, "cpu", {"m": P.Held(2, "v1")}), []),
    P.Work: (P.Work(b"\0id", 1, 2), [b"INFER", b"hdr"]),
    P.Done: (P.Done(b"\0id"), [b"OK", b"hdr"]),
    P.Batch: (P.Batch([P.Job(b"\0a", 1, 2, 2), P.Job(b"\0b", 1, 0, 2)]), [b"INFER", b"h1", b"INFER", b"h2"]),
    P.Answers: (P.Answers([P.Answer(b"\0a", True, "", 2), P.Answer(b"\0b", False, "", 0)]), [b"OK", b"h1"]),
    P.LoadCommand: (P.LoadCommand("m", 2, "/x"), []),
    P.LoadResult: (P.LoadResult("w", "m", 2, "v1", True), []),
    P.Applying: (P.Applying("m", 2), []),
    P.ManifestFrames: (P.ManifestFrames(), [b"manifest", b"sig"]),
    P.WorkerBeat: (P.WorkerBeat(), []),
    P.StopWorker: (P.StopWorker(), []),
}


def test_every_kind_in_the_table_has_a_sample() -> None:
    assert set(SAMPLES) == {f.struct for f in P.FRAMING}


@pytest.mark.parametrize("struct", list(SAMPLES), ids=lambda t: t.__name__)
def test_roundtrip(struct) -> None:
    msg, payload = SAMPLES[struct]
    frames = P.pack(msg, *payload)
    assert frames[0] == P.kind_of(msg)
    got, rest = P.unpack(frames)
    assert got == msg and rest == payload


def test_arity_and_kind_faults() -> None:
    with pytest.raises(ProtocolError, match="CHUNK of 2 frame"):
        P.unpack([b"CHUNK", P.encode(P.ChunkHeader("m", 1, 0))])
    with pytest.raises(ProtocolError, match="unknown message type"):
        P.unpack([b"NOPE", b""])
    with pytest.raises(ProtocolError, match="empty"):
        P.unpack([])
    with pytest.raises(ProtocolError):
        P.pack(P.ChunkHeader("m", 1, 0))  # a sender's bug: no payload
    with pytest.raises(ProtocolError, match="protocol version"):
        P.unpack([b"STATUS", P.encode(P.StatusRequest(v=9))])


def test_infer_request_keeps_its_v1_wire_names() -> None:
    """``seq`` travels as ``version`` (protocol v1); ``id`` is a string."""
    import msgspec

    raw = msgspec.msgpack.decode(P.encode(P.InferRequest("m", "7", [], 3, timeout_ms=5.0)))
    assert raw["version"] == 3 and raw["id"] == "7" and raw["timeout_ms"] == 5.0
    with pytest.raises(ProtocolError, match="id"):
        P.unpack([b"INFER", msgspec.msgpack.encode({"model": "m", "id": 7, "inputs": [], "v": 1})])


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_unpack_never_raises_anything_but_protocol_error(frames) -> None:
    try:
        P.unpack(frames)
    except ProtocolError:
        pass


def test_no_frame_kind_literal_outside_protocol() -> None:
    pkg = pathlib.Path(P.__file__).parent.parent
    kinds = "|".join(re.escape(f.kind.decode()) for f in P.FRAMING)
    pattern = re.compile(rf'b"({kinds})"')
    offenders = [f"{p.name}:{n}" for p in pkg.rglob("*.py") if p.parent.name != "protocol"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
