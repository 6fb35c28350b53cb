"""``torch.jit``, said once: PyTorch deprecated TorchScript (torch 2.11 on) and warns on every
``torch.jit.script``, ``trace``, ``save`` and ``load``. The product calls them through
:func:`call`, which keeps every other warning (a TracerWarning still reaches whoever records
it) and turns the deprecation into one line, in this tool's words, pointing at ``--format pt2``
(:func:`take_line`: the CLI prints it, a node logs it)."""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any

__all__ = ["call", "take_line", "LINE"]

log = logging.getLogger(__name__)
LINE = ("note: PyTorch deprecated TorchScript (torch.jit warns on every call and may stop working "
        "in a later torch); --format pt2 publishes a torch.export/AOTInductor package instead")
_DEPRECATED = re.compile(r"`torch\.jit\.\w+` is deprecated")
_state = {"seen": False, "taken": False}


def call(name: str, *args: Any, **kwargs: Any) -> Any:
    """``torch.jit.<name>(*args, **kwargs)`` with its deprecation warning noted, not shown."""
    import torch

    fn = getattr(torch.jit, name)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            return fn(*args, **kwargs)
    finally:
        _pass_on(caught)  # outside the recorder: the others reach the caller's filters


def _pass_on(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        if _DEPRECATED.search(str(w.message)):
            if not _state["seen"]:
                log.info("%s", LINE)
            _state["seen"] = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def take_line() -> str:
    """The deprecation line, once per process, if torch.jit warned ("" otherwise or after)."""
    if _state["seen"] and not _state["taken"]:
        _state["taken"] = True
        return LINE
    return ""
