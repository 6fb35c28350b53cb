"""Every decoder turns arbitrary and mutated input into a clean ZmqModelsError, never a crash.
(More examples with --slow.)"""


from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzzing import MANIFEST, VALID, edits, fuzz, msgpack_values, mutate
from tests.helpers import raw_release
from zmqmodels import protocol as P
from zmqmodels.errors import ZmqModelsError
from zmqmodels.protocol.tensors import decode
from zmqmodels.release.manifest import CodecSpec, decode_manifest, decompress_chunk


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


@pytest.mark.parametrize("kind", [f.kind for f in P.FRAMING], ids=lambda k: k.decode())
@fuzz
@given(data=st.data())
def test_unpack_of_every_kind_raises_only_protocol_errors(kind: bytes, data: st.DataObject) -> None:
    """``unpack`` (the framing table) on a real kind with a garbage, mutated or valid header
    and any number of payload frames: a message, or a ProtocolError; nothing else escapes."""
    from zmqmodels.errors import ProtocolError

    valid = VALID.get(kind, b"")
    how = data.draw(st.integers(0, 3))
    header = (valid if how == 0 else mutate(valid, data.draw(edits)) if how == 1
              else msgspec.msgpack.encode(data.draw(msgpack_values)) if how == 2
              else data.draw(st.binary(max_size=64)))
    frames = [kind, header, *data.draw(st.lists(st.binary(max_size=32), max_size=4))]
    try:
        msg, payload = P.unpack(frames)
    except ProtocolError:
        return
    assert P.kind_of(msg) == kind and isinstance(payload, list)


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
                      codec=data.draw(st.sampled_from([None, "lz4"])) and CodecSpec("lz4", 5, "shuffle", 4))
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
