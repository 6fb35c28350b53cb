"""Releases in S3-compatible object storage: one store shared by any number of hubs.

Layout under ``s3://BUCKET/PREFIX/`` (see docs/operations.md §Object storage)::

    <name>/chunks/<sha256 hex>         a compressed chunk, named by its SHA-256 (content-addressed:
                                       a delta or a re-publish uploads only new chunks)
    <name>/releases/<seq:012d>.zmi     the release index: b"ZMQMIDX1" | u64 manifest length |
                                       u64 signature length | u32 chunk count | manifest |
                                       signature | 32-byte SHA-256 per chunk (little-endian)
    <name>/SEQ, ACTIVE, PINS           the records of :mod:`zmqmodels.release.catalog`

Chunks go first, then the seq is claimed by a conditional write of ``SEQ`` (``If-Match`` its
ETag, or ``If-None-Match: *`` when it is new), then the index is written: a release is listed
only once it is whole, and two hubs can never store two releases under one seq. Objects are
never rewritten but the three records, so indexes are cached for ever. A chunk read back is
checked against its name (a flipped byte in the bucket is never served).

The client is boto3, configured as the AWS CLI is: ``AWS_ENDPOINT_URL``, credentials, region,
profiles and config files.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import defaults
from ..errors import ReleaseError, StoreError
from .catalog import Catalog, Retention
from .manifest import Manifest, Release, decode_manifest, validate_name

__all__ = ["S3Store", "INDEX_MAGIC"]

log = logging.getLogger("zmqmodels.store")

INDEX_MAGIC = b"ZMQMIDX1"
_INDEX = struct.Struct("<8sQQI")
_CAS_TRIES = 64
_PARALLEL = 8


class S3Store(Catalog):
    """``S3Store("s3://bucket/prefix")``; safe to share between hubs on any machines."""

    def __init__(self, url: str, *, retain: int = defaults.RETAIN_PER_NAME,
                 retention: Retention | None = None, client: Any = None) -> None:
        if not url.startswith("s3://") or len(url) <= 5:
            raise StoreError(f"{url!r} is not an s3://BUCKET[/PREFIX] address")
        bucket, _, prefix = url[5:].partition("/")
        self.bucket, self.prefix = bucket, (prefix.strip("/") + "/" if prefix.strip("/") else "")
        self.url = f"s3://{bucket}/{self.prefix}"
        self.retention = retention or Retention(retain)
        self._s3 = client or _client()
        self._index: dict[tuple[str, int], tuple[Manifest, bytes, bytes, list[str]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(_PARALLEL, thread_name_prefix="zmq-s3")
        self.chunk_grace_s = defaults.STORE_CHUNK_GRACE_S

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    # -- listing and reading -----------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._list(self.prefix, delimiter=True))

    def seqs(self, name: str) -> list[int]:
        keys = self._list(f"{self.prefix}{validate_name(name)}/releases/")
        return sorted(int(k.rsplit("/", 1)[-1][:-4]) for k in keys if k.endswith(".zmi")
                      and k.rsplit("/", 1)[-1][:-4].isdigit())

    def location(self, name: str, seq: int) -> str:
        return f"s3://{self.bucket}/{self._index_key(name, seq)}"

    def manifest(self, name: str, seq: int) -> Manifest:
        return self._read_index(name, seq)[0]

    def read(self, name: str, seq: int) -> Release:
        m, raw, signature, digests = self._read_index(name, seq)
        chunks = list(self._pool.map(lambda d: self._chunk(name, d), digests))
        return Release(m, chunks, raw, signature)

    def writable(self) -> str:
        key = f"{self.prefix}.ready-probe"
        try:
            self._call("put_object", Key=key, Body=bytes(4096))
            self._call("delete_object", Key=key)
        except StoreError as exc:
            return str(exc)
        return ""

    # -- the records: conditional writes ----------------------------------------------------
    def _record(self, name: str, record: str) -> bytes | None:
        got = self._get(f"{self.prefix}{name}/{record}")
        return None if got is None else got[0]

    def _update(self, name: str, record: str, change: Callable[[bytes | None], bytes | None]) -> bytes | None:
        key = f"{self.prefix}{validate_name(name)}/{record}"
        for _ in range(_CAS_TRIES):
            got = self._get(key)
            new = change(None if got is None else got[0])
            if new is None:
                return None if got is None else got[0]
            cond = {"IfNoneMatch": "*"} if got is None else {"IfMatch": got[1]}
            try:
                self._call("put_object", Key=key, Body=new, **cond)
                return new
            except _Conflict:
                continue  # another writer changed it between our read and write: read again
        raise StoreError(f"{self.url}{name}/{record}: {_CAS_TRIES} conditional writes lost to other "
                         "writers in a row; try again")

    # -- writing -----------------------------------------------------------------------------
    def _prepare(self, release: Release) -> list[str]:
        """Upload the chunks (those not there yet); return their digests."""
        name = release.manifest.name
        digests = [hashlib.sha256(c).hexdigest() for c in release.chunks]
        list(self._pool.map(lambda a: self._put_chunk(name, *a), zip(digests, release.chunks, strict=True)))
        return digests

    def _put_chunk(self, name: str, digest: str, chunk: Any) -> None:
        key = f"{self.prefix}{name}/chunks/{digest}"
        try:  # already there (a delta, a re-publish): refresh its age so a prune keeps it
            self._call("copy_object", Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                       MetadataDirective="REPLACE", Metadata={"zmqmodels": "chunk"})
            return
        except _Missing:
            pass
        self._call("put_object", Key=key, Body=bytes(chunk))

    def _write(self, release: Release, digests: Any = None) -> None:
        m = release.manifest
        raw, sig = release.manifest_bytes, release.signature
        body = b"".join([_INDEX.pack(INDEX_MAGIC, len(raw), len(sig), len(digests)), bytes(raw), sig,
                         *(bytes.fromhex(d) for d in digests)])
        try:
            self._call("put_object", Key=self._index_key(m.name, m.seq), Body=body, IfNoneMatch="*")
        except _Conflict:
            raise StoreError(f"{m.name} seq {m.seq} is already in {self.url} (claimed twice?)") from None

    def _delete(self, name: str, seq: int) -> None:
        """Remove release ``seq``'s index, then the chunks no remaining release names and no put
        touched for ``STORE_CHUNK_GRACE_S`` (another hub's put uploads its chunks before it
        writes the index that names them)."""
        self._call("delete_object", Key=self._index_key(name, seq))
        with self._lock:
            self._index.pop((name, seq), None)
        used = {d for s in self.seqs(name) for d in self._read_index(name, s)[3]}
        for key, age in self._list_aged(f"{self.prefix}{name}/chunks/"):
            if key.rsplit("/", 1)[-1] not in used and age > self.chunk_grace_s:
                self._call("delete_object", Key=key)

    # -- helpers -----------------------------------------------------------------------------
    def _index_key(self, name: str, seq: int) -> str:
        return f"{self.prefix}{validate_name(name)}/releases/{seq:012d}.zmi"

    def _read_index(self, name: str, seq: int) -> tuple[Manifest, bytes, bytes, list[str]]:
        with self._lock:
            hit = self._index.get((name, seq))
        if hit is not None:
            return hit
        got = self._get(self._index_key(name, seq))
        if got is None:
            raise StoreError(f"no release {name} seq {seq} in {self.url}")
        data = got[0]
        if len(data) < _INDEX.size or data[:8] != INDEX_MAGIC:
            raise ReleaseError(f"{self.location(name, seq)}: not a zmqmodels release index")
        _, mlen, slen, count = _INDEX.unpack_from(data)
        pos = _INDEX.size
        if pos + mlen + slen + 32 * count != len(data):
            raise ReleaseError(f"{self.location(name, seq)}: sizes do not match the index")
        raw, sig = data[pos:pos + mlen], data[pos + mlen:pos + mlen + slen]
        m = decode_manifest(raw)
        pos += mlen + slen
        digests = [data[i:i + 32].hex() for i in range(pos, len(data), 32)]
        if m.name != name or m.seq != seq or len(digests) != m.chunk_count:
            raise ReleaseError(f"{self.location(name, seq)}: holds {m.name} seq {m.seq} "
                               f"with {len(digests)} chunks, not what its name says")
        entry = (m, raw, sig, digests)
        with self._lock:
            self._index[(name, seq)] = entry
        return entry

    def _chunk(self, name: str, digest: str) -> bytes:
        got = self._get(f"{self.prefix}{name}/chunks/{digest}")
        if got is None:
            raise StoreError(f"{self.url}{name}/chunks/{digest} is missing")
        if hashlib.sha256(got[0]).hexdigest() != digest:
            raise StoreError(f"{self.url}{name}/chunks/{digest} is damaged (its SHA-256 differs)")
        return got[0]

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            r = self._call("get_object", Key=key)
        except _Missing:
            return None
        return r["Body"].read(), r["ETag"]

    def _list(self, prefix: str, *, delimiter: bool = False) -> list[str]:
        out: list[str] = []
        kw: dict[str, Any] = {"Prefix": prefix, **({"Delimiter": "/"} if delimiter else {})}
        while True:
            r = self._call("list_objects_v2", **kw)
            if delimiter:
                out += [p["Prefix"] for p in r.get("CommonPrefixes", [])
                        if not p["Prefix"][len(prefix):].startswith(".")]
            else:
                out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def _list_aged(self, prefix: str) -> list[tuple[str, float]]:
        """(key, seconds since it was last written) of every object under ``prefix``."""
        import datetime

        out: list[tuple[str, float]] = []
        kw: dict[str, Any] = {"Prefix": prefix}
        now = datetime.datetime.now(datetime.timezone.utc)
        while True:
            r = self._call("list_objects_v2", **kw)
            out += [(o["Key"], (now - o["LastModified"]).total_seconds()) for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def _call(self, op: str, **kw: Any) -> Any:
        """One S3 request; its failures as one-line :class:`StoreError` (or :class:`_Missing`,
        :class:`_Conflict` for the outcomes callers branch on)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._s3, op)(Bucket=self.bucket, **kw)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise _Missing(kw.get("Key", "")) from None
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise _Conflict(kw.get("Key", "")) from None
            raise StoreError(f"store {self.url}: {op} {kw.get('Key', '')}: {code}: "
                             f"{exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")) from None
        except BotoCoreError as exc:
            raise StoreError(f"store {self.url} is not reachable: {exc}") from None


class _Missing(Exception):
    pass


class _Conflict(Exception):
    pass


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreError("an s3:// store needs boto3: pip install 'zmqmodels[s3]'") from None
    cfg = Config(connect_timeout=defaults.STORE_CONNECT_TIMEOUT_S, read_timeout=defaults.STORE_READ_TIMEOUT_S,
                 retries={"max_attempts": 2, "mode": "standard"}, max_pool_connections=2 * _PARALLEL)
    return boto3.client("s3", config=cfg)
