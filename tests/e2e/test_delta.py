"""Deltas by span: a release whose manifest carries ``chunk_raw_xxh3`` is broadcast without
the chunks its previous release had byte for byte, and a node takes those spans from the
archive it holds."""

from __future__ import annotations

import msgspec
import pytest
import torch

from tests.helpers import raw_release, wait_until
from tests.models import Wide
from zmqmodels import Client, Hub, Node, build_release, compile_model
from zmqmodels import protocol as P
from zmqmodels.core.assembly import Assembler, Deliver
from zmqmodels.core.forward import Forwarder
from zmqmodels.core.serve import same_chunks
from zmqmodels.release.manifest import encode_manifest
from zmqmodels.release.store import Store

pytestmark = pytest.mark.timeout(240)
CHUNK = 256 << 10


def releases(n: int = 6) -> tuple:
    """Two raw releases of ``n`` chunks that differ in the last chunk only."""
    old = bytes(range(256)) * (CHUNK // 256) * n
    new = old[:-10] + b"0123456789"
    a, b = raw_release("m", old, chunk_bytes=CHUNK), raw_release("m", new, chunk_bytes=CHUNK)
    first = (msgspec.structs.replace(a.manifest, seq=1), a.chunks, old)
    return first, (msgspec.structs.replace(b.manifest, seq=2), b.chunks, new)


class Base:
    def __init__(self, data: bytes | None) -> None:
        self.data = data

    def __call__(self, name: str):
        data = self.data

        class Ctx:
            def __enter__(self):
                return memoryview(data) if data is not None else None

            def __exit__(self, *exc):
                return False

        return Ctx()


def assembler(base: bytes | None, name: str = "m") -> Assembler:
    return Assembler([name], node_id="n", host="h", pid=1, device="cpu", take=lambda _n, s: bytearray(s),
                     give=lambda _n, _b: None, base=Base(base))


def test_the_sender_skips_what_its_previous_release_had_and_the_node_reuses_it() -> None:
    (m1, c1, old), (m2, c2, new) = releases()
    assert same_chunks(m1, m2) == frozenset(range(5))
    a = assembler(old)
    a.on_manifest(m2, encode_manifest(m2), b"", 0.0)
    assert a.stats["chunks_reused"] == 5 and a.stats["bytes_reused"] == 5 * CHUNK
    out = a.on_chunk(P.ChunkHeader("m", 2, 5), c2[5], 0.1, fetched=False)  # the one chunk sent
    (d,) = [x for x in out if isinstance(x, Deliver)]
    assert d.digest == m2.archive_sha256 and bytes(d.asm.buf) == new
    assert not [x for x in out if isinstance(getattr(x, "msg", None), P.FetchChunks)]


def test_a_damaged_or_missing_base_costs_fetches_never_a_wrong_byte() -> None:
    (m1, c1, old), (m2, c2, new) = releases()
    damaged = bytearray(old)
    damaged[CHUNK + 7] ^= 0xFF  # one flipped byte in chunk 1 of the held archive
    a = assembler(bytes(damaged))
    a.on_manifest(m2, encode_manifest(m2), b"", 0.0)
    assert a.stats["chunks_reused"] == 4  # not chunk 1
    out = a.on_chunk(P.ChunkHeader("m", 2, 5), c2[5], 0.1, fetched=False)
    asks = [x.msg for x in out if isinstance(getattr(x, "msg", None), P.FetchChunks)]
    beat = a.on_beat(P.Heartbeat("hub", "m", 2, m2.archive_sha256), 0.2)  # the sender is done
    asks += [x.msg for x in beat if isinstance(getattr(x, "msg", None), P.FetchChunks)]
    assert [i for f in asks for i in f.indices] == [1]
    out = a.on_chunk(P.ChunkHeader("m", 2, 1), c2[1], 0.3, fetched=True)
    (d,) = [x for x in out if isinstance(x, Deliver)]
    assert d.digest == m2.archive_sha256 and bytes(d.asm.buf) == new
    cold = assembler(None)  # a late joiner: holds nothing, fetches all that was not sent
    cold.on_manifest(m2, encode_manifest(m2), b"", 0.0)
    out = cold.on_chunk(P.ChunkHeader("m", 2, 5), c2[5], 0.1, fetched=False)
    assert [i for x in out if isinstance(getattr(x, "msg", None), P.FetchChunks) for i in x.msg.indices] == \
        [0, 1, 2, 3, 4][:cold.limits.fetch_credit]


def test_a_relay_reuses_what_it_holds_and_forwards_only_what_came() -> None:
    (m1, c1, old), (m2, c2, new) = releases()
    f = Forwarder(["m"], "r")
    f.on_manifest(m1, encode_manifest(m1), b"", 0.0)
    for i, c in enumerate(c1):
        for a in f.on_chunk(P.ChunkHeader("m", 1, i), c, 0.1, fetched=False):
            if type(a).__name__ == "Keep":
                f.stored(a.carried)
    f.on_manifest(m2, encode_manifest(m2), b"", 1.0)
    out = f.on_chunk(P.ChunkHeader("m", 2, 5), c2[5], 1.1, fetched=False)
    keep = [a for a in out if type(a).__name__ == "Keep"]
    assert keep and [bytes(c) for c in keep[0].carried.chunks] == [bytes(c) for c in c2]
    assert f.stats["chunks_reused"] == 5




def test_a_head_only_update_moves_a_few_percent_and_every_node_serves_the_new_weights(tmp_path) -> None:
    """Real processes: a node with the base takes only the changed spans; a node whose base
    file was damaged takes the damaged span again; both serve outputs equal to eager."""
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(2, 256)

    def release(label: str):
        return build_release(compile_model(model, [(x,)]), "wide", label, chunk_bytes=CHUNK)

    with Hub("tcp://127.0.0.1:0", Store(tmp_path / "hub"), heartbeat_interval_s=0.25) as hub:
        nodes = [Node(hub.address, ["wide"], "tcp://127.0.0.1:0", workers=1, cache=tmp_path / n,
                      node_id=n).start() for n in ("a", "b")]
        try:
            v1 = hub.publish(release("v1"))
            assert hub.wait_for("wide", v1.seq, 2, 120)[0]
            with torch.no_grad():
                model.head.weight.add_(0.5)
            want = model(x)
            v2_release = release("v2")
            cached = nodes[1].cache.path("wide", v1.seq)  # node b's base: flip one byte in it
            data = bytearray(cached.read_bytes())
            data[len(data) // 3] ^= 0xFF
            cached.write_bytes(bytes(data))
            before = [n.follower_stats().get("bytes_received", 0) for n in nodes]
            v2 = hub.publish(v2_release)
            assert hub.wait_for("wide", v2.seq, 2, 120)[0]
            got = [n.follower_stats() for n in nodes]
            archive = v2_release.manifest.archive_bytes
            moved = [g["bytes_received"] - b for g, b in zip(got, before, strict=True)]
            print(f"moved {moved} of {archive} bytes; reused {[g['bytes_reused'] for g in got]}")
            assert moved[0] <= 0.05 * archive, (moved, archive)  # only the changed spans moved
            assert moved[1] <= 0.05 * archive + CHUNK  # and the one it had damaged
            assert got[0]["chunks_reused"] > 0 and got[1]["chunks_reused"] > 0
            wait_until(lambda: all(n.stats["swaps_by_apply"] >= 1 for n in nodes), 30,
                       what="each node's worker to apply the new weights without a load")
            assert hub.status().stats["chunks_not_sent"] > 0
            for n in nodes:
                with Client(n.address, timeout=30) as c:
                    r = c.infer("wide", x)
                assert r.seq == v2.seq and torch.allclose(r.outputs, want, atol=1e-5)
        finally:
            for n in nodes:
                n.close()


def test_same_code_new_weights_are_applied_without_a_load_and_other_code_is_loaded(tmp_path) -> None:
    """A worker whose serving module has the release's code copies the new tensors into a copy
    of it (no torch.jit.load) and checks it on the examples; other code is loaded as before."""
    from zmqmodels.model.loader import apply_weights, load_release

    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(2, 256)
    r1 = build_release(compile_model(model, [(x,)]), "wide", "v1", chunk_bytes=CHUNK)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    r2 = build_release(compile_model(model, [(x,)]), "wide", "v2", chunk_bytes=CHUNK)
    paths = []
    for i, r in enumerate((r1, r2)):
        p = tmp_path / f"{i}.pt"
        p.write_bytes(_archive(r))
        paths.append(p)
    old = load_release(r1.manifest, paths[0])
    new = apply_weights(old, r2.manifest, paths[1])
    assert new is not None and new.how == "apply" and old.how == "load"
    with torch.inference_mode():
        assert torch.allclose(new.module(x), model(x), atol=1e-6)
        assert not torch.allclose(old.module(x), model(x))  # the serving copy was not touched
    smaller = torch.nn.Sequential(torch.nn.Linear(256, 4)).eval()
    other = build_release(compile_model(smaller, [(x,)]), "wide", "o")
    p = tmp_path / "other.pt"
    p.write_bytes(_archive(other))
    assert apply_weights(old, other.manifest, p) is None


def _archive(r) -> bytes:
    from zmqmodels.release.manifest import decompress_chunk

    buf = bytearray(r.manifest.archive_bytes)
    for i, c in enumerate(r.chunks):
        decompress_chunk(r.manifest, i, c, memoryview(buf))
    return bytes(buf)


def _fine_tuned_pair():
    """Two releases of ``Wide``: the second one Adam step (lr 1e-5) from the first."""
    torch.manual_seed(0)
    model = Wide().eval()
    x = torch.randn(2, 256)
    r1 = build_release(compile_model(model, [(x,)]), "wide", "v1", chunk_bytes=CHUNK)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    model.train()
    torch.nn.functional.mse_loss(model(x), torch.zeros(2, 4)).backward()
    opt.step()
    model.eval()
    r2 = build_release(compile_model(model, [(x,)]), "wide", "v2", chunk_bytes=CHUNK)
    r1 = type(r1)(msgspec.structs.replace(r1.manifest, seq=1), r1.chunks)
    r2 = type(r2)(msgspec.structs.replace(r2.manifest, seq=2), r2.chunks)
    return r1, r2


def test_a_fine_tuning_step_travels_as_patches_a_fraction_of_its_chunks() -> None:
    """Every chunk changed, yet as XOR against the previous release (bit-shuffled, zstd) each
    is well under the chunk; a node with the base rebuilds the exact archive from them."""
    from zmqmodels.release.patch import make_patches

    r1, r2 = _fine_tuned_pair()
    patches = make_patches(r1, r2)
    changed = [i for i in range(r2.manifest.chunk_count)
               if r1.manifest.chunk_raw_xxh3[i] != r2.manifest.chunk_raw_xxh3[i]]
    plain = sum(r2.manifest.chunk_sizes[i] for i in changed)
    sent = sum(len(patches[i][1]) if i in patches else r2.manifest.chunk_sizes[i] for i in changed)
    print(f"{len(changed)} changed chunks: {plain} bytes plain, {sent} as patches")
    assert len(changed) > 20 and len(patches) >= len(changed) - 2 and sent < 0.75 * plain
    base = _archive(r1)
    a = assembler(base, "wide")
    a.on_manifest(r2.manifest, encode_manifest(r2.manifest), b"", 0.0)
    out = []
    for i in range(r2.manifest.chunk_count):
        if i in patches:
            out += a.on_patch(P.PatchHeader("wide", 2, i, patches[i][0]), patches[i][1], 0.1)
        elif i in changed:
            out += a.on_chunk(P.ChunkHeader("wide", 2, i), r2.chunks[i], 0.1, fetched=False)
    (d,) = [x for x in out if isinstance(x, Deliver)]
    assert d.digest == r2.manifest.archive_sha256 and a.stats["chunks_patched"] == len(patches)


def test_a_patch_against_a_damaged_base_is_not_applied_and_the_chunk_is_fetched_whole() -> None:
    from zmqmodels.release.patch import make_patches

    r1, r2 = _fine_tuned_pair()
    patches = make_patches(r1, r2)
    target = sorted(patches)[3]
    base = bytearray(_archive(r1))
    base[target * CHUNK + 100] ^= 0x01  # one flipped bit in the span the patch was made against
    a = assembler(bytes(base), "wide")
    a.on_manifest(r2.manifest, encode_manifest(r2.manifest), b"", 0.0)
    out = []
    for i in sorted(patches):
        out += a.on_patch(P.PatchHeader("wide", 2, i, patches[i][0]), patches[i][1], 0.1)
    assert a.stats["patches_unusable"] == 1
    out += a.on_beat(P.Heartbeat("hub", "wide", 2, r2.manifest.archive_sha256), 0.2)
    asks = [i for x in out if isinstance(getattr(x, "msg", None), P.FetchChunks) for i in x.msg.indices]
    assert target in asks
    bad = bytearray(patches[sorted(patches)[4]][1])  # a patch whose bytes were damaged in flight
    bad[-1] ^= 0xFF
    b = assembler(_archive(r1), "wide")
    b.on_manifest(r2.manifest, encode_manifest(r2.manifest), b"", 0.0)
    idx = sorted(patches)[4]
    b.on_patch(P.PatchHeader("wide", 2, idx, patches[idx][0]), bytes(bad), 0.1)
    assert b.stats["chunk_corrupt"] == 1 and idx in b.asm("wide").missing


def test_a_node_copies_no_base_span_that_neither_a_reuse_nor_a_patch_needs() -> None:
    """Every node copied every span of its base into the new archive's buffer, needed or not
    (~30 ms per 100 MB). Spans are now hashed where they lie: a reused one is copied, a
    changed one is left alone until its chunk comes whole, or a patch for it reads the base
    span then."""
    from zmqmodels.release.patch import make_patches

    (m1, c1, old), (m2, c2, new) = releases()  # chunks 0-4 the same, 5 changed
    a = assembler(old)
    a.on_manifest(m2, encode_manifest(m2), b"", 0.0)
    buf = a.asm("m").buf
    for i in range(m2.chunk_count):
        start, length = m2.chunk_span(i)
        assert bytes(buf[start:start + length]) == (new[start:start + length] if i < 5 else bytes(length)), i
    r1, r2 = _fine_tuned_pair()  # every chunk changed: nothing to copy, patches for most
    patches = make_patches(r1, r2)
    b = assembler(_archive(r1), "wide")
    b.on_manifest(r2.manifest, encode_manifest(r2.manifest), b"", 0.0)
    assert not any(b.asm("wide").buf)  # not one base byte copied
    out = []
    for i in range(r2.manifest.chunk_count):
        if i in patches:  # the base span is read when its patch comes
            out += b.on_patch(P.PatchHeader("wide", 2, i, patches[i][0]), patches[i][1], 0.1)
        else:
            out += b.on_chunk(P.ChunkHeader("wide", 2, i), r2.chunks[i], 0.1, fetched=False)
    (d,) = [x for x in out if isinstance(x, Deliver)]
    assert d.digest == r2.manifest.archive_sha256 and b.stats["chunks_patched"] == len(patches) > 0
