"""``ModelSlot``: the newest validated model and its version, swapped atomically.

A swap is one reference assignment. A caller takes the current :class:`Loaded` once and uses
it for the whole request, so requests in flight finish on the model they started with and the
old model is freed when its last request drops the reference.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Loaded", "ModelSlot"]


@dataclass(frozen=True)
class Loaded:
    """A model that passed its checks, with the release it came from."""

    module: Any  # torch.jit.ScriptModule
    manifest: Any  # zmqmodels.release.manifest.Manifest
    device: str
    load_s: float
    check_s: float
    # per positional input: (torch dtype or None, rank, dtype name, shape with -1 = any), from
    # manifest.inputs
    signature: tuple[tuple[Any, int, str, tuple[int, ...]], ...] = ()
    code: str = ""  # the archive's code digest (archive.code_digest): same code, new weights
    how: str = "load"  # "load" (torch.jit.load) or "apply" (new tensors into the old code)
    shared_bytes: int = 0  # weight bytes mapped from the node's cache file (loader.share_weights)
    batch: int = 1  # the most rows joined in one forward (the manifest's claim, checked here)
    batch_note: str = ""  # why it joins fewer than the manifest claims
    format: str = "torchscript"  # the part of the release it runs ("pt2": its AOTInductor package)

    @property
    def version(self) -> tuple[str, int]:
        return self.manifest.label, self.manifest.seq


class ModelSlot:
    def __init__(self) -> None:
        self._current: Loaded | None = None
        self._cond = threading.Condition()
        self._listeners: list[Callable[[Loaded, Loaded | None], None]] = []

    def current(self) -> Loaded | None:
        return self._current

    def swap(self, new: Loaded) -> Loaded | None:
        """Install ``new``; return the model it replaced."""
        with self._cond:
            old, self._current = self._current, new
            self._cond.notify_all()
        for fn in list(self._listeners):
            fn(new, old)
        return old

    def clear(self) -> Loaded | None:
        with self._cond:
            old, self._current = self._current, None
        return old

    def wait(self, predicate: Callable[[Loaded | None], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._current), timeout)

    def on_swap(self, fn: Callable[[Loaded, Loaded | None], None]) -> None:
        self._listeners.append(fn)
