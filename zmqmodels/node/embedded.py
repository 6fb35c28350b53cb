"""The embedded model host: a :class:`~zmqmodels.node.follower.Follower` plus one
:class:`~zmqmodels.model.slot.ModelSlot` per model, inside any process (a worker, a notebook).

Each verified release is loaded (``torch.jit.load``, example check, warm-up) on the follower's
delivery thread and swapped in; :meth:`Subscriber.predict`, :meth:`Subscriber.model`,
:meth:`Subscriber.version` and :meth:`Subscriber.wait_until_serving` read it.

**A load stalls the whole process**: ``torch.jit.load`` holds the GIL for its duration
(~0.15 s per 100 MB from a file, ~2.5x that from memory), so every thread of the process,
inference included, waits. Give ``cache`` (loads from a file, faster) and ``swap_when``
(runs before each load; it may block until a quiet moment, or return False to skip that
release) to choose when to pay it, or run ``zmqmodels serve``, which routes requests around a
loading worker process.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zmq

from .. import defaults
from ..errors import DeadlineError, NotReadyError, ZmqModelsError
from ..model.slot import Loaded, ModelSlot
from ..protocol import ModelState
from ..release.cache import Cache
from ..release.manifest import Manifest, validate_name
from ..release.signing import Trust
from .delivery import ReleaseCallback
from .follower import Follower, FollowOptions

__all__ = ["Subscriber"]

log = logging.getLogger("zmqmodels.embedded")


class Subscriber:
    """Follow ``models`` from the hub at ``hub`` and serve them in this process.

    ``on_release(manifest, archive)``, if given, also runs for every verified release (before
    it is loaded; ``load=False`` skips loading: a receive-only follower). ``device`` is where
    models load (``cpu``, ``cuda:0``). ``cache`` keeps each verified release and serves the
    newest at start, before the hub answers; ``follow`` (trust, CURVE, labels, limits, timing) is
    the :class:`~zmqmodels.node.follower.FollowOptions` of its follower.
    """

    def __init__(
        self,
        hub: str | Sequence[str],
        models: Sequence[str],
        *,
        on_release: ReleaseCallback | None = None,
        load: bool = True,
        device: str = "",
        known: dict[str, int] | None = None,
        cache: Cache | str | Path | None = None,
        swap_when: Callable[[Manifest], bool | None] | None = None,
        follow: FollowOptions | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.device = device or "cpu"
        self.cache = Cache(cache) if isinstance(cache, str | Path) else cache
        follow = follow or FollowOptions()
        self.trust = follow.trust or Trust()
        self._user_on_release = on_release
        self._load = load
        self._swap_when = swap_when
        self._slots = {validate_name(n): ModelSlot() for n in models}
        self._swap_listeners: list[Callable[[str, Manifest, Manifest | None], None]] = []
        self._known = dict(known or {})
        self._follow = dataclasses.replace(follow, device=self.device, trust=self.trust)
        self._context = context
        self._hub = hub
        self.follower: Follower | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = defaults.START_TIMEOUT_S) -> Subscriber:
        if self.follower is not None:
            raise ZmqModelsError("a Subscriber can be started once")
        if self.cache is not None:
            self.cache.lock()  # one process per cache directory
        serving = self._load_cached() if self._load and self.cache is not None else {}
        known = {**self._known, **{n: m.seq for n, m in serving.items()}}
        self.follower = Follower(self._hub, list(self._slots), on_release=self._on_release,
                                 accept=self._accept if self._load else None, known=known,
                                 serving={n: (m.seq, m.label) for n, m in serving.items()},
                                 options=self._follow, cache=self.cache, context=self._context)
        self.follower.start(timeout)
        return self

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        if self.cache is not None:
            self.cache.unlock()

    def __enter__(self) -> Subscriber:
        return self.start() if self.follower is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the follower's view -----------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._slots)

    @property
    def node_id(self) -> str:
        return self._running().node_id

    @property
    def stats(self) -> Any:
        return self._running().stats

    @property
    def hub_seen(self) -> float:
        return self._running().hub_seen

    def report(self, name: str, state: ModelState | str, *, seq: int | None = None,
               label: str | None = None, reason: str = "") -> None:
        self._running().report(name, state, seq=seq, label=label, reason=reason)

    def _running(self) -> Follower:
        if self.follower is None:
            raise ZmqModelsError("the Subscriber is not started")
        return self.follower

    # -- loading (delivery thread) -----------------------------------------------------------
    def _load_cached(self) -> dict[str, Manifest]:
        """Serve the cached release of each model at once, before the hub answers."""
        from ..model.loader import load_release

        assert self.cache is not None
        serving = {}
        for name in self._slots:
            found, _ = self.cache.startup(name, trust=self.trust)  # a staged one waits for its follower
            if found is None:
                continue
            m, path = found
            try:
                loaded = load_release(m, path, self.device)
            except ZmqModelsError as exc:
                log.warning("cached %s seq %d unusable: %s", name, m.seq, exc)
                continue
            self._slots[name].swap(loaded)
            serving[name] = m
            log.info("serving cached %s seq %d", name, m.seq)
        return serving

    def _accept(self, m: Manifest) -> bool:
        return self._swap_when is None or self._swap_when(m) is not False

    def _on_release(self, m: Manifest, archive: Any) -> None:
        if self._user_on_release is not None:
            self._user_on_release(m, archive)
        if self._load:
            self._load_and_swap(m, archive)

    def _load_and_swap(self, m: Manifest, archive: Any) -> None:
        from ..model.loader import load_release

        follower = self._running()
        slot = self._slots[m.name]
        follower.report(m.name, ModelState.LOADING, seq=m.seq, label=m.label)
        try:
            source: Any = self.cache.path(m.name, m.seq) if self.cache is not None else archive
            loaded = load_release(m, source, self.device)
        except ZmqModelsError as exc:
            follower.reject(m, str(exc))
            self._report_current(m.name)
            return
        old = slot.swap(loaded)
        follower.report(m.name, ModelState.SERVING, seq=m.seq, label=m.label)
        log.info("%s: %s seq %d serving (load %.3fs, check %.3fs)", follower.node_id, m.name, m.seq,
                 loaded.load_s, loaded.check_s)
        for fn in list(self._swap_listeners):
            try:
                fn(m.name, m, old.manifest if old else None)
            except Exception:
                log.exception("on_swap callback failed")

    def _report_current(self, name: str) -> None:
        cur = self._slots[name].current()
        if cur is None:
            self.report(name, ModelState.IDLE, seq=0, label="")
        else:
            self.report(name, ModelState.SERVING, seq=cur.manifest.seq, label=cur.manifest.label)

    # -- serving API -------------------------------------------------------------------------
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

        from ..model.loader import to_device

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
