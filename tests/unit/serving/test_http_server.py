"""The HTTP port (Connect, gRPC-Web, CORS, static files) of a real ``build_server`` on
127.0.0.1, with fake servicers: the same handlers and interceptors as the gRPC port answer,
errors come from the one table in each protocol's form, and every bound holds."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import secrets
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
)
from sam2_shared.errors import (
    EmbeddingNotFoundError,
    InvalidInputError,
    ResourceExhaustedError,
)
from sam2_shared.serving.auth import ApiKey, ApiKeyRing, AuthInterceptor
from sam2_shared.serving.metrics import Sam2Metrics
from sam2_shared.serving.server import Sam2Server, build_server
from tests.helpers.fake_servicers import FakeDecoder, FrameCountingTracking
from tests.helpers.http_rpc import (
    HttpReply,
    HttpRpcClient,
    detail_of_connect_error,
    envelope,
    split_frames,
    status_of_trailers,
)

SEGMENT = "/sam2.v1.DecoderService/Segment"
SEGMENT_STREAM = "/sam2.v1.DecoderService/SegmentStream"
PROPAGATE = "/sam2.v1.TrackingService/Propagate"
FRAMES = "/sam2.v1.TrackingService/StartSessionFromFrames"
CHECK = "/grpc.health.v1.Health/Check"
KEY = secrets.token_urlsafe(24)
TENANT_KEY = secrets.token_urlsafe(24)

FAILURES: dict[str, Exception] = {
    "missing": EmbeddingNotFoundError("embedding abc is not stored; call EmbedImages first",
                                      embedding_id="abc"),
    "invalid": InvalidInputError("box [5, 5, 1, 1] is degenerate", reason="EMPTY_PROMPT",
                                 prompt_index="0"),
    "busy": ResourceExhaustedError("encoder queue is full", reason="QUEUE_FULL",
                                   retry_delay_s="0.25"),
    "boom": RuntimeError("secret internal detail /etc/passwd"),
}


class FakeTracking(FrameCountingTracking):
    async def Propagate(self, request, context):  # type: ignore[no-untyped-def]
        for index in range(3):
            if request.session_id == "fails" and index == 2:
                raise EmbeddingNotFoundError("session fails expired", reason="SESSION_NOT_FOUND")
            yield tracking_pb2.PropagateResponse(frame=tracking_pb2.FrameMasks(frame_index=index))


@contextlib.asynccontextmanager
async def running(static_dir: Path | None = None, keys: bool = False,
                  sessions_per_key: int = 0, tracking: FakeTracking | None = None,
                  **kwargs: Any) -> AsyncIterator[tuple[Sam2Server, FakeDecoder, Sam2Metrics]]:
    decoder, tracking = FakeDecoder(FAILURES), tracking or FakeTracking()
    metrics = Sam2Metrics(process_collectors=False)
    ring = ApiKeyRing([ApiKey(KEY), ApiKey(TENANT_KEY, "tenant")]) if keys else None
    server, _ = build_server(
        [lambda s: decoder_pb2_grpc.add_DecoderServiceServicer_to_server(decoder, s),
         lambda s: tracking_pb2_grpc.add_TrackingServiceServicer_to_server(tracking, s)],
        ["sam2.v1.DecoderService", "sam2.v1.TrackingService"], port=0, host="127.0.0.1",
        interceptors=[metrics.interceptor(),
                      AuthInterceptor(ring, max_streams_per_key=sessions_per_key)], http_port=0,
        static_dir=static_dir, **kwargs)
    await server.start()
    await server.mark_serving()
    try:
        yield server, decoder, metrics
    finally:
        await server.stop(0)


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


async def call(server: Sam2Server, function: Callable[[HttpRpcClient], Any]) -> Any:
    """``function(client)`` in a thread (the server runs in this loop)."""
    def in_thread() -> Any:
        with HttpRpcClient(f"http://127.0.0.1:{server.http_port}") as client:
            return function(client)

    return await asyncio.to_thread(in_thread)


def segment_request(embedding_id: str = "e1", prompts: int = 1) -> decoder_pb2.SegmentRequest:
    point = common_pb2.Point(x_px=1, y_px=2, label=common_pb2.POINT_LABEL_FOREGROUND)
    return decoder_pb2.SegmentRequest(embedding_id=embedding_id,
                                      prompts=[decoder_pb2.Prompt(points=[point])] * prompts)


def test_connect_unary_json_and_proto_call_the_servicer() -> None:
    async def scenario() -> None:
        async with running() as (server, _, metrics):
            health = await call(server, lambda c: c.connect_json(CHECK, {}))
            assert (health.status, health.json()) == (200, {"status": "SERVING"})
            # snake_case field names and enum names, as a curl user writes them
            document = {"embedding_id": "e1", "prompts": [
                {"points": [{"x_px": 1, "y_px": 2, "label": "POINT_LABEL_FOREGROUND"}]}] * 2}
            as_json = await call(server, lambda c: c.connect_json(SEGMENT, document))
            assert as_json.status == 200, as_json.body
            assert as_json.headers["content-type"] == "application/json"
            assert as_json.json() == {"embedding": {"embeddingId": "e1", "heightPx": 2}}
            as_proto = await call(server, lambda c: c.connect_proto(SEGMENT, segment_request(
                prompts=2)))
            assert as_proto.headers["content-type"] == "application/proto"
            assert decoder_pb2.SegmentResponse.FromString(as_proto.body).embedding.height_px == 2
        labels = {"grpc_service": "sam2.v1.DecoderService", "grpc_method": "Segment",
                  "grpc_type": "unary", "protocol": "connect", "grpc_code": "OK"}
        assert metrics.registry.get_sample_value("sam2_grpc_server_handled_total", labels) == 2

    run(scenario())


def test_gzip_requests_are_decompressed() -> None:
    async def scenario() -> None:
        async with running() as (server, _, _metrics):
            packed = gzip.compress(segment_request("zipped").SerializeToString())
            unary = await call(server, lambda c: c.post(SEGMENT, packed, "application/proto",
                                                        {"content-encoding": "gzip"}))
            assert decoder_pb2.SegmentResponse.FromString(unary.body).embedding.embedding_id \
                == "zipped"
            streamed = await call(server, lambda c: c.post(
                SEGMENT, envelope(1, packed), "application/connect+proto",
                {"connect-content-encoding": "gzip"}))
            frames = split_frames(streamed.body)
            assert decoder_pb2.SegmentResponse.FromString(frames[0][1]).embedding.embedding_id \
                == "zipped"
            broken = await call(server, lambda c: c.post(SEGMENT, packed[:-8], "application/proto",
                                                         {"content-encoding": "gzip"}))
            assert broken.status == 400

    run(scenario())


def test_errors_are_the_grpc_ports_in_connect_and_grpc_web_form() -> None:
    async def scenario() -> None:
        async with running() as (server, _, metrics):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = decoder_pb2_grpc.DecoderServiceStub(channel)
                for name, http_status, code in (("missing", 404, "not_found"),
                                                ("invalid", 400, "invalid_argument"),
                                                ("busy", 429, "resource_exhausted"),
                                                ("boom", 500, "internal")):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await stub.Segment(segment_request(name))
                    expected = rpc_status.from_call(failed.value)
                    reply = await call(server, lambda c, n=name: c.connect_json(
                        SEGMENT, segment_request(n)))
                    assert reply.status == http_status
                    error = reply.json()
                    assert error["code"] == code and error["message"] == expected.message
                    info = detail_of_connect_error(error, error_details_pb2.ErrorInfo)
                    assert info is not None
                    assert info.SerializeToString() == _error_info(expected).SerializeToString()
                    assert error["details"][0]["debug"]["reason"] == info.reason
                    _, messages, trailers = await call(server, lambda c, n=name: c.grpc_web(
                        SEGMENT, segment_request(n)))
                    assert messages == [] and status_of_trailers(trailers) == expected
            assert "secret" not in json.dumps(error)  # internal errors say nothing more
            assert _error_info(expected).reason == "INTERNAL"
        labels = {"grpc_service": "sam2.v1.DecoderService", "grpc_method": "Segment",
                  "grpc_type": "unary", "grpc_code": "NOT_FOUND"}
        for protocol in ("grpc", "connect", "grpc_web"):
            assert metrics.registry.get_sample_value(
                "sam2_grpc_server_handled_total", {**labels, "protocol": protocol}) == 1

    run(scenario())


def _error_info(status: Any) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info


def test_streams_over_connect_and_grpc_web() -> None:
    async def scenario() -> None:
        async with running() as (server, _, _metrics):
            request = tracking_pb2.PropagateRequest(session_id="s1")
            for codec in ("proto", "json"):
                reply, messages, end = await call(server, lambda c, k=codec: c.connect_stream(
                    PROPAGATE, [request], k))
                assert reply.headers["content-type"] == f"application/connect+{codec}"
                assert reply.headers["transfer-encoding"] == "chunked"
                assert len(messages) == 3 and end == {}
            frames = [tracking_pb2.PropagateResponse.FromString(m).frame.frame_index
                      for m in messages if codec == "proto"] or [
                json.loads(m)["frame"].get("frameIndex", 0) for m in messages]
            assert frames == [0, 1, 2]
            # An error after two frames ends the stream with it (HTTP status stays 200).
            reply, messages, end = await call(server, lambda c: c.connect_stream(
                PROPAGATE, [tracking_pb2.PropagateRequest(session_id="fails")]))
            assert reply.status == 200 and len(messages) == 2
            assert end["error"]["code"] == "not_found"
            assert end["error"]["details"][0]["debug"]["reason"] == "SESSION_NOT_FOUND"
            for text in (False, True):
                _, messages, trailers = await call(server, lambda c, t=text: c.grpc_web(
                    PROPAGATE, request, text=t))
                assert len(messages) == 3 and trailers["grpc-status"] == "0"
            # Bidirectional over HTTP/1.1: the whole request stream, then the answers.
            asks = [decoder_pb2.SegmentStreamRequest(request_id=f"r{i}") for i in range(3)]
            _, messages, end = await call(server, lambda c: c.connect_stream(
                SEGMENT_STREAM, asks))
            assert [decoder_pb2.SegmentStreamResponse.FromString(m).request_id
                    for m in messages] == ["r0", "r1", "r2"] and end == {}
            # A unary method takes exactly one message.
            reply, _, end = await call(server, lambda c: c.connect_stream(
                SEGMENT, [segment_request(), segment_request()]))
            assert end["error"]["code"] == "invalid_argument"

    run(scenario())


def test_api_keys_from_bearer_or_x_api_key_with_tenancy() -> None:
    async def scenario() -> None:
        async with running(keys=True) as (server, _, _metrics):
            missing = await call(server, lambda c: c.connect_json(SEGMENT, segment_request()))
            assert missing.status == 401 and missing.json()["code"] == "unauthenticated"
            info = detail_of_connect_error(missing.json(), error_details_pb2.ErrorInfo)
            assert info is not None and info.reason == "API_KEY_MISSING"
            wrong = await call(server, lambda c: c.connect_json(
                SEGMENT, segment_request(), {"authorization": "Bearer " + "x" * 30}))
            assert wrong.status == 401
            assert detail_of_connect_error(
                wrong.json(), error_details_pb2.ErrorInfo).reason == "API_KEY_INVALID"
            bearer = await call(server, lambda c: c.connect_json(
                SEGMENT, segment_request(), {"authorization": f"Bearer {TENANT_KEY}"}))
            assert bearer.status == 200 and bearer.json()["embedding"]["modelId"] == "tenant"
            header = await call(server, lambda c: c.connect_json(
                SEGMENT, segment_request(), {"x-api-key": KEY}))
            assert header.status == 200 and "modelId" not in header.json()["embedding"]
            _, _, trailers = await call(server, lambda c: c.grpc_web(
                SEGMENT, segment_request(), headers={"authorization": f"Bearer {KEY}"}))
            assert trailers["grpc-status"] == "0"
            health = await call(server, lambda c: c.connect_json(CHECK, {}))
            assert health.status == 200  # open, like on the gRPC port

    run(scenario())


def test_http_streams_share_the_keys_session_limit_with_grpc() -> None:
    """The HTTP port runs the same interceptor: with a key's one stream slot held by a gRPC
    upload, a Connect client-streaming call of that key is refused, another key's is not,
    and the slot is free again once the upload ends."""
    tracking = FakeTracking()
    frame = tracking_pb2.StartSessionFromFramesRequest(model_id="m")

    async def upload(server: Sam2Server, key: str) -> dict[str, Any]:
        _, messages, end = await call(server, lambda c: c.connect_stream(
            FRAMES, [frame, frame], headers={"x-api-key": key}))
        if messages:
            return {"frames": tracking_pb2.StartSessionFromFramesResponse.FromString(
                messages[0]).frame_count}
        return {"code": end["error"]["code"],
                "reason": end["error"]["details"][0]["debug"]["reason"]}

    async def scenario() -> None:
        async with running(keys=True, sessions_per_key=1, tracking=tracking) as (
                server, _, _metrics):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                held = tracking_pb2_grpc.TrackingServiceStub(channel).StartSessionFromFrames(
                    timeout=30, metadata=(("x-api-key", KEY),))
                await held.write(frame)
                await tracking.receiving.wait()
                assert await upload(server, KEY) == {"code": "resource_exhausted",
                                                     "reason": "TOO_MANY_SESSIONS"}
                assert await upload(server, TENANT_KEY) == {"frames": 2}
                await held.done_writing()
                assert (await held).frame_count == 1
            assert await upload(server, KEY) == {"frames": 2}

    run(scenario())


def test_bad_requests_are_answered_and_the_server_goes_on() -> None:
    async def scenario() -> None:
        async with running(max_message_bytes=64 * 1024) as (server, _, _metrics):
            def misuse(client: HttpRpcClient) -> list[HttpReply]:
                return [
                    client.post(SEGMENT, b"{not json", "application/json"),
                    client.connect_json(SEGMENT, {"embedding_id": "e1", "prompt": []}),
                    client.post(SEGMENT, b"\xff\xff\xff", "application/proto"),
                    client.post("/sam2.v1.DecoderService/Nope", b"{}", "application/json"),
                    client.connect_json(SEGMENT, segment_request(), {
                        "connect-timeout-ms": "soon"}),
                ]

            replies = await call(server, misuse)
            assert [r.status for r in replies] == [400, 400, 400, 501, 400]
            assert [r.json()["code"] for r in replies] == [
                "invalid_argument", "invalid_argument", "invalid_argument", "unimplemented",
                "invalid_argument"]
            assert "prompt" in replies[1].json()["message"]  # names the unknown field
            assert detail_of_connect_error(
                replies[0].json(), error_details_pb2.ErrorInfo).reason == "INVALID_REQUEST_BODY"

            big = await call(server, lambda c: c.post(SEGMENT, b"x" * 65 * 1024,
                                                      "application/json"))
            assert big.status == 429 and big.headers["connection"] == "close"
            assert detail_of_connect_error(
                big.json(), error_details_pb2.ErrorInfo).reason == "MESSAGE_TOO_LARGE"
            unsupported = await call(server, lambda c: c.post(SEGMENT, b"{}", "text/plain"))
            assert unsupported.status == 415 and "application/json" in unsupported.headers[
                "accept-post"]
            brotli = await call(server, lambda c: c.post(
                SEGMENT, envelope(1, b"x"), "application/connect+proto",
                {"connect-content-encoding": "br"}))
            assert json.loads(brotli.body[5:])["error"]["code"] == "unimplemented"
            bomb = gzip.compress(b"\0" * (1 << 20))  # 1 KiB that inflates to 1 MiB
            inflated = await call(server, lambda c: c.post(
                SEGMENT, bomb, "application/proto", {"content-encoding": "gzip"}))
            assert inflated.status == 429 and detail_of_connect_error(
                inflated.json(), error_details_pb2.ErrorInfo).reason == "MESSAGE_TOO_LARGE"
            assert (await raw(server, b"GET / HTTP/1.1\r\n" + b"x-a: b\r\n" * 2000 + b"\r\n")
                    ).startswith(b"HTTP/1.1 431")
            assert (await raw(server, b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400")
            chunked = (b"POST " + SEGMENT.encode() + b" HTTP/1.1\r\ncontent-type: application/"
                       b"proto\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            payload = segment_request("chunked").SerializeToString()
            answer = await raw(server, chunked + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload),
                                                                               payload))
            assert answer.startswith(b"HTTP/1.1 200") and b"chunked" in answer
            too_long = await raw(server,
                                 chunked + b"10001\r\n" + b"x" * 65537 + b"\r\n0\r\n\r\n")
            assert too_long.startswith(b"HTTP/1.1 429") and b"MESSAGE_TOO_LARGE" in too_long
            assert (await raw(server, chunked + b"zz\r\n")).startswith(b"HTTP/1.1 400")
            assert (await raw(server, chunked.replace(b"chunked", b"gzip"))).startswith(
                b"HTTP/1.1 501")
            still = await call(server, lambda c: c.connect_json(SEGMENT, segment_request()))
            assert still.status == 200

    run(scenario())


async def raw(server: Sam2Server, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; what comes back until the server closes."""
    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    return await asyncio.to_thread(exchange)


