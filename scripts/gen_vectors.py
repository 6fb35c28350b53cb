#!/usr/bin/env python3
"""Write the ``releases`` of ``tests/vectors/follow.json``: real manifests and chunks (hex) that
the cases' events name. The cases (events and what each must send and deliver) are written by
hand in that file and left as they are; ``--check`` exits 1 if the releases are not current.

The same file is run by ``tests/unit/test_vectors.py`` through the Python cores and by the C++
doctest (``cpp/tests/core_tests.cpp``) through the C++ follower: one set of rules, two nodes."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

FILE = Path(__file__).resolve().parent.parent / "tests" / "vectors" / "follow.json"

# name -> (seq, staged, chunks, fill): archives of `chunks` chunks of 64 bytes, codec none
RELEASES = {
    "r1": (1, False, 3, 1),
    "r2": (2, False, 3, 2),
    "r2big": (2, False, 5, 3),
    "r1s": (1, True, 3, 4),
    "r2s": (2, True, 3, 5),
    "r3s": (3, True, 3, 6),
}
CHUNK = 64


def release(seq: int, staged: bool, chunks: int, fill: int) -> dict[str, object]:
    import xxhash

    from zmqmodels.release.manifest import CodecSpec, Manifest, compress_archive, encode_manifest

    archive = bytes((fill * 37 + i) % 251 for i in range(chunks * CHUNK))
    codec = CodecSpec("none", 0, "none", 1)
    parts = compress_archive(archive, codec, CHUNK)
    m = Manifest(name="m", label=f"v{seq}{'s' if staged else ''}", seq=seq, created_at=1.0e9,
                 archive_sha256=hashlib.sha256(archive).hexdigest(), archive_bytes=len(archive),
                 compressed_bytes=sum(len(c) for c in parts), codec=codec, chunk_bytes=CHUNK,
                 chunk_count=len(parts), chunk_sizes=[len(c) for c in parts],
                 chunk_xxh3=[xxhash.xxh3_64_intdigest(c) for c in parts], torch_version="n/a",
                 compile_method="none", staged=staged).check()
    return {"seq": seq, "staged": staged, "sha256": m.archive_sha256,
            "manifest": encode_manifest(m).hex(), "chunks": [bytes(c).hex() for c in parts]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    doc = json.loads(FILE.read_text()) if FILE.exists() else {"cases": []}
    new = {**doc, "releases": {k: release(*v) for k, v in RELEASES.items()}}
    text = json.dumps(new, indent=1) + "\n"
    if args.check:
        return 0 if FILE.read_text() == text else 1
    FILE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
