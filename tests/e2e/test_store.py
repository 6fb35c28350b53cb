from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import raw_release, wait_until
from zmqmodels import Store, StoreError


def test_seq_is_assigned_monotonic_and_survives_reopen(tmp_path) -> None:
    store = Store(tmp_path, retain=2)
    seqs = [store.put(raw_release("m", os.urandom(1000), label=f"v{i}")).release.manifest.seq
            for i in range(4)]
    assert seqs == [1, 2, 3, 4]
    assert store.seqs("m") == [3, 4]  # retention keeps the newest 2
    reopened = Store(tmp_path, retain=2)
    assert reopened.put(raw_release("m", b"x")).release.manifest.seq == 5
    assert reopened.put(raw_release("other", b"y")).release.manifest.seq == 1
    assert reopened.names() == ["m", "other"]
    assert reopened.find("m", "v3").manifest.seq == 4
    assert reopened.find("m", "5").manifest.seq == 5
    with pytest.raises(StoreError, match="no stored release"):
        reopened.find("m", "v0")


def test_read_back_is_identical(tmp_path) -> None:
    data = os.urandom(3_000_000)
    store = Store(tmp_path)
    stored = store.put(raw_release("m", data, chunk_bytes=1 << 20)).release
    again = store.latest("m")
    assert again.manifest == stored.manifest
    assert bytes(again.archive()) == data


def test_unwritable_store_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create store"):
        Store(tmp_path / "file" / "store")


def test_killed_writer_leaves_only_whole_releases(tmp_path) -> None:
    writer = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.helpers import raw_release
        from zmqmodels import Store
        store = Store({str(tmp_path)!r}, retain=100)
        blob = os.urandom(64 << 20)
        for i in range(1000):
            store.put(raw_release("big", blob, chunk_bytes=4 << 20, label=str(i)))
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer])
    try:
        wait_until(lambda: any(p.name.startswith(".tmp-") for p in (tmp_path / "big").glob(".tmp-*"))
                   if (tmp_path / "big").exists() else False, timeout=60, interval=0.001,
                   what="a write in progress")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    store = Store(tmp_path)
    for seq in store.seqs("big"):
        r = store.read("big", seq)
        assert len(r.archive()) == 64 << 20  # sha256 verified inside archive()
    # the next seq is still fresh
    assert store.put(raw_release("big", b"z")).release.manifest.seq > max(store.seqs("big")[:-1], default=0)
