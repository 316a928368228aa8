"""The one error table, both ways: every domain error survives the trip to a gRPC status and
back as the same class with the same reason, so a client can catch what the server raised."""

from __future__ import annotations

import inspect

import grpc
import pytest
from google.rpc import code_pb2

from sam2_shared import errors
from sam2_shared.errors import Sam2Error
from sam2_shared.wire.status import error_from_status, to_rpc_status

EXPOSED = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, Sam2Error) and cls is not Sam2Error
    and cls not in (errors.CorruptEntryError, errors.CheckpointError)  # internal: no message
]


def test_every_domain_error_is_in_the_table() -> None:
    assert {cls.__name__ for cls in EXPOSED} >= {
        "InvalidInputError", "UnknownModelError", "EmbeddingNotFoundError",
        "LogitsNotFoundError", "SessionNotFoundError", "UnauthenticatedError",
        "ResourceExhaustedError", "NotReadyError", "StoreUnavailableError"}


@pytest.mark.parametrize("cls", EXPOSED, ids=lambda cls: cls.__name__)
def test_round_trip_keeps_class_reason_message_and_metadata(cls: type[Sam2Error]) -> None:
    raised = cls("what went wrong, and what to do", detail="42")
    back = error_from_status(to_rpc_status(raised))
    assert type(back) is cls
    assert back.reason == raised.reason and str(back) == str(raised)
    assert back.metadata.get("detail") == "42"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.UnauthenticatedError("no key", reason="API_KEY_MISSING"),
         grpc.StatusCode.UNAUTHENTICATED),
        (errors.SessionNotFoundError("gone"), grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhaustedError("busy", reason="TOO_MANY_SESSIONS"),
         grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_codes_and_reasons_a_client_switches_on(error: Sam2Error, code: grpc.StatusCode) -> None:
    status = to_rpc_status(error)
    assert status.code == code.value[0]
    back = error_from_status(status)
    assert isinstance(back, type(error)) and back.reason == error.reason


def test_an_unknown_reason_falls_back_to_the_code() -> None:
    status = to_rpc_status(errors.UnauthenticatedError("revoked", reason="SOMETHING_NEW"))
    assert status.code == code_pb2.UNAUTHENTICATED
    back = error_from_status(status)
    assert type(back) is errors.UnauthenticatedError and back.reason == "SOMETHING_NEW"


def test_a_huge_quoted_value_is_clipped_so_the_status_fits_the_trailers() -> None:
    # Callers can send a 1 MiB id; quoting it whole would overflow the client's 16 KiB
    # metadata limit and the caller would get "Stream removed" instead of this error.
    huge = "x" * (1 << 20)
    error = errors.EmbeddingNotFoundError(f"no embedding {huge}", embedding_id=huge)
    status = to_rpc_status(error)
    assert status.code == code_pb2.NOT_FOUND
    assert status.ByteSize() < 4096
    assert "more characters" in status.message
    back = error_from_status(status)
    assert isinstance(back, errors.EmbeddingNotFoundError)
    assert back.metadata["embedding_id"].startswith("x" * 256)
    assert len(back.metadata["embedding_id"]) < 300
