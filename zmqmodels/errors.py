"""Error types. Every error the library raises derives from :class:`ZmqModelsError`.

::

    ZmqModelsError                 code
    ├── CompileError               compile_failed    scripting and tracing both failed
    │   └── ParityError            parity_mismatch   compiled output differs from eager
    ├── SourceError                bad_source        a model source/weights/example spec is unusable
    ├── ReleaseError               bad_release       a release or manifest is malformed or inconsistent
    │   ├── IntegrityError         integrity         digest or size mismatch
    │   └── SignatureError         bad_signature     unsigned, untrusted signer or signature fails
    ├── StoreError                 store             the release store cannot be read or written
    ├── ProtocolError              bad_message       a frame list does not decode
    ├── LimitError                 too_large         a declared size exceeds a configured maximum
    ├── DeadlineError              timeout           a wait passed its deadline
    ├── NotReadyError              not_ready         no model (or not the pinned version) yet
    ├── ServingError               (its code)        a node refuses an inference request
    ├── CheckError                 example_check_failed a loaded model failed its example check
    └── RemoteError                (the remote code)  an error reply from a hub or server

Errors cross the wire as ``(code, message, retryable)``; a client raises :class:`RemoteError`
carrying the remote code.
"""

from __future__ import annotations

__all__ = [
    "ZmqModelsError",
    "CompileError",
    "ParityError",
    "SourceError",
    "ReleaseError",
    "IntegrityError",
    "SignatureError",
    "StoreError",
    "ProtocolError",
    "LimitError",
    "DeadlineError",
    "NotReadyError",
    "RemoteError",
    "ServingError",
    "CheckError",
]


class ZmqModelsError(Exception):
    """Root of every error zmqmodels raises."""

    code = "error"
    retryable = False


class CompileError(ZmqModelsError):
    code = "compile_failed"


class ParityError(CompileError):
    code = "parity_mismatch"


class SourceError(ZmqModelsError):
    code = "bad_source"


class ReleaseError(ZmqModelsError):
    code = "bad_release"


class IntegrityError(ReleaseError):
    code = "integrity"


class SignatureError(ReleaseError):
    code = "bad_signature"


class StoreError(ZmqModelsError):
    code = "store"


class ProtocolError(ZmqModelsError):
    code = "bad_message"


class LimitError(ProtocolError):
    code = "too_large"


class DeadlineError(ZmqModelsError):
    code = "timeout"
    retryable = True


class NotReadyError(ZmqModelsError):
    code = "not_ready"
    retryable = True


class ServingError(ZmqModelsError):
    """A node refuses an inference request; ``code`` is one of
    :data:`zmqmodels.protocol.SERVING_CODES` and crosses the wire in the ERROR reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class CheckError(ZmqModelsError):
    """A loaded release failed its example check (or produced non-finite outputs)."""

    code = "example_check_failed"


class RemoteError(ZmqModelsError):
    """An error reply from a hub or server: carries the remote ``code``."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
