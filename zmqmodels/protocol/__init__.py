"""Every wire message as a typed, validated struct, and the **framing table**: the one place
that knows which frames each message kind has.

``docs/protocol.md`` is the language-neutral spec this package implements: ``messages`` (release,
fleet and control), ``serving`` (inference and front <-> worker), ``framing`` (the table). Headers are msgpack
maps (unknown keys are ignored, so fields may be appended); big bytes travel in their own frame.
A message is ``[KIND, header?, payload...]``: :func:`pack` builds those frames from a struct
and its payload, :func:`unpack` checks the kind, decodes the header and checks the payload's
arity, raising :class:`~zmqmodels.errors.ProtocolError` on any fault. Handlers ``match`` on
the struct types. Routing frames (a ROUTER's identity, a REQ envelope, a PUB topic) are the
shell's, outside what these two functions see.

PUB (hub -> nodes), after the topic ``name + b"\\0"`` (``b"\\0"`` alone for the hub beat)::

    MANIFEST   (no header)      manifest, signature
    CHUNK      ChunkHeader      payload
    PATCH      PatchHeader      payload (the chunk as a XOR against the previous release's span)
    HEARTBEAT  Heartbeat
    ACTIVATE   Activate         (serve a staged release: these nodes, or all)

ROUTER (hub) <-> DEALER (node or CLI)::

    FETCH_MANIFEST FetchManifest            -> MANIFEST | ERROR
    FETCH_CHUNKS   FetchChunks              -> CHUNK x n | ERROR
    REPORT         Report                   (no reply; a malformed one gets ERROR)
    RESERVE        Reserve                  -> RESERVED Reserved, base manifest | ERROR
    PUBLISH        Publish, manifest, chunk x n -> PUBLISHED | ERROR
    ROLLBACK       Rollback (, manifest, signature) -> PUBLISHED | ERROR
    STATUS         StatusRequest            -> STATUS_REPLY | ERROR
    RELEASES       ReleasesRequest          -> RELEASES_REPLY | ERROR
    PIN            Pin                      -> PINNED Pinned | ERROR
    ACTIVATE       Activate                 -> ACTIVATED Activated | ERROR

Inference (client REQ -> node ROUTER): ``INFER InferRequest, tensor x n`` -> ``OK InferReply,
tensor x n`` | ``ERROR ErrorReply``; ``MODELS ModelsRequest`` -> ``MODELS_REPLY ModelsReply``
(what it serves: versions, workers holding them, signatures).

Node front <-> worker process (ipc, same host)::

    READY WorkerReady  HB  LOADED LoadResult  DONE Done, reply frames     (worker -> front)
    APPLYING Applying (serves on while it writes new weights; LOADED follows)  (worker -> front)
    ANSWERS Answers, reply frames of each job                             (worker -> front)
    WORK Work, INFER, request header, tensor x n  LOAD LoadCommand  STOP  (front -> worker)
    BATCH Batch, request frames of each job                               (front -> worker)

``signature`` is the manifest's detached Ed25519 signature, empty when unsigned
(:mod:`zmqmodels.release.signing`); a receiver treats a missing frame as empty.
"""

from .framing import *  # noqa: F403
from .framing import __all__ as _framing
from .messages import *  # noqa: F403
from .messages import __all__ as _messages
from .serving import *  # noqa: F403
from .serving import __all__ as _serving

__all__ = [*_messages, *_serving, *_framing]
