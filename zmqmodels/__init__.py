"""zmqmodels: roll TorchScript models out to a fleet over ZeroMQ.

Compile (:func:`compile_model`), build a :class:`Release`, keep it in a :class:`Store`,
broadcast it from a :class:`Hub`, and follow it with a :class:`Subscriber` (embedded, on a :class:`Follower`)
or ``zmqmodels serve`` (a node). Names are imported lazily so that torch-free processes (the
hub, a node's front process) never pay for importing torch.
"""

from __future__ import annotations

import importlib
import time
from typing import Any

IMPORTED_AT = time.perf_counter()  # when this process began importing zmqmodels (CLI timings)

__version__ = "0.1.0"

_EXPORTS = {
    "Compiled": "model.compile",
    "compile_model": "model.compile",
    "compare_outputs": "model.compile",
    "CodecSpec": "release.manifest",
    "Manifest": "release.manifest",
    "Release": "release.manifest",
    "build_release": "model.build",
    "encode_manifest": "release.manifest",
    "decode_manifest": "release.manifest",
    "Store": "release.store",
    "Cache": "release.cache",
    "Limits": "defaults",
    "SigningKey": "release.signing",
    "Trust": "release.signing",
    "Curve": "transport.curve",
    "Hub": "hub.hub",
    "HubClient": "clients.hub",
    "Relay": "hub.relay",
    "Subscriber": "node.embedded",
    "Follower": "node.follower",
    "FollowOptions": "node.follower",
    "Node": "node.node",
    "Client": "clients.client",
    "AsyncClient": "clients.aclient",
    "Gateway": "oip.gateway",
    "Result": "clients.client",
    "ModelSlot": "model.slot",
    "Loaded": "model.slot",
    "load_release": "model.loader",
    "load_source": "model.sources",
    "parse_example_spec": "model.sources",
    "ZmqModelsError": "errors",
    "CompileError": "errors",
    "ParityError": "errors",
    "SourceError": "errors",
    "ReleaseError": "errors",
    "IntegrityError": "errors",
    "SignatureError": "errors",
    "StoreError": "errors",
    "ProtocolError": "errors",
    "LimitError": "errors",
    "DeadlineError": "errors",
    "NotReadyError": "errors",
    "RemoteError": "errors",
    "ServingError": "errors",
    "CheckError": "errors",
    "SwapPolicy": "core.swap",
    "ModelState": "protocol",
    "WavePlan": "protocol",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zmqmodels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
