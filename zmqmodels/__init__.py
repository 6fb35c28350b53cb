"""zmqmodels: roll TorchScript models out to a fleet over ZeroMQ.

Compile (:func:`compile_model`), build a :class:`Release`, keep it in a :class:`Store`,
broadcast it from a hub and hot-swap it into serving nodes.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .compile import Compiled, compare_outputs, compile_model
from .errors import (
    CompileError,
    DeadlineError,
    IntegrityError,
    LimitError,
    ParityError,
    ProtocolError,
    ReleaseError,
    RemoteError,
    SourceError,
    StoreError,
    ZmqModelsError,
)
from .release import CodecSpec, Manifest, Release, build_release, decode_manifest, encode_manifest
from .sources import load_source, parse_example_spec
from .store import Store

__all__ = [
    "__version__",
    "Compiled",
    "compile_model",
    "compare_outputs",
    "CodecSpec",
    "Manifest",
    "Release",
    "build_release",
    "encode_manifest",
    "decode_manifest",
    "Store",
    "load_source",
    "parse_example_spec",
    "ZmqModelsError",
    "CompileError",
    "ParityError",
    "SourceError",
    "ReleaseError",
    "IntegrityError",
    "StoreError",
    "ProtocolError",
    "LimitError",
    "DeadlineError",
    "RemoteError",
]
