#!/usr/bin/env python3
"""Compression of real TorchScript archives: `auto` vs fixed codecs, ratio and GB/s.

A small transformer encoder is trained for a few steps first (a randomly initialised
nn.TransformerEncoder holds deep copies of one layer and compresses unrealistically well),
then saved as fp32 and as bf16. For each codec: ratio, compress GB/s (chunked, 2 threads) and
decompress GB/s into a reused buffer (what a node does).
"""

from __future__ import annotations

import io
import os
import platform
import sys
import time

import xxhash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def trained_transformer():  # noqa: ANN201
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=6), nn.Linear(512, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        x = torch.randn(8, 32, 512)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main() -> None:
    import torch

    from zmqmodels import compile_model
    from zmqmodels.release.manifest import (
        CodecSpec,
        Manifest,
        choose_codec,
        compress_archive,
        decompress_chunk,
    )

    torch.set_num_threads(2)
    base = trained_transformer()
    print(f"# bench_codec on {platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| archive | codec | ratio | compress GB/s | decompress GB/s |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model = base.to(dtype)
        x = [torch.randn(1, 16, 512, dtype=dtype), torch.randn(2, 16, 512, dtype=dtype)]
        compiled = compile_model(model, x, method="trace")
        buf = io.BytesIO()
        torch.jit.save(compiled.module, buf)
        archive = buf.getvalue()
        typesize = 4 if dtype == torch.float32 else 2
        t0 = time.perf_counter()
        auto = choose_codec(archive, typesize)
        choose_s = time.perf_counter() - t0
        specs = [("auto -> " + f"{auto.name}/{auto.filter}", auto), ("none", CodecSpec()),
                 ("lz4/shuffle", CodecSpec("lz4", 5, "shuffle", typesize)),
                 ("lz4/bitshuffle", CodecSpec("lz4", 5, "bitshuffle", typesize)),
                 ("zstd-1/shuffle", CodecSpec("zstd", 1, "shuffle", typesize))]
        name = f"{'fp32' if typesize == 4 else 'bf16'} {len(archive) / 2**20:.0f} MB"
        for label, spec in specs:
            t0 = time.perf_counter()
            chunks = compress_archive(archive, spec, 4 << 20)
            comp_s = time.perf_counter() - t0 + (choose_s if label.startswith("auto") else 0)
            size = sum(len(c) for c in chunks)

            m = Manifest(name="b", label="", created_at=0, archive_sha256="0" * 64,
                         archive_bytes=len(archive), compressed_bytes=size, codec=spec,
                         chunk_bytes=4 << 20, chunk_count=len(chunks),
                         chunk_sizes=[len(c) for c in chunks],
                         chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in chunks],
                         torch_version="", compile_method="")
            out = memoryview(bytearray(len(archive)))
            for i, c in enumerate(chunks):  # warm the buffer: a node reuses its buffers
                decompress_chunk(m, i, c, out)
            t0 = time.perf_counter()
            for i, c in enumerate(chunks):
                decompress_chunk(m, i, c, out)
            dec_s = time.perf_counter() - t0
            assert bytes(out) == archive
            gb = len(archive) / 1e9
            speed = "n/a (slices)" if spec.name == "none" else f"{gb / comp_s:.2f}"
            print(f"| {name} | {label} | {len(archive) / size:.2f} | {speed} | {gb / dec_s:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
