"""What a node starting on a cache serves and holds: one rule (``Cache.startup``), which the node,
the embedded subscriber and the C++ node (``Cache::startup``) follow, and what a worker may load
(``Cache.servable``)."""

from __future__ import annotations

import msgspec

from tests.helpers import raw_release
from zmqmodels.release.cache import Cache


def put(cache: Cache, seq: int, *, staged: bool = False) -> None:
    data = bytes([seq]) * 3000
    r = raw_release("m", data, chunk_bytes=1000, label=f"v{seq}")
    cache.put(msgspec.structs.replace(r.manifest, seq=seq, staged=staged), data)


def test_the_newest_active_is_served_and_a_newer_staged_one_held(tmp_path) -> None:
    cache = Cache(tmp_path, keep=5)
    assert cache.startup("m") == (None, None)
    put(cache, 1)
    put(cache, 2, staged=True)
    put(cache, 3, staged=True)
    serve, held = cache.startup("m")
    assert serve is not None and serve[0].seq == 1 and held is not None and held.seq == 3
    assert [m.seq for m, _ in cache.servable("m")] == [1]
    cache.activate("m", 3)
    serve, held = cache.startup("m")
    assert serve is not None and serve[0].seq == 3 and held is None
    assert [m.seq for m, _ in cache.servable("m")] == [3, 1]
    assert [m.seq for m, _ in cache.servable("m", exclude={3})] == [1]


def test_a_damaged_newest_entry_is_discarded_and_the_one_before_served(tmp_path) -> None:
    cache = Cache(tmp_path, keep=5)
    put(cache, 1)
    put(cache, 2)
    cache.path("m", 2).write_bytes(b"not the archive")
    serve, held = cache.startup("m")
    assert serve is not None and serve[0].seq == 1 and held is None
    assert cache.seqs("m") == [1]
