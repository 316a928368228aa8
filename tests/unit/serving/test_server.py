"""The shared gRPC bootstrap on a real grpc.aio server on 127.0.0.1 with a fake servicer:
health, reflection, the error table, message sizes and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc
from sam2_shared.errors import (
    CorruptEntryError,
    EmbeddingNotFoundError,
    InvalidInputError,
    LogitsNotFoundError,
    NotReadyError,
    ResourceExhaustedError,
    UnknownModelError,
)
from sam2_shared.serving.server import Sam2Server, build_server, run_tier
from sam2_shared.serving.settings import TierSettings
from sam2_shared.store.errors import StoreUnavailableError
from sam2_shared.wire import status as status_table
from sam2_shared.wire.status import error_from_rpc_error
from tests.helpers.fake_servicers import FakeDecoder

SERVICE = "sam2.v1.DecoderService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# embedding_id -> what the fake servicer raises.
FAILURES: dict[str, Exception] = {
    "invalid": InvalidInputError("box [5, 5, 1, 1] is degenerate", prompt_index="0"),
    "unknown-model": UnknownModelError("model 'x' is not served here; use 'sam2.1/hiera_tiny'"),
    "missing": EmbeddingNotFoundError("embedding abc is not stored; call EmbedImages first"),
    "expired": LogitsNotFoundError("logits handle h1 expired"),
    "busy": ResourceExhaustedError("encoder queue is full", retry_delay_s="0.25"),
    "loading": NotReadyError("model is still loading"),
    "store-down": StoreUnavailableError("redis://127.0.0.1:1/0 is unreachable"),
    "corrupt": CorruptEntryError("checksum mismatch in /var/cache/secret-entry"),
    "boom": RuntimeError("secret internal detail /etc/passwd"),
}


@contextlib.asynccontextmanager
async def running(**kwargs) -> AsyncIterator[tuple[Sam2Server, FakeDecoder, grpc.aio.Channel]]:  # type: ignore[no-untyped-def]
    servicer = FakeDecoder(FAILURES)
    server, port = build_server(
        [lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, s)],
        [SERVICE],
        port=0,
        host="127.0.0.1",
        **kwargs,
    )
    assert port > 0 and server.port == port
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, servicer, channel
    finally:
        await channel.close()
        await server.stop(0)


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(asyncio.wait_for(coro, timeout=30))


def test_health_is_not_serving_until_marked() -> None:
    async def scenario() -> None:
        async with running() as (server, _, channel):
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == NOT_SERVING
            await server.mark_serving()
            for name in ("", SERVICE):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
                assert reply.status == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(scenario())


def test_reflection_lists_services_and_serves_descriptors() -> None:
    from google.protobuf import descriptor_pb2

    async def scenario() -> None:
        async with running() as (_, _, channel):
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
                # What grpcurl asks next: every dependency by file name.
                reflection_pb2.ServerReflectionRequest(file_by_filename="sam2/v1/common.proto"),
                reflection_pb2.ServerReflectionRequest(file_by_filename="google/rpc/status.proto"),
                reflection_pb2.ServerReflectionRequest(
                    file_by_filename="google/api/field_behavior.proto"
                ),
            ]
            replies = [r async for r in stub.ServerReflectionInfo(iter(requests))]
            names = {s.name for s in replies[0].list_services_response.service}
            assert names == {
                SERVICE,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            for reply in replies[1:]:
                assert not reply.HasField("error_response"), reply.error_response
                files = [
                    descriptor_pb2.FileDescriptorProto.FromString(raw)
                    for raw in reply.file_descriptor_response.file_descriptor_proto
                ]
                assert files and all(f.name for f in files)
            decoder_files = {
                descriptor_pb2.FileDescriptorProto.FromString(raw).name
                for raw in replies[1].file_descriptor_response.file_descriptor_proto
            }
            assert "sam2/v1/decoder.proto" in decoder_files

    run(scenario())


@pytest.mark.parametrize(
    ("embedding_id", "code", "reason"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        ("unknown-model", grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_MODEL"),
        ("missing", grpc.StatusCode.NOT_FOUND, "EMBEDDING_NOT_FOUND"),
        ("expired", grpc.StatusCode.NOT_FOUND, "LOGITS_NOT_FOUND"),
        ("busy", grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        ("loading", grpc.StatusCode.UNAVAILABLE, "NOT_READY"),
        ("store-down", grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
    ],
)
def test_domain_errors_become_rich_status(
    embedding_id: str, code: grpc.StatusCode, reason: str
) -> None:
    async def scenario() -> None:
        async with running() as (_, _, channel):
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Segment(decoder_pb2.SegmentRequest(embedding_id=embedding_id))
            error = info.value
            assert error.code() == code
            assert error.details() == str(FAILURES[embedding_id])
            status = rpc_status.from_call(error)
            assert status is not None
            infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
            assert len(infos) == 1
            error_info = error_details_pb2.ErrorInfo()
            infos[0].Unpack(error_info)
            assert (error_info.reason, error_info.domain) == (reason, "sam2.serving")
            assert dict(error_info.metadata) == FAILURES[embedding_id].metadata
            retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            assert len(retry) == (
                code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            )
            # The client turns it back into the same domain error.
            domain_error = error_from_rpc_error(error)
            assert type(domain_error) is type(FAILURES[embedding_id])
            assert domain_error.reason == reason and str(domain_error) == error.details()

    run(scenario())


def test_retry_info_carries_the_delay() -> None:
    status = status_table.to_rpc_status(FAILURES["busy"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 250_000_000


@pytest.mark.parametrize("embedding_id", ["corrupt", "boom"])
def test_internal_errors_leak_nothing_and_server_keeps_serving(
    embedding_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running() as (_, _, channel):
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Segment(decoder_pb2.SegmentRequest(embedding_id=embedding_id))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert info.value.details() == "internal server error"
            status = rpc_status.from_call(info.value)
            assert status is not None and "secret" not in str(status)
            reply = await stub.Segment(decoder_pb2.SegmentRequest(embedding_id="fine"))
            assert reply.embedding.embedding_id == "fine"

    with caplog.at_level(logging.ERROR, logger="sam2_shared.wire.status"):
        run(scenario())
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and "secret" in str(logged[0].exc_info[1])


def test_stream_errors_are_mapped_after_earlier_responses() -> None:
    async def scenario() -> None:
        async with running() as (_, _, channel):
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            requests = [
                decoder_pb2.SegmentStreamRequest(
                    request_id="1", segment=decoder_pb2.SegmentRequest(embedding_id="ok")
                ),
                decoder_pb2.SegmentStreamRequest(
                    request_id="2", segment=decoder_pb2.SegmentRequest(embedding_id="missing")
                ),
            ]
            call = stub.SegmentStream(iter(requests))
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in call:
                    received.append(response.request_id)
            assert received == ["1"]
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_from_rpc_error(info.value).reason == "EMBEDDING_NOT_FOUND"

    run(scenario())


def test_per_item_status_round_trip() -> None:
    error = status_table.error_from_status(status_table.to_rpc_status(FAILURES["invalid"]))
    assert isinstance(error, InvalidInputError)
    assert error.metadata == {"prompt_index": "0"}
    unknown = status_table.error_from_status(
        status_table.to_rpc_status(InvalidInputError("too big", reason="IMAGE_TOO_LARGE"))
    )
    assert type(unknown) is InvalidInputError and unknown.reason == "IMAGE_TOO_LARGE"


def test_message_size_limit() -> None:
    async def scenario() -> None:
        big = "x" * (5 * 1024 * 1024)  # over gRPC's 4 MiB default
        async with running() as (_, _, channel):
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            reply = await stub.Segment(decoder_pb2.SegmentRequest(embedding_id="a", model_id=big))
            assert reply.embedding.embedding_id == "a"
        async with running(max_message_bytes=1024 * 1024) as (_, _, channel):
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Segment(decoder_pb2.SegmentRequest(embedding_id="a", model_id=big))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(scenario())


def test_port_in_use_fails_loudly() -> None:
    async def scenario() -> None:
        async with running() as (server, _, _):
            with pytest.raises(OSError, match="cannot bind"):
                build_server([], [], port=server.port, host="127.0.0.1")

    run(scenario())


def test_a_metrics_port_in_use_is_a_clean_exit(caplog: pytest.LogCaptureFixture) -> None:
    """The tier logs ``cannot start:`` and returns 1 (no traceback), before serving."""
    served = []

    async def serve(settings: TierSettings, metrics: object) -> None:
        served.append(settings)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR):
            status = run_tier(TierSettings, ["--host", "127.0.0.1", "--metrics-port",
                                             str(port)], prog="t", description="t", serve=serve)
    assert status == 1 and not served
    assert f"cannot start: cannot serve metrics on 127.0.0.1:{port}" in caplog.text


def test_graceful_stop_drains_in_flight_call_then_closes() -> None:
    closed: list[str] = []

    async def close_async() -> None:
        closed.append("async")

    async def scenario() -> None:
        async with running() as (server, servicer, channel):
            server.add_close_callback(lambda: closed.append("first"))
            server.add_close_callback(close_async)
            await server.mark_serving()
            stub = decoder_pb2_grpc.DecoderServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            in_flight = asyncio.ensure_future(
                stub.Segment(decoder_pb2.SegmentRequest(embedding_id="slow"))
            )
            await servicer.entered.wait()
            stopping = asyncio.ensure_future(server.stop(grace_s=10))
            await asyncio.sleep(0.2)
            assert not stopping.done() and closed == []  # still draining
            assert server.health._server_status[""] == NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:  # new calls are refused
                await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            servicer.release.set()
            reply = await in_flight
            assert reply.embedding.embedding_id == "slow"
            await stopping
            assert closed == ["async", "first"]  # reverse order of registration

    run(scenario())


def test_sigterm_stops_serve() -> None:
    closed: list[bool] = []

    async def scenario() -> None:
        async with running() as (server, _, channel):
            server.add_close_callback(lambda: closed.append(True))
            serving = asyncio.ensure_future(server.serve(grace_s=1))
            await asyncio.sleep(0.1)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(serving, timeout=10)
            assert closed == [True]
            # The default handler is back in place: the test process kept its SIGTERM.
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    run(scenario())
