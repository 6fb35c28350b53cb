"""What Triton's tools ask beyond the v2 core, answered from what the node says (its last
``MODELS_REPLY``) and what the gateway measured (the replies it carried): the model
configuration (``tritonclient``'s ``get_model_config``, which ``perf_analyzer`` reads), statistics
per model and version, and the repository index. No I/O: plain data in, JSON-able dicts out
(the gRPC answers are the same dicts as messages, :mod:`.pb`).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as P
from .codec import find_version, model_metadata

__all__ = ["model_config", "repository_index", "Statistics", "KEPT_VERSIONS"]

KEPT_VERSIONS = 64  # (model, version) entries kept; the least recently answered goes first


def model_config(models: P.ModelsReply | None, name: str, seq: int) -> dict[str, Any]:
    """Triton's model configuration (JSON form) of the served version: inputs and outputs
    without the batch dimension when the node joins requests (``max_batch_size`` the most rows
    one forward takes there), with it (and ``max_batch_size`` 0) when it does not."""
    _, v = find_version(models, name, seq)
    meta = model_metadata(models, name, seq)
    batched = v.batch > 1

    def tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": e["name"], "data_type": f"TYPE_{e['datatype']}",
                 "dims": e["shape"][1:] if batched and e["shape"] else e["shape"]} for e in entries]

    config: dict[str, Any] = {"name": name, "platform": meta["platform"], "backend": "pytorch",
                              "max_batch_size": v.batch if batched else 0,
                              "input": tensors(meta["inputs"]), "output": tensors(meta["outputs"])}
    if batched:
        config["dynamic_batching"] = {}
    return config


def repository_index(models: P.ModelsReply | None, ready_only: bool) -> list[dict[str, str]]:
    """Every model the node serves, one entry per version some worker holds (``READY``) and
    one ``UNAVAILABLE`` entry, with the reason, for a model no worker holds yet."""
    out = []
    for m in models.models if models is not None else []:
        held = [v for v in m.versions if v.workers]
        for v in held:
            out.append({"name": m.name, "version": str(v.seq), "state": "READY", "reason": ""})
        if not held and not ready_only:
            out.append({"name": m.name, "version": "", "state": "UNAVAILABLE",
                        "reason": "no worker holds a release of it yet"})
    return out


@dataclass
class _Counts:
    success: list[int] = field(default_factory=lambda: [0, 0])  # count, ns (end to end, here)
    fail: list[int] = field(default_factory=lambda: [0, 0])
    queue: list[int] = field(default_factory=lambda: [0, 0])  # the node's queue_ms
    infer: list[int] = field(default_factory=lambda: [0, 0])  # the node's infer_ms
    batches: dict[int, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    last_ms: int = 0


class Statistics:
    """Per model and version, the requests this gateway carried: how many succeeded and
    failed and their time here, the node's queue and compute time for each, and by the size
    of the forward that answered them. ``execution_count`` stays 0: a gateway sees requests,
    not the node's forwards (``batch_stats`` counts requests by the batch they shared). Bounded:
    every publish is a new version, so only the :data:`KEPT_VERSIONS` most recently answered
    are kept."""

    def __init__(self) -> None:
        self._by: dict[tuple[str, str], _Counts] = {}
        self._lock = threading.Lock()  # one asyncio loop writes; a metrics scrape may read

    def _entry(self, key: tuple[str, str]) -> _Counts:
        c = self._by.pop(key, None) or _Counts()
        self._by[key] = c  # most recent last
        while len(self._by) > KEPT_VERSIONS:
            del self._by[next(iter(self._by))]
        return c

    def answered(self, model: str, reply: P.InferReply, seconds: float) -> None:
        ns = int(seconds * 1e9)
        with self._lock:
            c = self._entry((model, str(reply.seq)))
            c.success[0] += 1
            c.success[1] += ns
            c.queue[0] += 1
            c.queue[1] += int(reply.queue_ms * 1e6)
            c.infer[0] += 1
            c.infer[1] += int(reply.infer_ms * 1e6)
            b = c.batches[max(1, reply.batch)]
            b[0] += 1
            b[1] += int(reply.infer_ms * 1e6)
            c.last_ms = int(time.time() * 1000)

    def failed(self, model: str, version: str, seconds: float) -> None:
        with self._lock:
            c = self._entry((model, version))
            c.fail[0] += 1
            c.fail[1] += int(seconds * 1e9)

    def totals(self) -> dict[tuple[str, str], tuple[int, int]]:
        """``(model, version) -> (succeeded, failed)`` (a metrics scrape's read)."""
        with self._lock:
            return {k: (c.success[0], c.fail[0]) for k, c in self._by.items()}

    def report(self, models: P.ModelsReply | None, name: str = "", version: str = "") -> dict[str, Any]:
        """Triton's statistics JSON: every model and version the node serves or this gateway
        carried requests for (only ``name``, and ``version``, when given)."""
        keys = {(m.name, str(v.seq)) for m in (models.models if models else []) for v in m.versions
                if v.workers}
        with self._lock:
            keys |= set(self._by)
            rows = []
            for model, ver in sorted(keys, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else 0)):
                if (name and model != name) or (version and ver != version):
                    continue
                c = self._by.get((model, ver), _Counts())
                d = lambda pair: {"count": pair[0], "ns": pair[1]}  # noqa: E731
                zero = {"count": 0, "ns": 0}
                rows.append({
                    "name": model, "version": ver, "last_inference": c.last_ms,
                    "inference_count": c.success[0], "execution_count": 0,
                    "inference_stats": {"success": d(c.success), "fail": d(c.fail), "queue": d(c.queue),
                                        "compute_input": zero, "compute_infer": d(c.infer),
                                        "compute_output": zero, "cache_hit": zero, "cache_miss": zero},
                    "batch_stats": [{"batch_size": size, "compute_input": zero, "compute_infer": d(v),
                                     "compute_output": zero} for size, v in sorted(c.batches.items())]})
        return {"model_stats": rows}
