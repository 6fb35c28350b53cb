"""Every decoder turns arbitrary and mutated input into a clean ZmqModelsError, never a crash.
(More examples with --slow.)"""

from __future__ import annotations

import os

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import raw_release
from zmqmodels import protocol as P
from zmqmodels.errors import ZmqModelsError
from zmqmodels.release import decode_manifest, decompress_chunk, encode_manifest
from zmqmodels.tensors import decode

SLOW = os.environ.get("ZMQM_FUZZ_SLOW") == "1"
EXAMPLES = 3000 if SLOW else 300
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALID = {
    b"CHUNK": P.encode(P.ChunkHeader("m", 3, 1)),
    b"HEARTBEAT": P.encode(P.Heartbeat("hub", "m", 3, "a" * 64, "v1")),
    b"FETCH_MANIFEST": P.encode(P.FetchManifest("m", 2)),
    b"FETCH_CHUNKS": P.encode(P.FetchChunks("m", 2, [0, 1, 2])),
    b"REPORT": P.encode(P.Report("n", "m", "serving", 2, "v1")),
    b"INFER": P.encode(P.InferRequest("m", "1", {"t": "tuple", "items": []})),
    b"ERROR": P.encode(P.ErrorReply("bad_message", "x")),
    b"LOAD": P.encode(P.LoadCommand("m", 2, "/x")),
}
MANIFEST = encode_manifest(raw_release("m", os.urandom(5000), chunk_bytes=1000).manifest)


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8)
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5),
    max_leaves=20,
)


@pytest.mark.parametrize("kind", sorted(VALID))
@fuzz
@given(data=st.data())
def test_headers_reject_garbage_cleanly(kind: bytes, data: st.DataObject) -> None:
    choice = data.draw(st.integers(0, 2))
    if choice == 0:
        raw = data.draw(st.binary(max_size=200))
    elif choice == 1:
        raw = mutate(VALID[kind], data.draw(edits))
    else:
        raw = msgspec.msgpack.encode(data.draw(msgpack_values))
    try:
        P.decode_header(kind, raw)
    except ZmqModelsError:
        pass


@fuzz
@given(data=st.data())
def test_manifest_rejects_garbage_cleanly(data: st.DataObject) -> None:
    raw = mutate(MANIFEST, data.draw(edits)) if data.draw(st.booleans()) else \
        msgspec.msgpack.encode(data.draw(msgpack_values))
    try:
        m = decode_manifest(raw)
    except ZmqModelsError:
        return
    # whatever decodes is consistent enough to allocate and assemble safely
    assert m.chunk_count == len(m.chunk_sizes) == len(m.chunk_xxh3)
    assert m.archive_bytes <= 8 * 1024**3


@fuzz
@given(data=st.data())
def test_chunks_reject_garbage_cleanly(data: st.DataObject) -> None:
    rel = raw_release("m", bytes(range(256)) * 20, chunk_bytes=1000,
                      codec=data.draw(st.sampled_from([None, "lz4"])) and __import__(
                          "zmqmodels.release", fromlist=["CodecSpec"]).CodecSpec("lz4", 5, "shuffle", 4))
    m = rel.manifest
    index = data.draw(st.integers(-2, m.chunk_count + 2))
    payload = mutate(bytes(rel.chunks[index % m.chunk_count]), data.draw(edits)) \
        if data.draw(st.booleans()) else data.draw(st.binary(max_size=2000))
    out = memoryview(bytearray(m.archive_bytes))
    try:
        decompress_chunk(m, index, payload, out)
    except ZmqModelsError:
        pass


@fuzz
@given(spec=msgpack_values, n=st.integers(0, 3), size=st.integers(0, 64))
def test_tensor_specs_reject_garbage_cleanly(spec, n: int, size: int) -> None:  # noqa: ANN001
    try:
        decode(spec, [bytes(size)] * n)
    except ZmqModelsError:
        pass


@fuzz
@given(shape=st.lists(st.integers(0, 2**40), max_size=6), dtype=st.sampled_from(["float32", "int8"]))
def test_declared_tensor_sizes_are_checked_before_allocation(shape, dtype) -> None:  # noqa: ANN001
    spec = {"t": "tensor", "dtype": dtype, "shape": shape, "f": 0}
    try:
        decode(spec, [b"\0" * 16])
    except ZmqModelsError:
        pass
