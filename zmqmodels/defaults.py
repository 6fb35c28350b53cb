"""Defaults in one place; units in the names. The CLI takes its defaults from here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Limits",
    "PROTOCOL_VERSION",
    "CHUNK_BYTES",
    "CLEVEL",
    "AUTO_MIN_GAIN",
    "AUTO_SAMPLE_BYTES",
    "HEARTBEAT_INTERVAL_S",
    "NODE_LOST_AFTER_S",
    "NODE_FORGET_AFTER_S",
    "HUB_TTL_S",
    "HUB_UNREACHABLE_S",
    "REPAIR_IDLE_S",
    "ROOM_CHECK_INTERVAL_S",
    "ROOM_MARGIN_BYTES",
    "FETCH_CREDIT",
    "FETCH_TIMEOUT_S",
    "CORRUPT_FETCHES_MAX",
    "STALL_FACTOR",
    "SUB_RCVHWM",
    "MAX_ARCHIVE_BYTES",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_TENSORS",
    "LINGER_MS",
    "NODE_QUEUE_MAX",
    "NODE_QUEUE_TIMEOUT_S",
    "MAX_BATCH",
    "PROOF_MAX_BATCH",
    "PROOF_SHARE",
    "PROOF_MIN_S",
    "BATCH_DELAY_S",
    "WORKER_TTL_S",
    "WORKER_START_TIMEOUT_S",
    "REQUEST_TIMEOUT_S",
    "LOAD_TIMEOUT_S",
    "NODE_DRAIN_S",
    "START_TIMEOUT_S",
    "RETAIN_PER_NAME",
    "STORE_POLL_S",
    "WAVE_LEASE_S",
    "STOP_REPORT_LINGER_MS",
    "STORE_CONNECT_TIMEOUT_S",
    "STORE_READ_TIMEOUT_S",
    "STORE_CHUNK_GRACE_S",
    "PARITY_RTOL",
    "PARITY_ATOL",
]

PROTOCOL_VERSION = 1

CHUNK_BYTES = 4 * 1024 * 1024  # archive bytes per chunk before compression
CLEVEL = 5
AUTO_MIN_GAIN = 1.05  # `auto` compresses only when it saves at least 5 %
AUTO_SAMPLE_BYTES = 8 * 1024 * 1024  # how much of the archive `auto` tries each codec on

HEARTBEAT_INTERVAL_S = 0.5
NODE_LOST_AFTER_S = 5.0  # a node not heard from for this long shows as `lost` (10 missed reports)
NODE_FORGET_AFTER_S = 600.0  # ... and is dropped from the fleet table after this
HUB_TTL_S = 3.0  # silence after which a subscriber re-asks the hub
HUB_UNREACHABLE_S = 30.0  # silence after which a node says its hub is unreachable
REPAIR_IDLE_S = 0.25  # no chunk for this long during assembly -> fetch what is missing
ROOM_CHECK_INTERVAL_S = 1.0  # a cache write that failed: how often the disk's free space is asked
ROOM_MARGIN_BYTES = 1 << 20  # beyond the archive: its manifest, signature and stamp
FETCH_CREDIT = 8  # chunks a subscriber may have requested and not yet received
SUB_RCVHWM = 16  # broadcast messages a node buffers ahead of its reader (chunks are 4 MiB)
FETCH_TIMEOUT_S = 2.0  # an outstanding fetch with no answer for this long is asked again
CORRUPT_FETCHES_MAX = 3  # fetched chunks failing their digest before a release is given up
STALL_FACTOR = 8  # a broadcast is stalled after this many times its mean chunk gap (or the idle time)

MAX_ARCHIVE_BYTES = 8 * 1024**3
MAX_CHUNKS = 65536
MAX_CHUNK_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # the manifest carries example inputs and outputs
MAX_REQUEST_BYTES = 256 * 1024 * 1024
MAX_REQUEST_TENSORS = 64

NODE_QUEUE_MAX = 1024  # requests a node holds while no worker is free
NODE_QUEUE_TIMEOUT_S = 10.0  # a queued request gets `unavailable` after this
PROOF_SHARE = 0.2  # the batching proof's budget: this share of compile + parity (publish)
PROOF_MIN_S = 0.25  # ... but never less: a model compiled in 0.1 s still gets a proof
PROOF_MAX_BATCH = 64  # the largest batch publish proves a model batch-invariant on
MAX_BATCH = 32  # rows a node joins into one forward (of a release proven batchable); 1 = off
BATCH_DELAY_S = 0.0002  # the longest a request waits for others to join it (only under load)
WORKER_TTL_S = 5.0  # an idle worker silent this long is killed and restarted
WORKER_START_TIMEOUT_S = 120.0  # a spawned worker has this long to say READY (imports torch)
REQUEST_TIMEOUT_S = 120.0  # a worker busy on one request this long is taken for hung
LOAD_TIMEOUT_S = 600.0
NODE_DRAIN_S = 10.0  # a stopping node answers what it holds for at most this long

LINGER_MS = 0
START_TIMEOUT_S = 10.0
RETAIN_PER_NAME = 5
WAVE_LEASE_S = 5.0  # a hub driving a rollout in waves on a shared store renews its lease this far ahead
STORE_POLL_S = 1.0  # how often a hub on a shared store (S3) reads what other hubs stored
STOP_REPORT_LINGER_MS = 500  # a stopping node's last (``stopped``) reports get this long to leave
STORE_CONNECT_TIMEOUT_S = 2.0  # an S3 store not answering this soon is down (the hub says so)
STORE_READ_TIMEOUT_S = 30.0
STORE_CHUNK_GRACE_S = 3600.0  # an unreferenced S3 chunk younger than this may be a put in flight

PARITY_RTOL = {"float64": 1e-7, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2}
PARITY_ATOL = {"float64": 1e-9, "float32": 1e-6, "float16": 1e-3, "bfloat16": 1e-2}  # ~1 ulp near 1.0


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True)
class Limits:
    """Hard limits, each checked before anything is allocated from a peer's declared size."""

    max_archive_bytes: int = MAX_ARCHIVE_BYTES
    max_chunks: int = MAX_CHUNKS
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_request_tensors: int = MAX_REQUEST_TENSORS
    fetch_credit: int = FETCH_CREDIT  # chunks one peer may ask for in one request
    max_store_jobs: int = 2  # PUBLISH/ROLLBACK a hub holds at once; each holds its whole release
    max_fleet_entries: int = 10_000  # (node, model) rows in a hub's fleet table

    @classmethod
    def parse(cls, pairs: Sequence[str]) -> Limits:
        """``["max_archive_bytes=2G", ...]`` -> Limits (K/M/G suffixes are powers of 1024).
        Raises ValueError naming the pair and what is wrong with it."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, int] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in names:
                raise ValueError(f"{pair!r}: use NAME=VALUE with NAME one of {', '.join(sorted(names))}")
            scale = _UNITS.get(value[-1:].upper(), 1)
            try:
                values[key] = int(float(value[:-1] if scale > 1 else value) * scale)
            except ValueError:
                raise ValueError(f"{pair!r}: {value!r} is not a number") from None
            if values[key] <= 0:
                raise ValueError(f"{pair!r}: a limit must be positive")
        return cls(**values)

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a hub or node accepts (ZMQ_MAXMSGSIZE: libzmq drops the peer
        before buffering more): a chunk with blosc2's header, or a manifest."""
        return max(self.max_chunk_bytes + 64 * 1024, self.max_manifest_bytes)
