"""The HTTP port of the real tiers (``--http-port``): a click over Connect JSON, Connect
binary and gRPC-Web answers what the gRPC port answers, the embedding streams out over
Connect streaming, API keys come as ``Authorization: Bearer``, errors carry the same
codes, messages and ErrorInfo, an oversized body is refused with the server still serving,
and CORS preflights are answered for the configured origin only."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)
from tests.helpers import REPO_ROOT
from tests.helpers.http_rpc import HttpRpcClient, detail_of_connect_error, status_of_trailers
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

SEGMENT = "/sam2.v1.DecoderService/Segment"
GET_EMBEDDING = "/sam2.v1.EncoderService/GetEmbedding"
ORIGIN = "http://localhost:8000"
KEY = secrets.token_urlsafe(24)
MAX_MESSAGE_MB = 2


@pytest.fixture(scope="module")
def tiers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[TierProcess, TierProcess]]:
    folder = tmp_path_factory.mktemp("http")
    keys = folder / "keys"
    keys.write_text(KEY + "\n")
    store = f"diskcache://{folder / 'store'}"
    common = ("--http-port", "0", "--api-keys-file", str(keys))
    with encoder_process(tiny_checkpoint, store, *common) as encoder, decoder_process(
            tiny_checkpoint, store, *common, "--encoder-address", encoder.address,
            # '=': a random key may start with '-', which argparse takes for a flag.
            f"--encoder-api-key={KEY}", "--http-cors-origins", ORIGIN,
            "--max-message-mb", str(MAX_MESSAGE_MB)) as decoder:
        yield encoder, decoder


def bearer() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def click(embedding_id: str = "", image: bytes = b"") -> decoder_pb2.SegmentRequest:
    point = common_pb2.Point(x_px=420, y_px=260, label=common_pb2.POINT_LABEL_FOREGROUND)
    request = decoder_pb2.SegmentRequest(embedding_id=embedding_id,
                                         prompts=[decoder_pb2.Prompt(points=[point])])
    if image:
        request.image.encoded_bytes = image
    return request


def without_handles(response: decoder_pb2.SegmentResponse) -> decoder_pb2.SegmentResponse:
    """Logits handles name server-side state and differ per call; the rest must not."""
    copy = decoder_pb2.SegmentResponse()
    copy.CopyFrom(response)
    for result in copy.results:
        for candidate in result.candidates:
            assert candidate.logits_handle
            candidate.ClearField("logits_handle")
    return copy


def grpc_segment(decoder: TierProcess, request: decoder_pb2.SegmentRequest
                 ) -> decoder_pb2.SegmentResponse:
    with grpc.insecure_channel(decoder.address) as channel:
        return decoder_pb2_grpc.DecoderServiceStub(channel).Segment(
            request, metadata=[("authorization", f"Bearer {KEY}")], timeout=120)


def test_a_click_over_json_proto_and_grpc_web_equals_the_grpc_answer(
        tiers: tuple[TierProcess, TierProcess]) -> None:
    _, decoder = tiers
    image = (REPO_ROOT / "samples" / "scene.jpg").read_bytes()
    with HttpRpcClient(decoder.http_url) as client:
        # The first click sends the image (the decoder asks the encoder), as curl would.
        document = {"image": {"encoded_bytes": base64.b64encode(image).decode()},
                    "prompts": [{"points": [{"x_px": 420, "y_px": 260,
                                             "label": "POINT_LABEL_FOREGROUND"}]}]}
        first = client.connect_json(SEGMENT, document, bearer())
        assert first.status == 200, first.body[:500]
        embedding_id = first.json()["embedding"]["embeddingId"]
        expected = without_handles(grpc_segment(decoder, click(embedding_id)))
        assert expected.results[0].candidates
        as_json = json_format.Parse(first.body, decoder_pb2.SegmentResponse())
        assert without_handles(as_json) == expected
        # Later clicks send only the id.
        as_proto = client.connect_proto(SEGMENT, click(embedding_id), bearer())
        assert as_proto.status == 200 and as_proto.headers["content-type"] == "application/proto"
        assert without_handles(decoder_pb2.SegmentResponse.FromString(as_proto.body)) == expected
        for text in (False, True):
            reply, messages, trailers = client.grpc_web(SEGMENT, click(embedding_id), text,
                                                        bearer())
            assert reply.status == 200 and trailers["grpc-status"] == "0"
            assert [without_handles(decoder_pb2.SegmentResponse.FromString(m))
                    for m in messages] == [expected]
        # A refinement with the chosen candidate's handle, over JSON.
        handle = as_json.results[0].candidates[as_json.results[0].best_index].logits_handle
        refine = json_format.MessageToDict(click(embedding_id))
        refine["prompts"][0]["logitsHandle"] = handle
        refined = client.connect_json(SEGMENT, refine, bearer())
        assert refined.status == 200, refined.body[:500]


def test_the_embedding_streams_out_over_connect(tiers: tuple[TierProcess, TierProcess]) -> None:
    encoder, decoder = tiers
    image = (REPO_ROOT / "samples" / "scene.jpg").read_bytes()
    embedding_id = grpc_segment(decoder, click(image=image)).embedding.embedding_id
    request = encoder_pb2.GetEmbeddingRequest(embedding_id=embedding_id,
                                              chunk_size_bytes=1 << 20)
    with grpc.insecure_channel(encoder.address) as channel:
        over_grpc = list(encoder_pb2_grpc.EncoderServiceStub(channel).GetEmbedding(
            request, metadata=[("x-api-key", KEY)], timeout=120))
    with HttpRpcClient(encoder.http_url) as client:
        reply, messages, end = client.connect_stream(GET_EMBEDDING, [request],
                                                     headers=bearer())
    assert reply.status == 200 and end == {}
    assert [encoder_pb2.GetEmbeddingResponse.FromString(m) for m in messages] == over_grpc
    assert len(over_grpc) > 1  # several chunks, so several envelopes


def test_errors_match_the_grpc_port(tiers: tuple[TierProcess, TierProcess]) -> None:
    _, decoder = tiers
    other_model = click("0" * 64)
    other_model.model_id = "sam2.1/hiera_large"
    cases = [(click("0" * 64), 404, "not_found", "EMBEDDING_NOT_FOUND"),
             (other_model, 400, "invalid_argument", "UNKNOWN_MODEL")]
    with HttpRpcClient(decoder.http_url) as client:
        for request, http_status, code, reason in cases:
            with pytest.raises(grpc.RpcError) as failed:
                grpc_segment(decoder, request)
            expected = rpc_status.from_call(failed.value)
            reply = client.connect_json(SEGMENT, request, bearer())
            assert reply.status == http_status
            error = reply.json()
            assert (error["code"], error["message"]) == (code, expected.message)
            info = detail_of_connect_error(error, error_details_pb2.ErrorInfo)
            expected_info = error_details_pb2.ErrorInfo()
            expected.details[0].Unpack(expected_info)
            assert info == expected_info and info.reason == reason
            _, _, trailers = client.grpc_web(SEGMENT, request, headers=bearer())
            assert status_of_trailers(trailers) == expected
        missing_key = client.connect_json(SEGMENT, click("0" * 64))
        assert missing_key.status == 401 and missing_key.json()["code"] == "unauthenticated"


def test_an_oversized_body_is_refused_and_the_server_goes_on(
        tiers: tuple[TierProcess, TierProcess]) -> None:
    _, decoder = tiers
    huge = {"embedding_id": "x", "image": {"encoded_bytes": base64.b64encode(
        b"\0" * (MAX_MESSAGE_MB << 20)).decode()}}
    with HttpRpcClient(decoder.http_url) as client:
        reply = client.post(SEGMENT, json.dumps(huge).encode(), "application/json", bearer())
    assert reply.status == 429 and reply.headers["connection"] == "close"
    assert detail_of_connect_error(
        reply.json(), error_details_pb2.ErrorInfo).reason == "MESSAGE_TOO_LARGE"
    with HttpRpcClient(decoder.http_url) as client:
        still = client.connect_json(SEGMENT, click("0" * 64), bearer())
    assert still.status == 404  # answered: the server is serving


def test_cors_preflight_for_the_configured_origin(tiers: tuple[TierProcess, TierProcess]) -> None:
    _, decoder = tiers
    with HttpRpcClient(decoder.http_url) as client:
        allowed = client.request("OPTIONS", SEGMENT, headers={
            "origin": ORIGIN, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type"})
        other = client.request("OPTIONS", SEGMENT, headers={
            "origin": "http://elsewhere.example", "access-control-request-method": "POST"})
    assert allowed.status == 204 and allowed.headers["access-control-allow-origin"] == ORIGIN
    assert other.status == 403
