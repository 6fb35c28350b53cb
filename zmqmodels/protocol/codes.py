"""The error codes of the inference protocol: one table, each code with its retryability,
whether it counts as the server's fault (the error rates that halt a wave), and the HTTP and
gRPC statuses the Open Inference Protocol gateway answers it with.

Every other table derives from this one: :data:`~zmqmodels.protocol.serving.SERVING_CODES`,
the node ledger's server errors, the gateway's statuses, and the C++ node's
``cpp/src/generated.hpp`` (written by ``scripts/gen_cpp_header.py``; a test checks it is
current). docs/protocol.md lists the same codes.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Code", "RETRYABLE", "SERVER_ERRORS"]


class Code(str, Enum):
    """An ERROR reply's ``code``: ``Code("not_ready").retryable`` ..."""

    retryable: bool
    server_error: bool
    http: int
    grpc: str
    node: bool
    meaning: str

    def __new__(cls, wire: str, retryable: bool, server_error: bool, http: int, grpc: str,
                meaning: str, node: bool = True) -> Code:
        obj = str.__new__(cls, wire)
        obj._value_ = wire
        obj.retryable, obj.server_error, obj.http, obj.grpc = retryable, server_error, http, grpc
        obj.meaning, obj.node = meaning, node
        return obj

    UNKNOWN_MODEL = ("unknown_model", False, False, 404, "NOT_FOUND", "the node does not serve that name")
    NOT_READY = ("not_ready", True, False, 503, "UNAVAILABLE", "known, but no version loaded yet")
    VERSION_UNAVAILABLE = ("version_unavailable", False, False, 404, "NOT_FOUND",
                           "the pinned seq is not served here")
    BAD_REQUEST = ("bad_request", False, False, 400, "INVALID_ARGUMENT", "malformed frames or header")
    BAD_INPUT = ("bad_input", False, False, 400, "INVALID_ARGUMENT",
                 "wrong count, dtype or rank for the model's signature")
    TOO_LARGE = ("too_large", False, False, 413, "RESOURCE_EXHAUSTED",
                 "over max request bytes or tensor count")
    MODEL_ERROR = ("model_error", False, True, 500, "INTERNAL",
                   "the model raised; the message carries its exception")
    WORKER_LOST = ("worker_lost", True, True, 503, "UNAVAILABLE",
                   "the worker died with the request in flight")
    UNAVAILABLE = ("unavailable", True, False, 503, "UNAVAILABLE",
                   "draining for a reload, queue full or queue wait over")
    INTERNAL = ("internal", False, True, 500, "INTERNAL", "a fault in the node itself")
    DEADLINE = ("deadline", False, False, 504, "DEADLINE_EXCEEDED",
                "the gateway's own: the node did not answer within the request's time", False)
    WRONG_PEER = ("wrong_peer", False, False, 502, "FAILED_PRECONDITION",
                  "a hub's or relay's answer to an inference request: the address is not a node's", False)

    @classmethod
    def of(cls, code: str) -> Code:
        """The code named ``code``; an unknown one is :attr:`INTERNAL`'s kind of fault."""
        return next((c for c in cls if c.value == code), cls.INTERNAL)


RETRYABLE = frozenset(c.value for c in Code if c.retryable)
SERVER_ERRORS = frozenset(c.value for c in Code if c.server_error)