def test_deadline_and_busy_server() -> None:
    async def scenario() -> None:
        async with running(max_concurrent_rpcs=1) as (server, decoder, _metrics):
            late = await call(server, lambda c: c.connect_json(
                SEGMENT, segment_request("slow"), {"connect-timeout-ms": "200"}))
            assert late.status == 504 and late.json()["code"] == "deadline_exceeded"
            decoder.entered.clear()
            held = asyncio.ensure_future(call(server, lambda c: c.connect_json(
                SEGMENT, segment_request("slow"))))
            await decoder.entered.wait()
            busy = await call(server, lambda c: c.connect_json(SEGMENT, segment_request()))
            assert busy.status == 429
            assert detail_of_connect_error(
                busy.json(), error_details_pb2.ErrorInfo).reason == "SERVER_BUSY"
            decoder.release.set()
            assert (await held).status == 200
            assert (await call(server, lambda c: c.connect_json(
                SEGMENT, segment_request()))).status == 200

    run(scenario())


def test_cors_only_for_configured_origins() -> None:
    allowed, other = "https://app.example.org", "https://evil.example.net"

    async def scenario() -> None:
        async with running(http_cors_origins=(allowed,)) as (server, _, _metrics):
            def preflight(client: HttpRpcClient, origin: str) -> HttpReply:
                return client.request("OPTIONS", SEGMENT, headers={
                    "origin": origin, "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization, content-type"})

            ok = await call(server, lambda c: preflight(c, allowed))
            assert ok.status == 204
            assert ok.headers["access-control-allow-origin"] == allowed
            assert "authorization" in ok.headers["access-control-allow-headers"]
            assert "POST" in ok.headers["access-control-allow-methods"]
            refused = await call(server, lambda c: preflight(c, other))
            assert refused.status == 403 and "access-control-allow-origin" not in refused.headers
            answer = await call(server, lambda c: c.connect_json(
                CHECK, {}, {"origin": allowed}))
            assert answer.headers["access-control-allow-origin"] == allowed
            assert "grpc-status" in answer.headers["access-control-expose-headers"]
            foreign = await call(server, lambda c: c.connect_json(CHECK, {}, {"origin": other}))
            assert "access-control-allow-origin" not in foreign.headers

    run(scenario())


