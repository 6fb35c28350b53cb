"""A torch without TorchScript, for issue 30's jit-less run: put this folder on PYTHONPATH and
``torch.jit.script``, ``trace``, ``save`` and ``load`` raise as pytorch/pytorch#189705 makes
them (every deprecated ``torch.jit`` call a RuntimeError), in every process (CLI, hub, node,
workers). torch is patched as it is imported, not imported here."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

GONE = ("script", "trace", "trace_module", "save", "load")


def _gone(name: str):  # noqa: ANN202
    def raiser(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError(f"`torch.jit.{name}` is deprecated and disabled (ZMQM_JITLESS test run)")
    return raiser


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            run(module)
            for name in GONE:
                setattr(module.jit, name, _gone(name))

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _Finder())
