"""What one worker process holds: a :class:`ModelSlot` per model, and how it takes a new
release from the node's cache.

A release of new code is loaded (``torch.jit.load`` from the cache by path, holding the GIL:
the front routes around a loading worker). A weights-only update of the code it serves is
written into a *spare* module on a background thread while the worker goes on answering
requests with the serving one, then swapped in by reference between two requests
(:meth:`Holdings.load` returns :class:`~zmqmodels.protocol.Applying`): no request waits for
it, even on a node with one worker, and the serving module is never copied or written. A CPU
worker's spare is the module the last swap replaced, its tensors aliased to the serving ones
(no bytes of its own) and re-pointed at the new release's cache file; a GPU worker copies
the serving module for each update, as it keeps no host copy to map.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from .. import protocol as P
from ..errors import IntegrityError, ZmqModelsError
from ..model.loader import alias_tensors, apply_weights, load_release, share_weights, spare_of
from ..model.pt2 import Pt2Module
from ..model.slot import Loaded, ModelSlot
from ..release.cache import Cache
from ..release.manifest import decode_manifest

__all__ = ["Holdings"]

log = logging.getLogger("zmqmodels.worker")


class Holdings:
    """The models of worker ``worker_id`` on ``device``, taken from ``cache``; ``map_cache``:
    point the weights at a mapping of the verified cache file (CPU workers: the node's K
    workers then share one copy, the page cache's)."""

    def __init__(self, worker_id: str, device: str, models: Collection[str], cache: Cache,
                 map_cache: bool = False) -> None:
        self.worker_id, self.device, self.cache, self.map_cache = worker_id, device, cache, map_cache
        self.slots = {name: ModelSlot() for name in models}
        self.errors: dict[str, P.Unusable] = {}  # cached releases it could not use
        # per model: the module the last swap replaced, kept (CPU workers mapping the cache
        # file only: it then costs no memory of its own) to take the next weights-only update,
        # so no module is copied and the serving one is never written
        self.spares: dict[str, Loaded] = {}
        # (code digest, claim) -> (rows it may join, why not): the batch claim checked on this
        # device once per code, not at every update of its weights
        self._batch_checked: dict[tuple[str, int], tuple[int, str]] = {}
        self._applying: _Background | None = None  # a weights-only update made while serving
        self._applying_cmd: P.LoadCommand | None = None

    def load_cached(self, names: Collection[str] | None = None, exclude: Collection[int] = ()) -> None:
        """Load the newest usable cached release of each model. Each archive is checked
        against the stamp of its verified bytes (a full sha256 if it changed since) before it
        is loaded: a damaged entry is discarded, recorded in :attr:`errors` for the front
        (which fetches it again), and the one before it is tried."""
        for name in self.slots if names is None else names:
            for m, path in self.cache.servable(name, exclude):
                seq = m.seq
                try:
                    self.cache.check(m, path)
                    self.slots[name].swap(self._full_load(m, path))
                    break
                except (OSError, ZmqModelsError) as exc:
                    log.warning("%s: cached %s seq %d unusable: %s", self.worker_id, name, seq, exc)
                    self.errors[name] = P.Unusable(seq, f"cached seq {seq}: {exc}")
                    if not isinstance(exc, IntegrityError):
                        self.cache.discard(name, seq)

    def load(self, cmd: P.LoadCommand) -> P.LoadResult | P.Applying:
        """Take release ``cmd.seq`` from the cache. A weights-only update of the code this
        worker serves (the manifest's code digest) is made on a background thread while
        the caller goes on answering requests: :class:`~zmqmodels.protocol.Applying` is
        returned and :meth:`finish_apply` gives the result. Anything else loads here and now."""
        slot = self.slots.get(cmd.name)
        if slot is None:
            return P.LoadResult(self.worker_id, cmd.name, cmd.seq, "", False, "model not served here")
        path = Path(cmd.path)
        previous = slot.current()
        try:
            m = decode_manifest(path.with_suffix(".manifest").read_bytes())
            if m.seq != cmd.seq or m.name != cmd.name:
                raise IntegrityError(f"{path} holds {m.name} seq {m.seq}, not seq {cmd.seq}")
            self.cache.check(m, path)  # never load bytes changed since they were verified
        except (OSError, ZmqModelsError) as exc:
            return P.LoadResult(self.worker_id, cmd.name, cmd.seq, "", False,
                                f"cached archive unusable: {exc}", corrupt=True)
        why = _why_load(cmd, previous, m, self._applying is not None)
        if not why:
            self._applying, self._applying_cmd = _Background(lambda: self._apply(previous, m, path)), cmd
            return P.Applying(cmd.name, cmd.seq)
        try:
            if cmd.unload_first and previous is not None:
                slot.clear()  # resource-preserving: free the old model before loading the new
                self.spares.pop(cmd.name, None)
                del previous
                self.free_memory()
            job = _Background(lambda: self._full_load(m, path))
            loaded = job.result()
        except (OSError, ZmqModelsError) as exc:
            if slot.current() is None and cmd.unload_first:
                self.load_cached([cmd.name], exclude=[cmd.seq])  # put the old one back
            return P.LoadResult(self.worker_id, cmd.name, cmd.seq, m.label, False, str(exc))
        return self._swapped(cmd.name, loaded, job.cpu_s, why)

    @property
    def applying(self) -> bool:
        return self._applying is not None

    def apply_done(self) -> bool:
        return self._applying is not None and self._applying.done()

    def finish_apply(self) -> P.LoadResult:
        """The result of the weights-only update started by :meth:`load` (waits for it)."""
        assert self._applying is not None and self._applying_cmd is not None
        cmd, job = self._applying_cmd, self._applying
        self._applying = self._applying_cmd = None
        try:
            loaded = job.result()
        except (OSError, ZmqModelsError) as exc:
            return P.LoadResult(self.worker_id, cmd.name, cmd.seq, "", False, str(exc))
        why = "" if loaded.how == "apply" else "the new tensors did not fit the served module"
        return self._swapped(cmd.name, loaded, job.cpu_s, why)

    def _swapped(self, name: str, loaded: Loaded, cpu_s: float, why: str = "") -> P.LoadResult:
        old = self.slots[name].swap(loaded)
        spare = self.spares.get(name)
        if spare is not None and (spare.code, spare.format) != (loaded.code, loaded.format):
            del self.spares[name]  # of the code replaced: no update will fit it
        if (self.map_cache or isinstance(loaded.module, Pt2Module)) and old is not None and \
                (old.code, old.format) == (loaded.code, loaded.format) and loaded.shared_bytes:
            alias_tensors(old.module, loaded.module)  # idle now: it keeps no weights of its own
            self.spares[name] = old  # the next update points it at its cache file
        m = loaded.manifest
        return P.LoadResult(self.worker_id, name, m.seq, m.label, True, "",
                            round(loaded.load_s, 4), round(loaded.check_s, 4), how=loaded.how,
                            shared_bytes=loaded.shared_bytes, batch=loaded.batch,
                            batch_note=loaded.batch_note, cpu_s=round(cpu_s, 4), why=why,
                            format=loaded.format)

    def _apply(self, previous: Loaded, m: Any, path: Path) -> Loaded:
        """New weights into the spare module (or a copy of the serving one), else a full load."""
        spare = self.spares.pop(m.name, None)
        into = spare.module if spare is not None and (spare.code, spare.format) == \
            (previous.code, previous.format) else None
        shared = self.cache.path(m.name, m.seq) if self.map_cache else None
        loaded = apply_weights(previous, m, path, into=into, shared=shared,
                               batch_known=self._batch_checked.get((previous.code, m.batch)))
        if loaded is None:
            return self._full_load(m, path)
        self._batch_checked[(loaded.code, m.batch)] = (loaded.batch, loaded.batch_note)
        return loaded if loaded.shared_bytes else self._share(loaded)

    def _full_load(self, m: Any, path: Path) -> Loaded:
        known = self._batch_checked.get((m.code_sha256, m.batch)) if m.code_sha256 else None
        loaded = self._share(load_release(m, path, self.device, batch_known=known))
        self._batch_checked[(loaded.code, m.batch)] = (loaded.batch, loaded.batch_note)
        if loaded.shared_bytes or isinstance(loaded.module, Pt2Module):  # what a first update goes into
            self.spares[m.name] = dataclasses.replace(loaded, module=spare_of(loaded.module))
        return loaded

    def _share(self, loaded: Loaded) -> Loaded:
        """Map the weights of ``loaded`` from its verified cache file (CPU workers)."""
        if self.map_cache:
            m = loaded.manifest
            shared = share_weights(loaded, self.cache.path(m.name, m.seq))
            return dataclasses.replace(loaded, shared_bytes=shared)
        return loaded

    def free_memory(self) -> None:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def serving(self) -> dict[str, P.Held]:
        out = {}
        for name, slot in self.slots.items():
            cur = slot.current()
            if cur is not None:
                out[name] = P.Held(cur.manifest.seq, cur.manifest.label, cur.batch, cur.format)
        return out

    # -- inference ---------------------------------------------------------------------------

def _why_load(cmd: P.LoadCommand, previous: Loaded | None, m: Any, busy: bool) -> str:
    """Why release ``m`` is loaded whole rather than applied into the module served ("": apply)."""
    if previous is None:
        return "nothing of this model served here yet"
    if cmd.unload_first:
        return "the old model is unloaded first (memory)"
    if not previous.code or not m.code_sha256:
        return "no code digest to compare"
    if m.code_sha256 != previous.code:
        return f"its code differs from seq {previous.manifest.seq}'s"
    if busy:
        return "another weights update was being applied"
    return ""


class _Background:
    """``fn`` on a thread with a raised nice value: on a small machine the worker that is
    loading then yields the CPU to the workers that are serving (and, for a weights-only
    update, to its own serving loop)."""

    def __init__(self, fn: Any) -> None:
        import threading

        self._box: list[tuple[bool, Any]] = []
        self.cpu_s = 0.0  # the thread's CPU time once done
        self._thread = threading.Thread(target=self._run, args=(fn,), name="zmqmodels-load")
        self._thread.start()

    def _run(self, fn: Any) -> None:
        import time

        from ..transport.tuning import lower_thread_priority

        lower_thread_priority(10)
        t0 = time.thread_time()
        try:
            with torch.inference_mode():
                self._box.append((True, fn()))
        except BaseException as exc:  # re-raised on the calling thread
            self._box.append((False, exc))
        finally:
            self.cpu_s = time.thread_time() - t0

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        ok, value = self._box[0]
        if not ok:
            raise value
        return value
