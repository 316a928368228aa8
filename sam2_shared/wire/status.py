"""The one table from domain errors (``sam2_shared.errors``) to gRPC status.

Errors travel as rich status (AIP-193): a canonical code, a message a user can act
on, and a ``google.rpc.ErrorInfo{reason, domain="sam2.serving", metadata}`` in
``google.rpc.Status.details`` (plus ``google.rpc.RetryInfo`` where retrying later
helps). Anything unexpected becomes INTERNAL with a fixed message; the exception
is logged, never sent.

Server side: ``ErrorMappingInterceptor`` (installed by ``sam2_shared.serving.server``)
applies the table to every RPC of a ``grpc.aio`` server; ``to_rpc_status`` builds
the ``google.rpc.Status`` for per-item errors (EmbedImages results, SegmentStream
responses). Client side: ``error_from_rpc_error`` / ``error_from_status`` turn a
status back into the matching domain exception.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from sam2_shared.errors import (
    CheckpointError,
    CorruptEntryError,
    EmbeddingNotFoundError,
    FailedPreconditionError,
    InvalidInputError,
    LogitsNotFoundError,
    NotReadyError,
    ResourceExhaustedError,
    Sam2Error,
    SessionBusyError,
    SessionConflictError,
    SessionNotFoundError,
    StoreUnavailableError,
    StreamIdleError,
    UnauthenticatedError,
    UnknownModelError,
)

ERROR_DOMAIN = "sam2.serving"

INTERNAL_MESSAGE = "internal server error"

DEFAULT_RETRY_DELAY_S = 1.0

# Messages and ErrorInfo values often quote what the caller sent (an id, a handle); a caller
# can send megabytes there, and gRPC refuses trailers over the client's metadata limit
# (16 KiB by default), which would turn a clear error into "Stream removed".
MAX_MESSAGE_CHARS = 2048
MAX_METADATA_VALUE_CHARS = 256
MAX_METADATA_ENTRIES = 16

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class _Mapping:
    code: grpc.StatusCode
    expose_message: bool  # False: fixed message, exception logged with traceback
    retryable: bool = False


# First match wins, so subclasses come before their bases.
_TABLE: tuple[tuple[type[BaseException], _Mapping], ...] = (
    (InvalidInputError, _Mapping(grpc.StatusCode.INVALID_ARGUMENT, True)),  # + UnknownModel
    (EmbeddingNotFoundError, _Mapping(grpc.StatusCode.NOT_FOUND, True)),  # + Logits, Session
    (UnauthenticatedError, _Mapping(grpc.StatusCode.UNAUTHENTICATED, True)),
    (SessionBusyError, _Mapping(grpc.StatusCode.ABORTED, True)),  # + SessionConflict
    (StreamIdleError, _Mapping(grpc.StatusCode.DEADLINE_EXCEEDED, True)),
    (ResourceExhaustedError, _Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, True, True)),
    (NotReadyError, _Mapping(grpc.StatusCode.UNAVAILABLE, True, True)),
    (FailedPreconditionError, _Mapping(grpc.StatusCode.FAILED_PRECONDITION, True)),
    (StoreUnavailableError, _Mapping(grpc.StatusCode.UNAVAILABLE, True, True)),
    (CorruptEntryError, _Mapping(grpc.StatusCode.INTERNAL, False)),
    (CheckpointError, _Mapping(grpc.StatusCode.INTERNAL, False)),
    (NotImplementedError, _Mapping(grpc.StatusCode.UNIMPLEMENTED, False)),
)


_UNEXPECTED = _Mapping(grpc.StatusCode.INTERNAL, False)


# Reverse direction, for clients: reason -> class, then code -> class.
_CLASS_OF_REASON: dict[str, type[Sam2Error]] = {
    cls.reason: cls
    for cls in (
        InvalidInputError,
        UnknownModelError,
        EmbeddingNotFoundError,
        LogitsNotFoundError,
        SessionNotFoundError,
        SessionBusyError,
        SessionConflictError,
        UnauthenticatedError,
        ResourceExhaustedError,
        NotReadyError,
        FailedPreconditionError,
        StoreUnavailableError,
        StreamIdleError,
        CorruptEntryError,
        CheckpointError,
    )
}


_CLASS_OF_CODE: dict[int, type[Sam2Error]] = {
    code_pb2.INVALID_ARGUMENT: InvalidInputError,
    code_pb2.NOT_FOUND: EmbeddingNotFoundError,
    code_pb2.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    code_pb2.UNAVAILABLE: NotReadyError,
    code_pb2.FAILED_PRECONDITION: FailedPreconditionError,
    code_pb2.UNAUTHENTICATED: UnauthenticatedError,
}


def _mapping_of(exc: BaseException) -> _Mapping:
    for cls, mapping in _TABLE:
        if isinstance(exc, cls):
            return mapping
    return _UNEXPECTED


def is_retryable_error(exc: BaseException) -> bool:
    """Whether the table marks ``exc`` as worth retrying (busy or briefly unavailable), e.g.
    for a per-image error inside a successful ``EmbedImages`` response."""
    return _mapping_of(exc).retryable


def _clip(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """Domain (or unexpected) exception -> ``google.rpc.Status`` with ``ErrorInfo``.

    Logs unexpected and internal errors with their traceback; their message and
    metadata are not put on the wire.
    """
    mapping = _mapping_of(exc)
    if mapping.expose_message:
        message = str(exc)
        reason = getattr(exc, "reason", mapping.code.name)
        metadata = dict(getattr(exc, "metadata", {}))
    else:
        logger.error("request failed: %s", type(exc).__name__, exc_info=exc)
        message = (
            INTERNAL_MESSAGE
            if mapping.code is grpc.StatusCode.INTERNAL
            else ("this operation is not implemented by the server")
        )
        reason = exc.reason if isinstance(exc, Sam2Error) else mapping.code.name
        metadata = {}
    message = _clip(message, MAX_MESSAGE_CHARS)
    metadata = {
        _clip(str(key), MAX_METADATA_VALUE_CHARS): _clip(str(value), MAX_METADATA_VALUE_CHARS)
        for key, value in list(metadata.items())[:MAX_METADATA_ENTRIES]
    }
    details = [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)]
    if mapping.retryable:
        delay_s = float(metadata.get("retry_delay_s", DEFAULT_RETRY_DELAY_S))
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(delay_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        container = any_pb2.Any()
        container.Pack(detail)
        packed.append(container)
    return status_pb2.Status(code=mapping.code.value[0], message=message, details=packed)


async def abort_with_error(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with the rich status of ``exc`` (raises ``grpc.aio.AbortError``)."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(exc)))


def error_from_status(status: status_pb2.Status) -> Sam2Error:
    """``google.rpc.Status`` (not OK) -> the matching domain exception.

    The class comes from the ``ErrorInfo`` reason when it is one of ours, else from
    the code; the exception keeps the server's reason and metadata.
    """
    info = error_details_pb2.ErrorInfo()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
            break
    cls = _CLASS_OF_REASON.get(info.reason) or _CLASS_OF_CODE.get(status.code, Sam2Error)
    reason = info.reason or code_pb2.Code.Name(status.code)
    return cls(status.message, reason=reason, **dict(info.metadata))


def error_from_rpc_error(error: grpc.RpcError) -> Sam2Error:
    """A failed call's ``grpc.RpcError`` (sync or aio) -> the matching domain exception.

    Calls without rich status (deadline, cancellation, transport) keep their code as
    the reason, e.g. ``DEADLINE_EXCEEDED``.
    """
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        code = error.code()  # type: ignore[attr-defined]
        status = status_pb2.Status(code=code.value[0], message=error.details() or "")  # type: ignore[attr-defined]
    return error_from_status(status)
