from __future__ import annotations

import hashlib
import io

import msgspec
import pytest
import torch

from tests.models import LeNet, lenet_examples
from zmqmodels import IntegrityError, ReleaseError, build_release, compile_model
from zmqmodels.errors import LimitError
from zmqmodels.release.manifest import CodecSpec, decode_manifest, encode_manifest, unpack_tensors


@pytest.fixture(scope="module")
def lenet_compiled():
    torch.manual_seed(0)
    return compile_model(LeNet(), lenet_examples())


@pytest.mark.parametrize("codec", [
    "auto", "none", "lz4", "lz4hc", "zstd", "blosclz", "zlib",
    CodecSpec("lz4", 5, "bitshuffle", 4), CodecSpec("zstd", 1, "none", 1),
])
def test_round_trip_is_bit_identical(lenet_compiled, codec) -> None:
    r = build_release(lenet_compiled, "lenet", "v1", codec=codec, chunk_bytes=10_000)
    assert r.manifest.chunk_count > 1
    archive = r.archive()
    assert hashlib.sha256(archive).hexdigest() == r.manifest.archive_sha256
    module = torch.jit.load(io.BytesIO(archive))
    x = lenet_examples()[0]
    assert torch.equal(module(x), lenet_compiled.module(x))


def test_typesize_tail_not_lost() -> None:
    from tests.helpers import raw_release
    data = bytes(range(256)) * 41 + b"xyz"  # not a multiple of 4
    r = raw_release("odd", data, chunk_bytes=1000, codec=CodecSpec("lz4", 5, "shuffle", 4))
    assert bytes(r.archive()) == data


def test_manifest_carries_the_headers(lenet_compiled) -> None:
    r = build_release(lenet_compiled, "lenet", "v7", metadata={"git": "abc123"})
    m = decode_manifest(encode_manifest(r.manifest))
    assert m == r.manifest
    assert (m.name, m.label, m.seq, m.compile_method) == ("lenet", "v7", 0, "script")
    assert m.parameter_count == sum(p.numel() for p in LeNet().parameters())
    assert m.inputs == [{"dtype": "float32", "rank": 4, "shape": [-1, 1, 28, 28]}]
    assert m.outputs["shape"] == [1, 10]
    assert m.metadata == {"git": "abc123"} and m.torch_version.startswith("2.")
    examples, expected = unpack_tensors(m.examples), unpack_tensors(m.expected)
    assert len(examples) == 2 and examples[1][0].shape == (2, 1, 28, 28)
    assert torch.equal(expected[1], lenet_compiled.module(examples[1][0]))


def test_auto_skips_compression_when_gain_is_negligible() -> None:
    import os

    from zmqmodels.release.manifest import choose_codec
    assert choose_codec(os.urandom(3 << 20), 4).name == "none"
    assert choose_codec(bytes(3 << 20), 4).name != "none"


def test_corrupt_chunk_is_rejected(lenet_compiled) -> None:
    r = build_release(lenet_compiled, "lenet", codec="lz4", chunk_bytes=10_000)
    chunks = list(r.chunks)
    bad = bytearray(chunks[1])
    bad[len(bad) // 2] ^= 0xFF
    chunks[1] = bytes(bad)
    with pytest.raises(IntegrityError, match="chunk 1"):
        type(r)(r.manifest, chunks).archive()


def test_bad_manifests_are_rejected(lenet_compiled) -> None:
    m = build_release(lenet_compiled, "lenet").manifest
    with pytest.raises(ReleaseError):
        decode_manifest(b"\x92\x01")
    with pytest.raises(ReleaseError, match="chunk_count"):
        decode_manifest(encode_manifest(msgspec.structs.replace(m, chunk_count=m.chunk_count + 1)))
    with pytest.raises(LimitError):
        decode_manifest(encode_manifest(msgspec.structs.replace(m, archive_bytes=1 << 40)))
    with pytest.raises(ReleaseError, match="invalid model name"):
        decode_manifest(encode_manifest(msgspec.structs.replace(m, name="../etc")))
    with pytest.raises(ReleaseError, match="unknown codec"):
        build_release(lenet_compiled, "lenet", codec="rar")


def test_streaming_verify_accepts_good_and_rejects_bad(lenet_compiled) -> None:
    r = build_release(lenet_compiled, "lenet", codec="lz4", chunk_bytes=7_000)
    r.verify()
    bad = msgspec.structs.replace(r.manifest, archive_sha256="0" * 64)
    with pytest.raises(IntegrityError, match="sha256"):
        type(r)(bad, r.chunks).verify()


def test_the_tensor_table_is_read_without_torch_and_matches_torch() -> None:
    """`inspect` imported torch (2.8 s) to list an archive's parameters; the table is now read
    from the zip with an unpickler that runs nothing, and says what torch says."""
    import io

    import torch

    from tests.models import BN, DictTuple, LeNet, Mixed, OnlyTraces
    from zmqmodels.release.archive import tensor_table

    modules = [torch.jit.script(m.eval()) for m in (LeNet(), BN(), Mixed(), DictTuple())]
    modules += [torch.jit.trace(OnlyTraces(), torch.randn(2, 4)),
                torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 3).half(), torch.nn.BatchNorm1d(3)))]
    for s in modules:
        buf = io.BytesIO()
        torch.jit.save(s, buf)
        got = [(t.name, t.kind, t.dtype, list(t.shape), t.nbytes) for t in tensor_table(buf.getvalue())]
        want = [(n, kind, str(t.dtype).removeprefix("torch."), list(t.shape), t.numel() * t.element_size())
                for kind, named in (("parameter", s.named_parameters()), ("buffer", s.named_buffers()))
                for n, t in named]
        assert got == want, s.original_name


def test_the_tensor_table_refuses_a_pickle_that_would_run_code() -> None:
    import io
    import pickle
    import zipfile

    from zmqmodels.errors import ReleaseError
    from zmqmodels.release.archive import tensor_table

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ReleaseError, match="unexpected global __builtin__.print"):
        tensor_table(buf.getvalue())
