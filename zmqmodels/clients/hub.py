"""A client for the hub's control requests (publish, rollback, status), as the CLI uses it.

Each request opens its own DEALER, waits for one reply under a deadline and closes the socket
(linger 0), so a dead hub costs a timeout, never a hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from .. import protocol as P
from ..core.fleet import wait_for, wait_rollout
from ..core.waves import check_plan
from ..defaults import Limits
from ..errors import DeadlineError, ProtocolError, RemoteError
from ..release.manifest import Manifest, Release, decode_manifest, rollback_manifest, stage_release

if TYPE_CHECKING:
    from ..release.signing import SigningKey
    from ..transport.curve import Curve

from .client import Link

__all__ = ["HubClient"]

log = logging.getLogger(__name__)


class HubClient:
    """Talk to a hub at its one address: ``HubClient("tcp://hub:5555").status()``; or to
    hubs on one shared store, tried in turn: ``HubClient(["tcp://hub-a:5555", "tcp://hub-b:5555"])``
    (a request goes to the next hub when one does not answer; a PUBLISH or ROLLBACK only when the
    hub never took it, so a release is not stored twice)."""

    def __init__(self, hub: str | Sequence[str], *, timeout: float = 10.0, context: zmq.Context | None = None,
                 curve: Curve | None = None) -> None:
        self.hubs = [hub] if isinstance(hub, str) else list(hub)
        self.hub = ", ".join(self.hubs)
        self.timeout = timeout
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._weights: Any = None  # the bases and in-flight updates of publish_weights

    def __enter__(self) -> HubClient:
        return self  # each request has its own socket: nothing to open or close

    def __exit__(self, *exc: object) -> None:
        return None

    def _request(self, frames: list[Any], expect: type, timeout: float | None, *,
                 extra: int = 0) -> Any:
        timeout = self.timeout if timeout is None else timeout
        once = P.KINDS.get(bytes(frames[0])) in (P.Publish, P.Rollback)  # not to be stored twice
        failures: list[str] = []
        for hub in self.hubs:
            try:
                reply = self._exchange(hub, frames, timeout, once)
                break
            except DeadlineError as exc:
                failures.append(str(exc))
                if once and str(exc).startswith("no reply") and len(self.hubs) > 1:
                    raise DeadlineError(f"{exc}: it may have taken the release; see `releases` before "
                                        "publishing again") from None
        else:
            raise DeadlineError("; ".join(failures))
        hdr, payload = P.unpack(reply)
        if isinstance(hdr, P.ErrorReply):
            raise RemoteError(hdr.code, hdr.message, hdr.retryable)
        if not isinstance(hdr, expect) or len(payload) != extra:
            raise ProtocolError(f"unexpected reply {type(hdr).__name__} from hub")
        return (hdr, *payload) if extra else hdr

    def _exchange(self, hub: str, frames: list[Any], timeout: float, once: bool) -> list[bytes]:
        """One request to one hub: its reply, or :class:`DeadlineError` saying why none came."""
        # with several hubs the socket is IMMEDIATE: nothing is queued for a hub that is down
        link = Link(self._ctx, zmq.DEALER, hub, self.curve, immediate=len(self.hubs) > 1)
        hint = " (CURVE: is this key allowed there?)" if self.curve else ""
        deadline = time.monotonic() + timeout
        try:
            # a refused CURVE handshake drops the pipe: a blocking send would wait for ever
            while not link.sock.poll(20, zmq.POLLOUT):
                if link.refused():
                    raise DeadlineError(f"hub {hub} refuses connections (nothing listens there?)")
                if time.monotonic() > deadline:
                    raise DeadlineError(f"could not reach hub {hub} within {timeout:g}s{hint}")
            try:
                link.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                raise DeadlineError(f"could not reach hub {hub} within {timeout:g}s{hint}") from None
            while not link.sock.poll(20):
                if link.refused():
                    raise DeadlineError(f"hub {hub} refuses connections (nothing listens there?)")
                if time.monotonic() > deadline:
                    raise DeadlineError(f"no reply from hub {hub} within {timeout:g}s{hint}")
            return link.sock.recv_multipart()
        finally:
            link.close()

    def reserve(self, name: str, base: str = "", timeout: float | None = None) -> tuple[int, bytes]:
        """The next seq of ``name``, held for a release about to be signed; with ``base`` (a
        label or seq), also that stored release's manifest."""
        hdr, raw = self._request(P.pack(P.Reserve(name, base)), P.Reserved, timeout, extra=1)
        return hdr.seq, raw

    def publish(self, release: Release, timeout: float | None = 120.0, *,
                signing_key: SigningKey | None = None, staged: bool = False,
                plan: P.WavePlan | None = None, rebase: bool = True,
                reuse_label: bool = False) -> P.Published:
        """Hand a release to the hub, which verifies, stores and broadcasts it. With
        ``signing_key`` it is signed first, as the seq the hub reserves for it. ``staged``:
        nodes cache it but serve it only once activated; ``plan`` (implies staged): the hub
        activates it wave by wave (watch it with :meth:`wait_rollout`). ``rebase``: a release
        of the code the fleet serves is first rebuilt on that release (:meth:`prepare`), so
        only the tensors that changed move. A label already on a stored release of the model
        is refused by the hub unless ``reuse_label``."""
        check_plan(plan)
        if rebase and not release.signature:
            release, line = self.prepare(release, timeout=timeout)
            log.info("publish %s: %s", release.manifest.name, line)
        if staged or plan:
            release = stage_release(release)
        if signing_key is not None and not release.signature:
            release = signing_key.seal(release, self.reserve(release.manifest.name)[0])
        hdr = P.Publish(release.signature, plan=plan, reuse_label=reuse_label)
        frames = P.pack(hdr, release.manifest_bytes, *release.chunks)
        return self._request(frames, P.Published, timeout)

    def prepare(self, release: Release, *, timeout: float | None = None,
                status: P.StatusReply | None = None) -> tuple[Release, str]:
        """``release`` rebuilt on the release of its model the fleet serves, when both hold the
        same code (:func:`zmqmodels.release.rebase.rebase`: the base's chunking, codec and unchanged
        chunks, so only changed tensors move and nodes apply it into the module they serve),
        and a line saying what was done or why it was sent whole."""
        if not release.manifest.tensors:
            return release, "whole release: it describes no tensors"
        return self._publisher(timeout).rebase(release, status)

    def base(self, name: str, *, timeout: float | None = None,
             status: P.StatusReply | None = None) -> Release | None:
        """The release of ``name`` that weights updates and deltas build on (one that serves,
        never one the fleet refused: :func:`~zmqmodels.core.fleet.base_seq`), fetched whole;
        None if the hub stores none."""
        base = self._publisher(timeout).base(name, status)
        return base.release if base is not None else None

    def base_of(self, manifest: Manifest, *, timeout: float | None = None) -> Any:
        """The stored release ``manifest`` describes, fetched whole, as a
        :class:`~zmqmodels.release.rebase.Base` to build on (kept for later updates of its model)."""
        return self._publisher(timeout).held(manifest)

    def _publisher(self, timeout: float | None) -> Any:
        if self._weights is None:
            from ..model.weights import WeightsPublisher

            self._weights = WeightsPublisher(_Timed(self, timeout))
        return self._weights

    def fetch(self, name: str, seq: int = 0, timeout: float | None = None, *,
              manifest_only: bool = False) -> Release:
        """Release ``seq`` of ``name`` (0: the newest stored) as the hub serves it to nodes:
        FETCH_MANIFEST, then FETCH_CHUNKS within the fetch credit (``manifest_only``: no chunks).
        The chunks are checked when the archive is read (:meth:`Release.archive`)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        s = self._ctx.socket(zmq.DEALER)
        s.linger = 0

        def ask(frames: list[Any], replies: int) -> list[list[Any]]:
            s.send_multipart(frames, copy=False)
            got = []
            while len(got) < replies:
                if not s.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    raise DeadlineError(f"no reply from hub {self.hub} within {timeout:g}s")
                got.append(s.recv_multipart())
                hdr, _ = P.unpack(got[-1])
                if isinstance(hdr, P.ErrorReply):
                    raise RemoteError(hdr.code, hdr.message, hdr.retryable)
            return got

        try:
            if self.curve is not None:
                self.curve.connect(s)
            s.connect(self.hub)
            (reply,) = ask(P.pack(P.FetchManifest(name, seq)), 1)
            _, payload = P.unpack(reply)
            m = decode_manifest(payload[0])
            raw, signature = bytes(payload[0]), bytes(payload[1]) if len(payload) > 1 else b""
            chunks: list[Any] = [None] * m.chunk_count
            credit = Limits().fetch_credit
            for at in range(0, 0 if manifest_only else m.chunk_count, credit):
                indices = list(range(at, min(at + credit, m.chunk_count)))
                for frames in ask(P.pack(P.FetchChunks(name, m.seq, indices)), len(indices)):
                    hdr, payload = P.unpack(frames)
                    if not isinstance(hdr, P.ChunkHeader) or hdr.seq != m.seq or hdr.index >= m.chunk_count:
                        raise ProtocolError(f"unexpected {type(hdr).__name__} while fetching {name}")
                    chunks[hdr.index] = payload[0]
        finally:
            s.close()
        return Release(m, tuple(chunks) if not manifest_only else (), raw, signature)

    def publish_weights(self, name: str, weights: Any, *, wait: bool = True, label: str = "",
                        timeout: float | None = 120.0, signing_key: SigningKey | None = None,
                        staged: bool = False, plan: P.WavePlan | None = None,
                        metadata: dict[str, str] | None = None,
                        timings: dict[str, float] | None = None, partial: bool = True,
                        reuse_label: bool = False) -> Any:
        """Publish new weights for ``name`` in the code of the release the fleet serves
        (:meth:`base`), without recompiling (:mod:`zmqmodels.model.weights`): ``weights`` is an
        ``nn.Module`` of the same architecture (its outputs must match the release's code on
        the examples) or a state dict (nested under ``state_dict``/``model`` and the DDP
        ``module.`` prefix are unwrapped); with ``partial`` (the default) a dict may name a
        subset, the other tensors keep their bytes. Names, dtypes and shapes must match; NaN or
        Inf is refused before anything is sent. Without ``label`` it is ``<base>+w<seq>``.
        Returns :class:`Published`; ``wait=False`` returns a ``Future`` of it at once (one
        update in flight per name; a newer one cancels one still waiting)."""
        return self._publisher(timeout).publish(
            name, weights, wait=wait, label=label, metadata=metadata, timings=timings, partial=partial,
            timeout=timeout, signing_key=signing_key, staged=staged, plan=plan, reuse_label=reuse_label)

    def activate(self, name: str, seq: int, *, nodes: list[str] | None = None,
                 labels: list[str] | None = None, timeout: float | None = None) -> P.Activated:
        """Serve staged release ``seq`` on ``nodes`` / nodes carrying ``labels`` (neither: all)."""
        return self._request(P.pack(P.Activate(name, seq, list(nodes or []), list(labels or []))),
                             P.Activated, timeout)

    def wait_rollout(self, name: str, seq: int, timeout: float, poll_s: float = 0.2, *,
                     on_status: Callable[[P.StatusReply], None] | None = None
                     ) -> tuple[P.WaveStatus | None, P.StatusReply]:
        """:func:`wait_rollout` on this hub."""
        return wait_rollout(self.status, name, seq, timeout, clock=time.monotonic,
                            pause=lambda s: time.sleep(min(s, poll_s)), on_status=on_status)

    def rollback(self, name: str, to: str, timeout: float | None = 60.0, *,
                 signing_key: SigningKey | None = None) -> P.Published:
        """Publish stored content of ``name`` (by label or seq) again under a new seq; with
        ``signing_key``, signed anew here (the hub needs no key)."""
        signed: tuple[Any, ...] = ()
        if signing_key is not None:
            seq, raw = self.reserve(name, to)
            sealed = signing_key.seal(Release(rollback_manifest(decode_manifest(raw)), ()), seq)
            signed = (sealed.manifest_bytes, sealed.signature)
        return self._request(P.pack(P.Rollback(name, to), *signed), P.Published, timeout)

    def pin(self, name: str, to: str, *, on: bool = True, timeout: float | None = None) -> P.Pinned:
        """Keep release ``to`` (a label or seq) of ``name`` through retention (``on``), or not."""
        return self._request(P.pack(P.Pin(name, to, on)), P.Pinned, timeout)

    def releases(self, name: str = "", timeout: float | None = None) -> list[P.ReleaseInfo]:
        """The stored releases of ``name`` (every model if empty), oldest first."""
        return self._request(P.pack(P.ReleasesRequest(name)), P.ReleasesReply, timeout).releases

    def status(self, timeout: float | None = None) -> P.StatusReply:
        return self._request(P.pack(P.StatusRequest()), P.StatusReply, timeout)

    def wait_for(self, name: str, seq: int, count: int, timeout: float,
                 poll_s: float = 0.2, *, staged: bool = False,
                 on_status: Callable[[P.StatusReply], None] | None = None) -> tuple[bool, P.StatusReply]:
        """:func:`wait_for` on this hub, polling every ``poll_s``."""
        return wait_for(self.status, name, seq, count, timeout, clock=time.monotonic,
                        pause=lambda s: time.sleep(min(s, poll_s)), on_status=on_status, staged=staged)


class _Timed:
    """A :class:`HubClient` whose fetches use the deadline the caller gave."""

    def __init__(self, client: HubClient, timeout: float | None) -> None:
        self._client, self._timeout = client, timeout

    def status(self) -> P.StatusReply:
        return self._client.status(timeout=self._timeout)

    def fetch(self, name: str, seq: int = 0, *, manifest_only: bool = False) -> Release:
        return self._client.fetch(name, seq, timeout=self._timeout, manifest_only=manifest_only)

    def publish(self, release: Release, **kw: Any) -> P.Published:
        return self._client.publish(release, **kw)
