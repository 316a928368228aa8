"""Idle streams survive the clients' keepalive pings: the servers accept a ping every
``MIN_CLIENT_PING_INTERVAL_MS`` (10 s; clients ping every 30 s) where gRPC's default policy
answers the third early ping with GOAWAY "too_many_pings" and kills every stream on the
connection. Time is compressed: the client pings every second, our policy accepts 0.5 s."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sam2_shared.serving.server import build_server, connection_options

CLIENT_PINGS = [
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# gRPC's own server policy, stated explicitly: pings without data at most every 5 minutes.
GRPC_DEFAULT_POLICY = [("grpc.http2.min_ping_interval_without_data_ms", 300_000),
                       ("grpc.http2.max_ping_strikes", 2)]


async def idle_stream_outcome(options: list[tuple[str, int]], idle_s: float = 6.0) -> str:
    """Open a health Watch, leave it idle while the client pings, then see if it lives."""
    server, port = build_server([], [], port=0, host="127.0.0.1", grace_s=0,
                                options=options)
    await server.start()
    await server.mark_serving()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=CLIENT_PINGS) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            await asyncio.sleep(idle_s)
            try:
                await asyncio.wait_for(watch.read(), timeout=1.0)
            except asyncio.TimeoutError:
                watch.cancel()
                return "alive"  # nothing to read, and no error: the stream is still open
            except grpc.aio.AioRpcError as exc:
                return f"dead: {exc.code().name} {exc.details()}"
            return "message"
    finally:
        await server.stop(0)


def test_idle_stream_survives_pings_under_our_policy() -> None:
    options = [*connection_options(min_client_ping_interval_ms=500)]
    assert asyncio.run(idle_stream_outcome(options)) == "alive"


def test_the_default_policy_kills_it_so_the_test_can_fail() -> None:
    outcome = asyncio.run(idle_stream_outcome(GRPC_DEFAULT_POLICY))
    assert outcome.startswith("dead: UNAVAILABLE"), outcome


@pytest.mark.parametrize("name", ["grpc.keepalive_permit_without_calls",
                                  "grpc.http2.min_ping_interval_without_data_ms",
                                  "grpc.max_connection_age_ms",
                                  "grpc.max_connection_age_grace_ms"])
def test_every_server_sets_the_connection_policy(name: str) -> None:
    assert name in dict(connection_options())
