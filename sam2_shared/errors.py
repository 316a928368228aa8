"""Domain errors shared by the library and both tiers.

Every domain error of the project is defined here (no grpc import): the one table of
``sam2_shared.wire.status`` maps them to gRPC status codes and back. Each error carries a
stable UPPER_SNAKE ``reason`` (AIP-193 ``ErrorInfo.reason``) and a message a user can act on.
"""

from __future__ import annotations


class Sam2Error(Exception):
    """Base class of every error this project raises on purpose."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: str) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidInputError(Sam2Error, ValueError):
    """The caller sent something we cannot use (bad image, bad prompt...)."""

    reason = "INVALID_ARGUMENT"


class UnknownModelError(InvalidInputError):
    reason = "UNKNOWN_MODEL"


class CheckpointError(Sam2Error):
    """A checkpoint file is missing, unreadable or does not fit the model id."""

    reason = "CHECKPOINT_INVALID"


class EmbeddingNotFoundError(Sam2Error, KeyError):
    reason = "EMBEDDING_NOT_FOUND"

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class LogitsNotFoundError(EmbeddingNotFoundError):
    reason = "LOGITS_NOT_FOUND"


class CorruptEntryError(Sam2Error):
    """A stored entry failed its checksum or metadata checks."""

    reason = "CORRUPT_ENTRY"


class StoreUnavailableError(Sam2Error):
    """The store backend could not be reached or refused the operation.

    The message names the store by its masked URL, never its credentials.
    """

    reason = "STORE_UNAVAILABLE"


class ResourceExhaustedError(Sam2Error):
    reason = "RESOURCE_EXHAUSTED"


class NotReadyError(Sam2Error):
    reason = "NOT_READY"


class FailedPreconditionError(Sam2Error):
    """The request is valid but this server is not set up for it (e.g. a video sent to a
    decoder that has no encoder to embed its frames)."""

    reason = "FAILED_PRECONDITION"


class UnauthenticatedError(Sam2Error):
    """No key, or a key that is not configured (UNAUTHENTICATED)."""

    reason = "API_KEY_INVALID"



class StreamIdleError(Sam2Error):
    """A stream sent no request for too long; the server ended it (DEADLINE_EXCEEDED)."""

    reason = "STREAM_IDLE"


class SessionNotFoundError(EmbeddingNotFoundError):
    """Unknown, closed or expired tracking session (NOT_FOUND)."""

    reason = "SESSION_NOT_FOUND"


class SessionBusyError(Sam2Error):
    """The tracking session is in use by another call (a propagation): ABORTED, at once."""

    reason = "SESSION_BUSY"


class SessionConflictError(SessionBusyError):
    """Another replica saved the session while this call ran (compare-and-set lost):
    ABORTED; sending the call again works on the newer state."""

    reason = "SESSION_CONFLICT"
