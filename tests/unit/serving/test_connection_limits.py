"""Connection-level limits of the shared server, on real ``grpc.aio`` servers on 127.0.0.1:
the cap on RPCs in progress, the plaintext health-only port beside a TLS listener, and the
idle timeout of ``SegmentStream`` (the decoder's servicer without a model)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from decoder_service.servicer import DecoderServicer
from sam2_shared.api.v1 import decoder_pb2, decoder_pb2_grpc
from sam2_shared.client import channels
from sam2_shared.serving.server import build_server
from sam2_shared.serving.tls import server_credentials
from sam2_shared.wire.status import error_from_rpc_error
from tests.helpers.servers import free_port
from tests.helpers.tls_certs import make_pki

SERVICE = "sam2.v1.DecoderService"
SERVING = health_pb2.HealthCheckResponse.SERVING


class EchoStreams(decoder_pb2_grpc.DecoderServiceServicer):
    async def SegmentStream(self, request_iterator, context  # type: ignore[no-untyped-def]
                            ) -> AsyncIterator[decoder_pb2.SegmentStreamResponse]:
        async for message in request_iterator:
            yield decoder_pb2.SegmentStreamResponse(request_id=message.request_id)


def _registrar(servicer: decoder_pb2_grpc.DecoderServiceServicer):  # noqa: ANN202
    return lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(servicer, s)


def test_rpcs_beyond_the_cap_get_resource_exhausted() -> None:
    async def main() -> tuple[str, str]:
        server, port = build_server([_registrar(EchoStreams())], [SERVICE], port=0,
                                    host="127.0.0.1", grace_s=0, max_concurrent_rpcs=2)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = decoder_pb2_grpc.DecoderServiceStub(channel)
                streams = []
                for number in range(2):
                    stream = stub.SegmentStream(timeout=10)
                    await stream.write(decoder_pb2.SegmentStreamRequest(request_id=str(number)))
                    assert (await stream.read()).request_id == str(number)
                    streams.append(stream)
                health = health_pb2_grpc.HealthStub(channel)
                try:
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    beyond = "OK"
                except grpc.aio.AioRpcError as exc:
                    beyond = exc.code().name
                for stream in streams:
                    await stream.done_writing()
                    await stream.read()
                await asyncio.sleep(0.2)  # let the server retire both
                after = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return beyond, health_pb2.HealthCheckResponse.ServingStatus.Name(after.status)
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == ("RESOURCE_EXHAUSTED", "NOT_SERVING")


def test_tls_server_answers_health_in_plaintext_on_the_health_port(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    health_port = free_port()

    async def main() -> dict[str, str]:
        server, port = build_server(
            [_registrar(EchoStreams())], [SERVICE], port=0, host="127.0.0.1", grace_s=0,
            server_credentials=server_credentials(pki.server_cert, pki.server_key),
            health_port=health_port)
        await server.start()
        await server.mark_serving()
        seen: dict[str, str] = {}

        async def outcome(name: str, call) -> None:  # noqa: ANN001
            try:
                reply = await call
                seen[name] = ("OK" if not hasattr(reply, "status") else
                              health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.aio.AioRpcError as exc:
                seen[name] = exc.code().name

        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:
                await outcome("health", health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=5))
                await outcome("segment", decoder_pb2_grpc.DecoderServiceStub(plain).Segment(
                    decoder_pb2.SegmentRequest(), timeout=5))
                reflect = reflection_pb2_grpc.ServerReflectionStub(plain).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
                try:
                    async for _ in reflect:
                        pass
                    seen["reflection"] = "OK"
                except grpc.aio.AioRpcError as exc:
                    seen["reflection"] = exc.code().name
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain_to_tls:
                await outcome("main port in plaintext", health_pb2_grpc.HealthStub(
                    plain_to_tls).Check(health_pb2.HealthCheckRequest(), timeout=5))
            creds = channels.channel_credentials(pki.ca_cert)
            async with grpc.aio.secure_channel(f"localhost:{port}", creds) as tls:
                await outcome("main port over TLS", health_pb2_grpc.HealthStub(tls).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=5))
            await server.health.enter_graceful_shutdown()  # both ports tell the same
            async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:
                await outcome("health while stopping", health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=5))
        finally:
            await server.stop(0)
        return seen

    assert asyncio.run(main()) == {
        "health": "SERVING",
        "segment": "UNIMPLEMENTED",
        "reflection": "UNIMPLEMENTED",
        "main port in plaintext": "UNAVAILABLE",
        "main port over TLS": "SERVING",
        "health while stopping": "NOT_SERVING",
    }


def test_health_port_is_off_by_default() -> None:
    async def main() -> None:
        server, _ = build_server([], [], port=0, host="127.0.0.1", grace_s=0)
        assert server.health_server is None and server.health_port == 0
        await server.start()
        await server.stop(0)

    asyncio.run(main())


@pytest.mark.parametrize("idle_s", [2.0])
def test_an_idle_segment_stream_is_ended_with_stream_idle(idle_s: float) -> None:
    """A request resets the clock (answered, here NOT_READY: no model); then silence ends
    the stream with DEADLINE_EXCEEDED / STREAM_IDLE after about ``idle_s``."""

    async def main() -> tuple[int, str, str, float]:
        servicer = DecoderServicer(stream_idle_timeout_s=idle_s)
        server, port = build_server([servicer.register], [SERVICE], port=0, host="127.0.0.1",
                                    grace_s=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = decoder_pb2_grpc.DecoderServiceStub(channel).SegmentStream(timeout=30)
                for number in range(3):  # gaps shorter than the timeout keep it open
                    await asyncio.sleep(idle_s / 4)
                    await stream.write(decoder_pb2.SegmentStreamRequest(
                        request_id=str(number), segment=decoder_pb2.SegmentRequest(
                            embedding_id="f" * 64)))
                    reply = await stream.read()
                    assert reply.request_id == str(number)
                answered = reply.error.code
                silent_since = time.monotonic()
                try:
                    await stream.read()
                    return answered, "no error", "", 0.0
                except grpc.aio.AioRpcError as exc:
                    return (answered, exc.code().name, error_from_rpc_error(exc).reason,
                            time.monotonic() - silent_since)
        finally:
            await server.stop(0)

    answered, code, reason, waited_s = asyncio.run(main())
    assert answered == grpc.StatusCode.UNAVAILABLE.value[0]  # NOT_READY, the stream went on
    assert (code, reason) == ("DEADLINE_EXCEEDED", "STREAM_IDLE")
    assert idle_s * 0.8 < waited_s < idle_s + 2.0
