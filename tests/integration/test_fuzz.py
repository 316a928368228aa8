"""Property-based fuzzing (hypothesis) of the real tiers on 127.0.0.1: random prompts
(coordinates incl. NaN/inf/huge, labels, boxes, mask logits of random length, handles), random
and truncated image bytes, raw images with lying shapes. Every answer is OK or a clean error
with an ErrorInfo reason, never INTERNAL/UNKNOWN, never internal text; the servers stay
healthy. Examples are bounded (count and per-example deadline) to keep CI short."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
)
from sam2_shared.client import Sam2Client
from sam2_shared.client.channels import channel_options
from sam2_shared.wire.status import error_from_rpc_error, error_from_status
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
EXAMPLES = 150
FORBIDDEN_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
LEAK_MARKERS = ("Traceback", "File \"", ".py", "site-packages", "Exception", "0x7f")
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow])


@dataclass
class FuzzStack:
    encoder: TierProcess
    decoder: TierProcess
    embedding_id: str
    channels: list[grpc.Channel]
    decoder_stub: decoder_pb2_grpc.DecoderServiceStub
    encoder_stub: encoder_pb2_grpc.EncoderServiceStub


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[FuzzStack]:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-fuzz-")
    encoder = encoder_process(tiny_checkpoint, store).start()
    decoder = decoder_process(tiny_checkpoint, store, "--encoder-address", encoder.address,
                              "--max-image-pixels", "4000000")
    try:
        decoder.start()
        with Sam2Client(encoder=encoder.address) as client:
            [ref] = client.embed_images(synthetic_rgb(120, 160, seed=3), input_color_format="rgb")
        channels = [grpc.insecure_channel(p.address, options=channel_options())
                    for p in (decoder, encoder)]
        yield FuzzStack(encoder, decoder, ref.embedding_id, channels,
                        decoder_pb2_grpc.DecoderServiceStub(channels[0]),
                        encoder_pb2_grpc.EncoderServiceStub(channels[1]))
        for channel in channels:
            channel.close()
        for process in (decoder, encoder):
            assert process.process is not None and process.process.poll() is None, \
                f"{process.module} died:\n{process.log_tail()}"
    finally:
        decoder.stop()
        encoder.stop()


def check_clean_status(code: grpc.StatusCode, message: str, reason: str) -> None:
    assert code not in FORBIDDEN_CODES, (code, message)
    assert reason, f"{code} without an ErrorInfo reason: {message!r}"
    for marker in LEAK_MARKERS:
        assert marker not in message, (marker, message)


def call_clean(method, request) -> object | None:  # noqa: ANN001
    """The response, or None after checking the error is clean."""
    try:
        return method(request, timeout=30)
    except grpc.RpcError as exc:
        error = error_from_rpc_error(exc)
        check_clean_status(exc.code(), exc.details() or "", error.reason if
                           exc.code() not in (grpc.StatusCode.UNKNOWN,) else "")
        return None


# ----------------------------------------------------------------------- strategies

COORD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(min_value=-10, max_value=200, width=32),
    st.sampled_from([0.0, -0.0, 1e30, -1e30, float("nan"), float("inf"), 3.4e38]),
)
LABEL = st.one_of(st.integers(min_value=-2, max_value=4), st.sampled_from([1, 2]))


@st.composite
def prompts(draw) -> decoder_pb2.Prompt:  # noqa: ANN001
    prompt = decoder_pb2.Prompt()
    for _ in range(draw(st.integers(0, 5))):
        prompt.points.add(x_px=draw(COORD), y_px=draw(COORD), label=draw(LABEL))
    if draw(st.booleans()):
        prompt.box.CopyFrom(common_pb2.Box(x_min_px=draw(COORD), y_min_px=draw(COORD),
                                           x_max_px=draw(COORD), y_max_px=draw(COORD)))
    mask = draw(st.sampled_from(["none", "bytes", "full", "handle"]))
    if mask == "bytes":
        prompt.mask_logits = draw(st.binary(max_size=2048))
    elif mask == "full":  # the right length, random content (NaN patterns included)
        prompt.mask_logits = draw(st.binary(min_size=16, max_size=16)) * (256 * 256 * 4 // 16)
    elif mask == "handle":
        prompt.logits_handle = draw(st.text(max_size=80))
    if draw(st.booleans()):
        prompt.multimask_output = draw(st.booleans())
    return prompt


@st.composite
def segment_requests(draw) -> decoder_pb2.SegmentRequest:  # noqa: ANN001
    request = decoder_pb2.SegmentRequest(
        prompts=draw(st.lists(prompts(), max_size=4)),
        mask_format=draw(st.integers(-1, 5)),
        include_logits=draw(st.booleans()),
        model_id=draw(st.sampled_from(["", MODEL_ID, "sam2.1/nope", "x" * 300])),
    )
    return request, draw(st.sampled_from(["valid", "random", "empty"])), draw(st.text(max_size=90))


def _png(height: int, width: int, seed: int) -> bytes:
    ok, data = cv2.imencode(".png", synthetic_rgb(height, width, seed=seed))
    assert ok
    return data.tobytes()


def _jpeg(height: int, width: int, seed: int) -> bytes:
    ok, data = cv2.imencode(".jpg", synthetic_rgb(height, width, seed=seed))
    assert ok
    return data.tobytes()


VALID_PNG = _png(48, 64, 1)
VALID_JPEG = _jpeg(48, 64, 2)
# a PNG header announcing 100k x 100k pixels (decompression bomb)
BOMB_PNG = VALID_PNG[:16] + (100_000).to_bytes(4, "big") * 2 + VALID_PNG[24:]


@st.composite
def images(draw) -> common_pb2.Image:  # noqa: ANN001
    kind = draw(st.sampled_from(["random", "truncated", "corrupted", "bomb", "raw"]))
    if kind == "random":
        return common_pb2.Image(encoded_bytes=draw(st.binary(max_size=4096)))
    if kind == "truncated":
        source = draw(st.sampled_from([VALID_PNG, VALID_JPEG]))
        return common_pb2.Image(encoded_bytes=source[: draw(st.integers(0, len(source) - 1))])
    if kind == "corrupted":
        data = bytearray(draw(st.sampled_from([VALID_PNG, VALID_JPEG])))
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return common_pb2.Image(encoded_bytes=bytes(data))
    if kind == "bomb":
        return common_pb2.Image(encoded_bytes=BOMB_PNG)
    raw = common_pb2.RawImage(
        pixels=draw(st.binary(max_size=3 * 40 * 40)),
        height_px=draw(st.integers(-5, 60)), width_px=draw(st.integers(-5, 60)),
        channel_count=draw(st.integers(-1, 6)), color_format=draw(st.integers(-1, 3)))
    return common_pb2.Image(raw=raw)


# ----------------------------------------------------------------------- properties


@FUZZ_SETTINGS
@given(case=segment_requests())
def test_fuzzed_segment_requests_get_clean_answers(stack: FuzzStack, case) -> None:  # noqa: ANN001
    request, id_kind, random_id = case
    request.embedding_id = {"valid": stack.embedding_id, "random": random_id,
                            "empty": ""}[id_kind]
    response = call_clean(stack.decoder_stub.Segment, request)
    if response is not None:
        assert len(response.results) == len(request.prompts)


@FUZZ_SETTINGS
@given(image=images(), with_prompt=st.booleans())
def test_fuzzed_images_get_clean_answers(stack: FuzzStack, image, with_prompt: bool) -> None:  # noqa: ANN001
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=5, y_px=5, label=1)])
    request = decoder_pb2.SegmentRequest(image=image, prompts=[prompt] if with_prompt else [])
    call_clean(stack.decoder_stub.Segment, request)
    embed = encoder_pb2.EmbedImagesRequest(model_id=MODEL_ID, images=[image])
    response = call_clean(stack.encoder_stub.EmbedImages, embed)
    assert response is not None  # per-image errors never fail the call
    [result] = response.results
    if result.status.code != 0:
        error = error_from_status(result.status)
        check_clean_status(grpc.StatusCode.INVALID_ARGUMENT if result.status.code == 3 else
                           next(c for c in grpc.StatusCode if c.value[0] == result.status.code),
                           result.status.message, error.reason)


def test_servers_are_healthy_after_fuzzing(stack: FuzzStack) -> None:
    for channel in stack.channels:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # and a normal request still gives masks
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=60, y_px=50, label=1)])
    response = stack.decoder_stub.Segment(
        decoder_pb2.SegmentRequest(embedding_id=stack.embedding_id, prompts=[prompt]), timeout=30)
    assert response.results[0].candidates