def test_static_files_by_name_only(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text("<h1>page</h1>")
    (site / "app.js").write_text("console.log(1)")
    (site / ".secret").write_text("no")
    (site / "sub" / "x.css").write_text("no")
    (tmp_path / "outside.txt").write_text("no")
    (site / "link.txt").symlink_to(tmp_path / "outside.txt")

    async def scenario() -> None:
        async with running(static_dir=site) as (server, _, _metrics):
            def fetch(client: HttpRpcClient) -> dict[str, HttpReply]:
                paths = ["/", "/index.html", "/app.js", "/.secret", "/sub/x.css",
                         "/../outside.txt", "/%2e%2e/outside.txt", "/..%2foutside.txt",
                         "/link.txt", "/missing.js"]
                return {path: client.request("GET", path) for path in paths}

            replies = await call(server, fetch)
            assert replies["/"].body == b"<h1>page</h1>"
            assert replies["/"].headers["content-type"] == "text/html; charset=utf-8"
            assert replies["/app.js"].headers["content-type"].startswith("text/javascript")
            assert replies["/app.js"].headers["x-content-type-options"] == "nosniff"
            refused = [p for p, r in replies.items() if r.status == 404]
            assert refused == ["/.secret", "/sub/x.css", "/../outside.txt",
                               "/%2e%2e/outside.txt", "/..%2foutside.txt", "/link.txt",
                               "/missing.js"]
            assert all(b"no" != replies[p].body for p in refused)
            head = await call(server, lambda c: c.request("HEAD", "/app.js"))
            assert head.status == 200 and head.body == b""
            put = await call(server, lambda c: c.request("PUT", "/app.js"))
            assert put.status == 405

    run(scenario())


def test_no_http_port_unless_asked() -> None:
    async def scenario() -> None:
        server, _ = build_server([], [], port=0, host="127.0.0.1")
        await server.start()
        try:
            assert server.http_server is None and server.http_port == 0
        finally:
            await server.stop(0)

    run(scenario())


def test_health_check_request_over_proto_matches_grpc() -> None:
    async def scenario() -> None:
        async with running() as (server, _, _metrics):
            reply = await call(server, lambda c: c.connect_proto(
                CHECK, health_pb2.HealthCheckRequest(service="sam2.v1.DecoderService")))
            assert health_pb2.HealthCheckResponse.FromString(reply.body).status == \
                health_pb2.HealthCheckResponse.SERVING

    run(scenario())
