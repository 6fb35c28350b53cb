"""The subscriber's network side: receive, repair and verify releases.

One I/O thread owns a SUB (broadcasts) and a DEALER (fetch and reports). Chunks are verified
(XXH3 of the payload) and decompressed straight into one preallocated archive buffer. A gap —
a missed manifest, lost or corrupt chunks, a heartbeat announcing a newer seq, a hub silent
for longer than its TTL — is repaired by fetching exactly what is missing through the hub's
ROUTER, at most ``fetch_credit`` chunks in flight, so a slow node never makes the hub queue
without bound. Releases whose seq is not newer than the one held are ignored.

The archive's sha256 is computed over the in-order prefix as chunks land; a second thread
checks it and hands verified archives to ``on_release(manifest, archive)``, newest first: a consumer slower
than the releases skips the ones it could not take in time.

Embedded use: without ``on_release`` the subscriber loads each verified release itself
(``torch.jit.load``, example check, warm-up) and swaps it into a :class:`ModelSlot` per
model; :meth:`predict`, :meth:`model`, :meth:`version` and :meth:`wait_until_serving` read
it. **A load stalls the whole process**: ``torch.jit.load`` holds the GIL for its duration
(~0.15 s per 100 MB from a file, ~2.5x that from memory), so every thread of the process,
inference included, waits. Give ``cache`` (loads from a file, faster) and ``swap_when`` (runs
before each load; it may block until a quiet moment, or return False to skip that release) to
choose when to pay it, or run ``zmqmodels serve``, which routes requests around a loading
worker process.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
import zmq

from . import defaults
from . import protocol as P
from .cache import Cache
from .commands import Commands
from .curve import Curve
from .defaults import Limits
from .errors import (
    DeadlineError,
    IntegrityError,
    LimitError,
    NotReadyError,
    ProtocolError,
    SignatureError,
    ZmqModelsError,
)
from .release import Manifest, decode_manifest, decompress_chunk, validate_name
from .signing import Trust
from .slot import Loaded, ModelSlot
from .tuning import lower_thread_priority, tune_malloc

__all__ = ["Subscriber", "ReleaseCallback"]

log = logging.getLogger("zmqmodels.subscriber")
ReleaseCallback = Callable[[Manifest, Any], None]  # archive: a buffer of manifest.archive_bytes


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _BufferPool:
    """Archive buffers per model, reused across releases: first-touch page faults, not copies,
    bound the receive rate (fresh pages: ~1.4 GB/s for 4 nodes on 2 cores; MAP_POPULATE ~4.8;
    a reused buffer ~23). Two per model: one assembling while the other is being delivered."""

    def __init__(self, per_model: int = 2) -> None:
        self._free: dict[str, list[mmap.mmap]] = {}
        self._lock = threading.Lock()
        self._per_model = per_model

    def take(self, name: str, size: int) -> mmap.mmap:
        with self._lock:
            free = self._free.get(name, [])
            for i, buf in enumerate(free):
                if size <= len(buf) <= 2 * size + (64 << 20):
                    return free.pop(i)
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE
        return mmap.mmap(-1, max(size, 1), flags=flags)

    def give(self, name: str, buf: mmap.mmap) -> None:
        with self._lock:
            free = self._free.setdefault(name, [])
            free.append(buf)
            del free[: -self._per_model]


@dataclass
class _Assembly:
    manifest: Manifest
    raw: bytes  # the manifest as received (what its signature covers)
    signature: bytes
    buf: mmap.mmap
    missing: set[int]
    requested: dict[int, float] = field(default_factory=dict)  # index -> when asked
    last_progress: float = field(default_factory=time.monotonic)
    repairing: bool = False
    corrupt_fetches: int = 0  # fetched (not broadcast) chunks that failed their digest
    hashed: int = 0  # chunks [0, hashed) are in the running sha256

    def __post_init__(self) -> None:
        self.view = memoryview(self.buf)
        self.sha = hashlib.sha256()

    def hash_prefix(self) -> None:
        """Extend the archive sha256 over every chunk that now completes the in-order prefix,
        so the digest is ready when the last chunk lands (not ~0.6 s/GB after it)."""
        m = self.manifest
        while self.hashed < m.chunk_count and self.hashed not in self.missing:
            start, length = m.chunk_span(self.hashed)
            self.sha.update(self.view[start:start + length])
            self.hashed += 1


@dataclass
class _Model:
    name: str
    done_seq: int = 0  # newest seq assembled (being verified, verified or rejected)
    rejected: set[int] = field(default_factory=set)
    refused: int = -1  # XXH3 of the last manifest refused (signature, limits): quiets repeats
    asm: _Assembly | None = None
    asked_seq: int = -1
    asked_at: float = 0.0
    # what is reported to the hub
    state: str = "idle"
    seq: int = 0
    label: str = ""
    reason: str = ""


class Subscriber:
    """Follow the releases of ``models`` from the hub at ``hub`` (its one address).

    ``on_release(manifest, archive)`` runs on the subscriber's delivery thread for every
    verified release; ``archive`` is a read-write memoryview valid only until the callback
    returns (its buffer is reused for a later release): copy or write it out to keep it.
    Report what became of the release with :meth:`report`. ``known`` maps model names
    to the seq already held (e.g. from a local cache) so only newer releases are fetched.

    ``trust`` (keys) accepts only releases signed by one of them: a manifest that fails is
    refused before a byte of its archive is allocated, and the hub hears why. ``cache``
    keeps every verified release (signature included) before it is loaded or handed to
    ``on_release``. ``curve`` connects both sockets with CURVE to the hub's key.
    """

    def __init__(
        self,
        hub: str,
        models: Sequence[str],
        *,
        on_release: ReleaseCallback | None = None,
        node_id: str | None = None,
        device: str = "",
        known: dict[str, int] | None = None,
        limits: Limits | None = None,
        context: zmq.Context | None = None,
        rcvhwm: int = defaults.SUB_RCVHWM,
        report_interval_s: float = defaults.HEARTBEAT_INTERVAL_S,
        hub_ttl_s: float = defaults.HUB_TTL_S,
        repair_idle_s: float = defaults.REPAIR_IDLE_S,
        load: bool = True,
        cache: Cache | str | Path | None = None,
        swap_when: Callable[[Manifest], bool | None] | None = None,
        tune_malloc: bool = True,
        background_nice: int = 0,
        trust: Trust | None = None,
        curve: Curve | None = None,
    ) -> None:
        self.hub = hub
        self.pub_address = P.pub_endpoint(hub)
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.device = device or "cpu"
        self.limits = limits or Limits()
        self.cache = Cache(cache) if isinstance(cache, str | Path) else cache
        self.trust = trust or Trust()
        self.curve = curve
        self._swap_when = swap_when
        self._tune_malloc = tune_malloc
        self._nice = background_nice  # a serving node runs its subscriber below its broker
        self._slots = {validate_name(n): ModelSlot() for n in models}
        self._swap_listeners: list[Callable[[str, Manifest, Manifest | None], None]] = []
        self._embedded = on_release is None and load  # loads and swaps models itself
        self._on_release = self._load_and_swap if self._embedded else on_release
        self._ctx = context or zmq.Context.instance()
        self._rcvhwm = rcvhwm
        self._report_interval_s = report_interval_s
        self._hub_ttl_s = hub_ttl_s
        self._repair_idle_s = repair_idle_s
        self._models = {validate_name(n): _Model(n) for n in models}
        for name, seq in (known or {}).items():
            if name in self._models:
                self._models[name].done_seq = self._models[name].seq = seq
        self._commands = Commands(self._ctx, "sub")
        self._mailbox: dict[str, tuple[_Assembly, str]] = {}
        self._pool = _BufferPool()
        self._mail_cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._started = self._closed = False
        self.stats: Counter[str] = Counter()
        self.hub_seen = 0.0  # monotonic time of the last message from the hub

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Subscriber:
        if self._started:
            raise ZmqModelsError("a Subscriber can be started once")
        self._started = True
        if self._tune_malloc:
            tune_malloc()
        if self._embedded and self.cache is not None:
            self._load_cached()
        self._threads = [threading.Thread(target=self._run, name="zmqmodels-sub-io", daemon=True),
                         threading.Thread(target=self._deliver, name="zmqmodels-sub-deliver",
                                          daemon=True)]
        for t in self._threads:
            t.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            self.close()
            raise ZmqModelsError(f"subscriber failed to start: {self._start_error}")
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._mail_cond:
            self._mail_cond.notify_all()
        self._commands.wake()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)

    def __enter__(self) -> Subscriber:
        return self.start() if not self._started else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API for other threads ---------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._models)

    def report(self, name: str, state: str, *, seq: int | None = None, label: str | None = None,
               reason: str = "") -> None:
        """Tell the hub what became of ``name`` (``loaded``, ``serving``, ``rejected`` ...)."""
        if state not in P.STATES:
            raise ValueError(f"unknown state {state!r}")

        def apply() -> None:
            st = self._models[name]
            st.state, st.reason = state, reason
            if seq is not None:
                st.seq = seq
            if label is not None:
                st.label = label
            self._send_report(st)

        self._commands.post(apply)

    # -- plumbing ----------------------------------------------------------------------------
    def _run(self) -> None:
        lower_thread_priority(self._nice)
        ctx = self._ctx
        sub, dealer, wake = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER), self._commands.bind()
        for s in (sub, dealer, wake):
            s.linger = defaults.LINGER_MS
        try:
            # a low mark: the hub's queue shares one buffer across nodes, ours would copy the
            # whole release into fresh pages ahead of the reader
            sub.rcvhwm = self._rcvhwm
            for s in (sub, dealer):  # never buffer a frame bigger than any we accept
                s.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
                if self.curve is not None:
                    self.curve.connect(s)
            sub.setsockopt(zmq.SUBSCRIBE, P.HUB_TOPIC)
            for name in self._models:
                sub.setsockopt(zmq.SUBSCRIBE, P.topic(name))
            sub.connect(self.pub_address)
            dealer.connect(self.hub)
        except Exception as exc:
            self._start_error = exc
            for s in (sub, dealer, wake):
                s.close()
            self._ready.set()
            return
        self._sub, self._dealer = sub, dealer
        self._ready.set()
        poller = zmq.Poller()
        for s in (sub, dealer, wake):
            poller.register(s, zmq.POLLIN)
        now = time.monotonic()
        for st in self._models.values():
            self._ask_manifest(st, 0, now)  # late joiner: ask for the snapshot, do not wait
        next_report = next_tick = now
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if wake in events:
                    self._commands.run_pending(wake)
                for sock, handler in ((sub, self._on_sub), (dealer, self._on_dealer)):
                    if sock not in events:
                        continue
                    for _ in range(256):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            handler(frames)
                        except ZmqModelsError as exc:
                            self.stats[f"dropped_{exc.code}"] += 1
                            log.warning("%s: dropped a message: %s", self.node_id, exc)
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + 0.05
                if now >= next_report:
                    for st in self._models.values():
                        self._send_report(st)
                    next_report = now + self._report_interval_s
        finally:
            for s in (sub, dealer, wake):
                s.close()

    # -- I/O thread: messages ----------------------------------------------------------------
    def _on_sub(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 3:
            raise ProtocolError(f"broadcast of {len(frames)} frame(s)")
        topic, kind = frames[0].bytes, frames[1].bytes
        self.hub_seen = time.monotonic()
        if topic == P.HUB_TOPIC:
            if kind != b"HEARTBEAT":
                raise ProtocolError(f"unexpected {kind[:32]!r} on the hub topic")
            return
        name = topic[:-1].decode(errors="replace")
        if not topic.endswith(b"\0") or name not in self._models:
            raise ProtocolError(f"broadcast on unsubscribed topic {topic[:64]!r}")
        if kind == b"MANIFEST" and len(frames) in (3, 4):
            m = decode_manifest(frames[2].buffer, self.limits, check=False)
            if m.name != name:
                raise ProtocolError(f"manifest for {m.name!r} on topic {name!r}")
            self._on_manifest(m, frames[2], frames[3].bytes if len(frames) == 4 else b"")
        elif kind == b"CHUNK" and len(frames) == 4:
            hdr = P.decode_header(kind, frames[2].buffer)
            if hdr.name != name:
                raise ProtocolError(f"chunk for {hdr.name!r} on topic {name!r}")
            self._on_chunk(hdr, frames[3].buffer, fetched=False)
        elif kind == b"HEARTBEAT" and len(frames) == 3:
            beat = P.decode_header(kind, frames[2].buffer)
            if beat.name == name:
                self._on_beat(beat)
        else:
            raise ProtocolError(f"unexpected broadcast {kind[:32]!r} of {len(frames)} frames")

    def _on_dealer(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        self.hub_seen = time.monotonic()
        if kind == b"MANIFEST" and len(frames) in (2, 3):
            m = decode_manifest(frames[1].buffer, self.limits, check=False)
            st = self._models.get(m.name)
            if st is None:
                raise ProtocolError(f"manifest for unsubscribed {m.name!r}")
            st.asked_seq = -1
            self._on_manifest(m, frames[1], frames[2].bytes if len(frames) == 3 else b"")
        elif kind == b"CHUNK" and len(frames) == 3:
            hdr = P.decode_header(kind, frames[1].buffer)
            if hdr.name not in self._models:
                raise ProtocolError(f"chunk for unsubscribed {hdr.name!r}")
            self._on_chunk(hdr, frames[2].buffer, fetched=True)
        elif kind == b"ERROR" and len(frames) == 2:
            err = P.decode_header(kind, frames[1].buffer)
            self.stats[f"hub_error_{err.code}"] += 1
            st = self._models.get(err.name)
            if st is None:
                log.warning("%s: hub error %s: %s", self.node_id, err.code, err.message)
                return
            st.asked_seq = -1
            if st.asm is not None and err.seq == st.asm.manifest.seq and err.code == "not_found":
                log.warning("%s: hub dropped %s seq %d mid-fetch", self.node_id, err.name, err.seq)
                self._drop_assembly(st)
            elif err.code != "not_found":
                log.warning("%s: hub error %s: %s", self.node_id, err.code, err.message)
        else:
            raise ProtocolError(f"unexpected reply {kind[:32]!r} of {len(frames)} frames")

    def _on_manifest(self, m: Manifest, frame: zmq.Frame, signature: bytes) -> None:
        st = self._models[m.name]
        if m.seq <= st.done_seq or m.seq in st.rejected or (st.asm and st.asm.manifest.seq >= m.seq):
            self.stats["stale_manifest"] += 1  # replays of older releases end here
            return
        raw = frame.bytes
        try:  # before anything is allocated for it
            m.check(self.limits)
            self.trust.verify(m, raw, signature)
        except (LimitError, SignatureError) as exc:
            self._refuse(st, m, raw, exc)
            return
        self._drop_assembly(st)
        st.asm = _Assembly(m, raw, signature, self._pool.take(m.name, m.archive_bytes),
                           set(range(m.chunk_count)))
        self.stats["manifests"] += 1
        st.state, st.seq, st.label, st.reason = "receiving", m.seq, m.label, ""
        self._send_report(st)
        if not st.asm.missing:
            self._complete(st)

    def _refuse(self, st: _Model, m: Manifest, raw: bytes, exc: ZmqModelsError) -> None:
        """A manifest over the limits or without a trusted signature: report it once per
        distinct manifest. The seq is not marked rejected: a forged manifest must not block
        the genuine release of the same seq."""
        self.stats["untrusted" if isinstance(exc, SignatureError) else "too_large"] += 1
        digest = xxhash.xxh3_64_intdigest(raw)
        if digest == st.refused:
            return
        st.refused = digest
        self._report_rejection(st, m, str(exc))

    def _report_rejection(self, st: _Model, m: Manifest, reason: str) -> None:
        """Tell the hub (I/O thread) that ``m`` was rejected and why, then what is held."""
        log.warning("%s: rejected %s seq %d: %s", self.node_id, m.name, m.seq, reason)
        held = (st.state, st.seq, st.label, st.reason)
        st.state, st.seq, st.label, st.reason = "rejected", m.seq, m.label, reason
        self._send_report(st)
        st.state, st.seq, st.label, st.reason = held
        self._send_report(st)

    def _drop_assembly(self, st: _Model) -> None:
        if st.asm is not None:
            st.asm.view.release()
            self._pool.give(st.name, st.asm.buf)
            st.asm = None

    def _on_chunk(self, hdr: P.ChunkHeader, payload: Any, *, fetched: bool) -> None:
        st = self._models[hdr.name]
        asm = st.asm
        now = time.monotonic()
        if asm is None or asm.manifest.seq != hdr.seq:
            if hdr.seq > st.done_seq and hdr.seq not in st.rejected and (
                    asm is None or hdr.seq > asm.manifest.seq):
                self._ask_manifest(st, hdr.seq, now)  # missed the manifest: ask for it
            self.stats["chunk_unexpected"] += 1
            return
        i = hdr.index
        if i >= asm.manifest.chunk_count:
            raise ProtocolError(f"chunk {i} of {hdr.name} seq {hdr.seq} out of range")
        asm.requested.pop(i, None)
        if i not in asm.missing:
            self.stats["chunk_duplicate"] += 1
        else:
            try:
                decompress_chunk(asm.manifest, i, payload, asm.view)
            except IntegrityError as exc:
                self.stats["chunk_corrupt"] += 1
                asm.corrupt_fetches += fetched
                if asm.corrupt_fetches >= defaults.CORRUPT_FETCHES_MAX:
                    # the hub's own copy is bad (or a path rewrites it): stop asking
                    self._drop_assembly(st)
                    st.rejected.add(hdr.seq)
                    self._report_rejection(st, asm.manifest, f"{exc}, from the hub "
                                           f"{asm.corrupt_fetches} times: corrupt at its source")
                    return
                log.warning("%s: %s; fetching it again", self.node_id, exc)
                asm.repairing = True
            else:
                asm.missing.discard(i)
                asm.last_progress = now
                self.stats["chunks_fetched" if fetched else "chunks_broadcast"] += 1
                asm.hash_prefix()
        if not asm.missing:
            self._complete(st)
        elif asm.repairing:
            self._pump(st, now)

    def _on_beat(self, beat: P.Heartbeat) -> None:
        st = self._models[beat.name]
        if beat.seq > st.done_seq and beat.seq not in st.rejected and (
                st.asm is None or st.asm.manifest.seq < beat.seq):
            self._ask_manifest(st, beat.seq, time.monotonic())

    # -- I/O thread: repair ------------------------------------------------------------------
    def _ask_manifest(self, st: _Model, seq: int, now: float) -> None:
        if st.asked_seq >= seq and now - st.asked_at < defaults.FETCH_TIMEOUT_S:
            return
        st.asked_seq, st.asked_at = seq, now
        self.stats["fetch_manifest"] += 1
        self._dealer.send_multipart([b"FETCH_MANIFEST", P.encode(P.FetchManifest(st.name, seq))])

    def _pump(self, st: _Model, now: float) -> None:
        """Keep up to ``fetch_credit`` missing chunks requested; re-ask ones that timed out."""
        asm = st.asm
        if asm is None:
            return
        for i, asked in list(asm.requested.items()):
            if now - asked > defaults.FETCH_TIMEOUT_S:
                del asm.requested[i]
        room = self.limits.fetch_credit - len(asm.requested)
        if room <= 0:
            return
        want = [i for i in sorted(asm.missing) if i not in asm.requested][:room]
        if want:
            for i in want:
                asm.requested[i] = now
            self.stats["fetch_chunks"] += len(want)
            self._dealer.send_multipart([b"FETCH_CHUNKS", P.encode(
                P.FetchChunks(st.name, asm.manifest.seq, want))])

    def _tick(self, now: float) -> None:
        for st in self._models.values():
            asm = st.asm
            if asm is not None:
                if not asm.repairing and now - asm.last_progress > self._repair_idle_s:
                    asm.repairing = True  # the broadcast stopped short: fetch the rest
                    self.stats["repairs"] += 1
                if asm.repairing:
                    self._pump(st, now)
        if self.hub_seen and now - self.hub_seen > self._hub_ttl_s:
            self.hub_seen = now  # ask once per TTL of silence, not on every tick
            self.stats["hub_silent"] += 1
            for st in self._models.values():
                self._ask_manifest(st, 0, now)

    def _complete(self, st: _Model) -> None:
        asm = st.asm
        assert asm is not None
        st.asm = None
        st.done_seq = asm.manifest.seq
        with self._mail_cond:
            older = self._mailbox.get(st.name)
            asm.hash_prefix()
            digest = asm.sha.hexdigest()
            # replaces an older, undelivered one
            self._mailbox[st.name] = (asm, digest)
            self._mail_cond.notify()
        asm.view.release()
        if older is not None:
            self._pool.give(st.name, older[0].buf)

    def _send_report(self, st: _Model) -> None:
        r = P.Report(node=self.node_id, model=st.name, state=st.state, seq=st.seq, label=st.label,
                     reason=st.reason[:500], host=socket.gethostname(), pid=os.getpid(),
                     device=self.device)
        self._dealer.send_multipart([b"REPORT", P.encode(r)])

    # -- delivery thread ---------------------------------------------------------------------
    def _deliver(self) -> None:
        lower_thread_priority(self._nice)
        while not self._stop.is_set():
            with self._mail_cond:
                while not self._mailbox and not self._stop.is_set():
                    self._mail_cond.wait(0.5)
                if self._stop.is_set():
                    return
                name = next(iter(self._mailbox))
                asm, digest = self._mailbox.pop(name)
            m, buf = asm.manifest, asm.buf
            archive = memoryview(buf)[: m.archive_bytes]
            try:
                self._deliver_one(asm, archive, digest)
            finally:
                try:
                    archive.release()
                except BufferError:  # the consumer kept a view, against the contract: don't reuse
                    continue
                self._pool.give(m.name, buf)

    def _deliver_one(self, asm: _Assembly, archive: memoryview, digest: str) -> None:
        m = asm.manifest
        if digest != m.archive_sha256:
            self.stats["archive_corrupt"] += 1
            self._reject(m, "archive sha256 mismatch")
            return
        self.stats["verified"] += 1
        self.report(m.name, "verified", seq=m.seq, label=m.label)
        if self._on_release is not None:
            try:
                if self._embedded and self._swap_when is not None and self._swap_when(m) is False:
                    raise ZmqModelsError("declined by swap_when")
                if self.cache is not None:  # signed bytes and all, before anything loads it
                    self.cache.put(m, archive, asm.raw, asm.signature)
                self._on_release(m, archive)
            except Exception as exc:
                if not isinstance(exc, ZmqModelsError):
                    log.exception("%s: consumer failed on %s seq %d", self.node_id, m.name, m.seq)
                self._reject(m, f"{type(exc).__name__}: {exc}")
                if self._slots[m.name].current() is not None:
                    self._report_current(m.name)

    def _reject(self, m: Manifest, reason: str) -> None:
        log.warning("%s: rejected %s seq %d: %s", self.node_id, m.name, m.seq, reason)

        def apply() -> None:
            self._models[m.name].rejected.add(m.seq)

        self._commands.post(apply)
        self.report(m.name, "rejected", seq=m.seq, label=m.label, reason=reason)

    # -- embedded loading (delivery thread) ---------------------------------------------------
    def _load_cached(self) -> None:
        """Serve the cached release of each model at once, before the hub answers."""
        from .loader import load_release

        assert self.cache is not None
        for name, st in self._models.items():
            found = self.cache.latest(name, trust=self.trust)
            if found is None:
                continue
            m, path = found
            try:
                loaded = load_release(m, path, self.device)
            except ZmqModelsError as exc:
                log.warning("%s: cached %s seq %d unusable: %s", self.node_id, name, m.seq, exc)
                continue
            self._slots[name].swap(loaded)
            st.done_seq = max(st.done_seq, m.seq)
            st.state, st.seq, st.label = "serving", m.seq, m.label
            log.info("%s: serving cached %s seq %d", self.node_id, name, m.seq)

    def _load_and_swap(self, m: Manifest, archive: Any) -> None:
        from .loader import load_release

        slot = self._slots[m.name]
        self.report(m.name, "loading", seq=m.seq, label=m.label)
        try:
            source: Any = self.cache.path(m.name, m.seq) if self.cache is not None else archive
            loaded = load_release(m, source, self.device)
        except ZmqModelsError as exc:
            self._reject(m, str(exc))
            self._report_current(m.name)
            return
        old = slot.swap(loaded)
        self.report(m.name, "serving", seq=m.seq, label=m.label)
        log.info("%s: %s seq %d serving (load %.3fs, check %.3fs)", self.node_id, m.name, m.seq,
                 loaded.load_s, loaded.check_s)
        for fn in list(self._swap_listeners):
            try:
                fn(m.name, m, old.manifest if old else None)
            except Exception:
                log.exception("on_swap callback failed")

    def _report_current(self, name: str) -> None:
        cur = self._slots[name].current()
        if cur is None:
            self.report(name, "idle", seq=0, label="")
        else:
            self.report(name, "serving", seq=cur.manifest.seq, label=cur.manifest.label)

    # -- embedded API ------------------------------------------------------------------------
    def current(self, name: str) -> Loaded:
        """The model serving ``name`` now; raises :class:`NotReadyError` if none yet."""
        slot = self._slots.get(name)
        if slot is None:
            raise NotReadyError(f"not subscribed to {name!r}")
        cur = slot.current()
        if cur is None:
            raise NotReadyError(f"no release of {name!r} loaded yet")
        return cur

    def predict(self, name: str, *inputs: Any) -> Any:
        """Run the newest valid model of ``name`` on ``inputs`` (moved to its device)."""
        import torch

        from .loader import to_device

        cur = self.current(name)
        with torch.inference_mode():
            return cur.module(*to_device(inputs, cur.device))

    @contextmanager
    def model(self, name: str) -> Iterator[Any]:
        """Hold one version for a block of calls: ``with sub.model("m") as m: m(x); m(y)``."""
        cur = self.current(name)
        yield cur.module

    def version(self, name: str) -> tuple[str, int] | None:
        """``(label, seq)`` serving for ``name``, or None."""
        slot = self._slots.get(name)
        cur = slot.current() if slot else None
        return cur.version if cur else None

    def wait_until_serving(self, name: str, timeout: float, *, seq: int | None = None) -> Loaded:
        """Block until ``name`` serves (at ``seq`` or newer, if given); :class:`DeadlineError` else."""
        slot = self._slots[name]
        if not slot.wait(lambda cur: cur is not None and (seq is None or cur.manifest.seq >= seq),
                         timeout):
            raise DeadlineError(f"{name} not serving{f' seq {seq}' if seq else ''} after {timeout}s")
        return self.current(name)

    def on_swap(self, callback: Callable[[str, Manifest, Manifest | None], None]) -> None:
        """Call ``callback(name, new_manifest, old_manifest)`` after each swap."""
        self._swap_listeners.append(callback)
