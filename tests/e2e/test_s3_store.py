"""The release store in S3-compatible object storage, on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import raw_release
from zmqmodels.errors import ReleaseError, StoreError
from zmqmodels.release.catalog import Retention
from zmqmodels.release.s3 import S3Store

pytestmark = pytest.mark.timeout(300)


def _race(n: int, attempt) -> list[str]:  # noqa: ANN001
    gate = threading.Barrier(n)

    def one(i: int) -> str:
        gate.wait(timeout=60)
        return attempt(i)
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def test_the_server_enforces_conditional_writes_under_concurrency(s3server) -> None:
    """What the store's design relies on: of many writers racing to create one key (If-None-Match)
    or to replace one version of it (If-Match), exactly one wins, every time."""
    from botocore.exceptions import ClientError

    bucket, c = s3server.bucket(), s3server.client()

    def outcome(**kw):  # noqa: ANN003, ANN202
        try:
            c.put_object(Bucket=bucket, **kw)
            return "won"
        except ClientError as exc:
            return exc.response["Error"]["Code"]
    for _ in range(4):
        key = f"race/{os.urandom(6).hex()}"
        created = _race(16, lambda i, key=key: outcome(Key=key, Body=str(i).encode(), IfNoneMatch="*"))
        assert created.count("won") == 1 and set(created) <= {"won", "PreconditionFailed"}, created
        etag = c.head_object(Bucket=bucket, Key=key)["ETag"]
        replaced = _race(16, lambda i, key=key, etag=etag: outcome(Key=key, Body=f"r{i}".encode(),
                                                                  IfMatch=etag))
        assert replaced.count("won") == 1 and set(replaced) <= {"won", "PreconditionFailed"}, replaced


def test_hubs_racing_on_one_bucket_never_store_two_releases_under_one_seq(s3server) -> None:
    """Eight writers (each its own client, as eight hubs would be) publish and reserve at once:
    every release gets a distinct seq or a one-line refusal; the listing agrees for all."""
    url = s3server.url()
    stores = [S3Store(url, retention=Retention(0)) for _ in range(8)]

    def publish(i: int) -> str:
        out = []
        for j in range(3):
            try:
                got = stores[i].put(raw_release("m", f"{i}-{j}".encode() * 1000, label=f"w{i}.{j}"))
                out.append(str(got.release.manifest.seq))
            except StoreError as exc:
                assert "\n" not in str(exc)
                out.append("refused")
            out.append(f"r{stores[i].reserve('m')}")
        return " ".join(out)
    results = " ".join(_race(8, publish)).split()
    seqs = [int(s) for s in results if s.isdigit()]
    reserved = [int(s[1:]) for s in results if s.startswith("r")]
    assert len(seqs) == len(set(seqs)) and len(seqs) >= 20
    assert len(set(seqs) | set(reserved)) == len(seqs) + len(reserved)  # never handed out twice
    for s in stores:
        assert s.seqs("m") == sorted(seqs)
        assert [m.label for m in s.manifests("m")] == [s.manifest("m", q).label for q in sorted(seqs)]


def test_a_release_round_trips_stores_only_new_chunks_and_tampering_is_caught(s3server) -> None:
    store = S3Store(s3server.url(), retention=Retention(2))
    store.chunk_grace_s = 0.0
    blob = os.urandom(3_000_000)
    first = store.put(raw_release("m", blob, chunk_bytes=1 << 20, label="a")).release
    again = store.read("m", first.manifest.seq)
    assert bytes(again.archive()) == blob and again.manifest == first.manifest
    c = s3server.client()
    chunk_keys = lambda: sorted(o["Key"] for o in c.list_objects_v2(  # noqa: E731
        Bucket=store.bucket, Prefix=f"{store.prefix}m/chunks/").get("Contents", []))
    before = chunk_keys()
    assert len(before) == 3
    # the same content again, and a release sharing two of three chunks: only new chunks stored
    store.put(raw_release("m", blob, chunk_bytes=1 << 20, label="b"))
    assert chunk_keys() == before
    changed = blob[:2 << 20] + os.urandom(1_000_000)
    store.put(raw_release("m", changed, chunk_bytes=1 << 20, label="c"))
    assert len(chunk_keys()) == 4
    # retention (2) counts distinct contents: seq 1 and 2 are one
    assert store.seqs("m") == [1, 2, 3] and len(chunk_keys()) == 4
    assert store.put(raw_release("m", b"x", label="d")).pruned == [1, 2]  # their unshared chunk goes
    assert len(chunk_keys()) == 4  # seq 3's three chunks + d's one

    # a byte flipped in a chunk in the bucket: never served
    fresh = S3Store(store.url)  # no cache: reads the bucket
    key = f"{store.prefix}m/chunks/" + fresh._read_index("m", 3)[3][2]  # the unshared one
    body = bytearray(c.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    body[100] ^= 0xFF
    c.put_object(Bucket=store.bucket, Key=key, Body=bytes(body))
    with pytest.raises(StoreError, match="damaged"):
        fresh.read("m", 3)
    # a manifest swapped (seq 4's index copied over seq 3's): refused by name
    idx = lambda seq: f"{store.prefix}m/releases/{seq:012d}.zmi"  # noqa: E731
    c.copy_object(Bucket=store.bucket, Key=idx(3), CopySource={"Bucket": store.bucket, "Key": idx(4)})
    with pytest.raises(ReleaseError, match="not what its name says"):
        S3Store(store.url).manifest("m", 3)


def test_pins_keep_a_release_through_any_number_of_publishes(s3server) -> None:
    store = S3Store(s3server.url(), retention=Retention(2))
    base = store.put(raw_release("m", b"base" * 100, label="known-good")).release.manifest.seq
    assert store.pin("m", "known-good") == base
    for i in range(6):
        store.put(raw_release("m", f"{i}".encode() * 100, label=f"step{i}"))
    assert base in store.seqs("m") and store.find("m", "known-good").manifest.seq == base
    assert store.pins("m") == [base]
    store.unpin("m", str(base))
    assert store.pins("m") == []
    assert store.put(raw_release("m", b"next", label="next")).pruned == [base, base + 5]


def test_an_unreachable_store_is_named_in_one_line() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        store = S3Store("s3://nowhere/p")
        why = store.writable()
        assert why.startswith("store s3://nowhere/p/ is not reachable") and "\n" not in why
        with pytest.raises(StoreError, match="not reachable"):
            store.put(raw_release("m", b"x"))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_a_writer_killed_mid_put_leaves_only_whole_releases_listed(s3server) -> None:
    """kill -9 a process mid-put, several times: every release listed reads back whole (its
    archive sha256 verified) and the next put gets a fresh seq."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    url = s3server.url()
    writer = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from tests.helpers import raw_release
        from zmqmodels.release.s3 import S3Store
        store = S3Store({url!r}, retain=0)
        for i in range(1000):
            store.put(raw_release("big", os.urandom(24 << 20), chunk_bytes=2 << 20, label=str(i)))
    """)
    for delay in (0.6, 1.1, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    store = S3Store(url)
    for seq in store.seqs("big"):
        assert len(store.read("big", seq).archive()) == 24 << 20  # sha256 verified inside
    fresh = store.put(raw_release("big", b"z")).release.manifest.seq
    assert fresh > max(store.seqs("big")[:-1], default=0)
