"""Property-based fuzzing (hypothesis) of the real tiers on 127.0.0.1: random prompts
(coordinates incl. NaN/inf/huge, labels, boxes, mask logits of random length, handles), random
and truncated image bytes, raw images with lying shapes; PutEmbedding uploads (random bytes, a
real entry with flipped bytes or rewritten metadata, lying headers, any chunking);
SegmentStream request sequences; every TrackingService method with random field values, in
random order on a live session; StartSessionFromFrames streams (no or a wrong model_id, random,
corrupt, bomb and lying raw frames, huge declared sizes, frames of another size, an empty
stream). Every answer is OK or a clean error with an ErrorInfo reason,
never INTERNAL/UNKNOWN, never internal text; the servers stay healthy. Examples are bounded
(count and per-example deadline) to keep CI short."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from sam2_shared.api.v1 import (
    common_pb2,
    decoder_pb2,
    decoder_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    tracking_pb2,
    tracking_pb2_grpc,
)
from sam2_shared.client.channels import channel_options
from sam2_shared.client.tracking import Sam2TrackingClient
from sam2_shared.errors import EmbeddingNotFoundError
from sam2_shared.store import codec
from sam2_shared.wire import image_to_proto
from sam2_shared.wire.status import error_from_rpc_error, error_from_status
from tests.helpers import hostile_payloads as payloads
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
EXAMPLES = 150
FORBIDDEN_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
LEAK_MARKERS = ("Traceback", "File \"", ".py", "site-packages", "Exception", "0x7f")
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow],
                         # a failure is shrunk and reported, not explained (minutes with uploads)
                         phases=[p for p in Phase if p is not Phase.explain])
# Uploads move up to 8 MiB, streams decode several requests, tracking calls propagate, frame
# streams have new frames embedded: fewer examples (measured on the 2-core machine: 8 s, 8 s,
# 35 s and 1-3 s).
UPLOAD_SETTINGS = settings(FUZZ_SETTINGS, max_examples=60)
STREAM_SETTINGS = settings(FUZZ_SETTINGS, max_examples=80)
TRACKING_SETTINGS = settings(FUZZ_SETTINGS, max_examples=60, deadline=30_000)
FRAME_COUNT = 3
# The video frames the fixture embeds: a stream of them is accepted without new encoder work.
VIDEO_FRAMES = [synthetic_rgb(48, 64, seed=30 + i) for i in range(FRAME_COUNT)]


@dataclass
class FuzzStack:
    encoder: TierProcess
    decoder: TierProcess
    embedding_id: str
    channels: list[grpc.Channel]
    decoder_stub: decoder_pb2_grpc.DecoderServiceStub
    encoder_stub: encoder_pb2_grpc.EncoderServiceStub
    tracking_stub: tracking_pb2_grpc.TrackingServiceStub
    entry: bytes = field(repr=False)  # embedding_id's stored entry, as GetEmbedding exports it
    frame_ids: list[str]  # FRAME_COUNT embedded video frames


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[FuzzStack]:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-fuzz-")
    encoder = encoder_process(tiny_checkpoint, store).start()
    decoder = decoder_process(tiny_checkpoint, store, "--encoder-address", encoder.address,
                              "--max-image-pixels", "4000000")
    try:
        decoder.start()
        with Sam2TrackingClient(encoder.address, decoder.address) as client:
            [ref] = client.embed_images(synthetic_rgb(120, 160, seed=3), input_color_format="rgb")
            frame_ids = client.embed_frames(VIDEO_FRAMES)
        channels = [grpc.insecure_channel(p.address, options=channel_options())
                    for p in (decoder, encoder)]
        encoder_stub = encoder_pb2_grpc.EncoderServiceStub(channels[1])
        entry = b"".join(part.chunk for part in encoder_stub.GetEmbedding(
            encoder_pb2.GetEmbeddingRequest(embedding_id=ref.embedding_id), timeout=30))
        yield FuzzStack(encoder, decoder, ref.embedding_id, channels,
                        decoder_pb2_grpc.DecoderServiceStub(channels[0]), encoder_stub,
                        tracking_pb2_grpc.TrackingServiceStub(channels[0]), entry, frame_ids)
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
        check_clean_rpc_error(exc)
        return None


def check_clean_rpc_error(exc: grpc.RpcError) -> None:
    error = error_from_rpc_error(exc)
    event(f"{exc.code().name} {error.reason}")  # the spread, with --hypothesis-show-statistics
    check_clean_status(exc.code(), exc.details() or "", error.reason if
                       exc.code() not in (grpc.StatusCode.UNKNOWN,) else "")


def check_clean_item_status(status) -> None:  # noqa: ANN001
    """A per-item ``google.rpc.Status`` (EmbedImages result, SegmentStream response)."""
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    error = error_from_status(status)
    event(f"{code.name} {error.reason}")
    check_clean_status(code, status.message, error.reason)


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
BOMB_PNG = payloads.png_header_only(100_000, 100_000)  # a decompression bomb's header


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
        check_clean_item_status(result.status)


# ----------------------------------------------------------------------- PutEmbedding

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12)
METADATA_KEYS = ("format_version", "kind", "dtype", "tensors", "payload_nbytes",
                 "payload_sha256", "embedding_id", "model_id", "original_hw")
TENSOR_KEYS = ("name", "shape", "offset", "nbytes", "dtype")
UPLOAD_LIES = ("size_bytes", "sha256", "format", "model_id", "embedding_id", "no_header",
               "empty_stream")
INT64 = st.integers(-(2**63), 2**63 - 1)


def mostly(usual, hostile) -> st.SearchStrategy:  # noqa: ANN001
    """``usual`` (a value or a strategy) three times in four, else ``hostile``: calls that get
    past the first check reach the deeper ones."""
    usual = usual if isinstance(usual, st.SearchStrategy) else st.just(usual)
    return st.integers(0, 3).flatmap(lambda dice: hostile if dice == 0 else usual)


@st.composite
def uploads(draw) -> dict:  # noqa: ANN001
    """How to build one PutEmbedding stream from the stack's real entry (or from nothing)."""
    return {
        "source": draw(mostly(st.sampled_from(["flipped", "metadata", "metadata"]),
                              st.sampled_from(["random", "truncated"]))),
        "random_bytes": draw(st.binary(max_size=1024)),
        "flips": draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1,
                               max_size=6)),
        "flip_in_head": draw(st.booleans()),  # the header and metadata, or anywhere
        "keep": draw(st.floats(0, 1)),
        "metadata_edits": draw(st.lists(st.tuples(st.sampled_from(METADATA_KEYS), JSON_VALUES),
                                        max_size=2)),  # none: the real entry, accepted
        "tensor_edits": draw(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(TENSOR_KEYS),
                                                JSON_VALUES), max_size=2)),
        # at most one lie in the stream, so the bytes reach the entry checks
        "lie": draw(mostly(None, st.sampled_from(UPLOAD_LIES))),
        "size_bytes": draw(INT64 | st.integers(-1, 20 << 20)),
        "sha256": draw(st.text(max_size=70)),
        "format": draw(st.text(max_size=30)),
        "model_id": draw(st.sampled_from(["", "sam2.1/hiera_large"]) | st.text(max_size=40)),
        "embedding_id": draw(st.sampled_from(["", "claimed"]) | st.text(max_size=80)),
        "chunk_bytes": draw(st.sampled_from([4093, 65536, 1 << 20, 4 << 20])),
    }


def upload_bytes(entry: bytes, plan: dict) -> bytes:
    if plan["source"] == "random":
        return plan["random_bytes"]
    if plan["source"] == "truncated":
        return entry[: int(plan["keep"] * len(entry))]
    if plan["source"] == "flipped":
        data = bytearray(entry)
        span = 4096 if plan["flip_in_head"] else len(data)
        for where, value in plan["flips"]:
            data[min(int(where * span), len(data) - 1)] = value
        return bytes(data)
    metadata = codec.read_metadata(entry)
    offset = metadata.pop("_payload_offset")
    for key, value in plan["metadata_edits"]:
        metadata[key] = value
    tensors = metadata.get("tensors")
    for index, key, value in plan["tensor_edits"]:
        if isinstance(tensors, list) and index < len(tensors) and isinstance(tensors[index],
                                                                               dict):
            tensors[index][key] = value
    return payloads.codec_entry(json.dumps(metadata).encode(), entry[offset:])


def upload_messages(stack: FuzzStack, plan: dict) -> list[encoder_pb2.PutEmbeddingRequest]:
    lie = plan["lie"]
    if lie == "empty_stream":
        return []
    data = upload_bytes(stack.entry, plan)
    header = payloads.blob_header(data, MODEL_ID)
    if lie == "embedding_id":
        claimed = plan["embedding_id"]
        header.embedding.embedding_id = stack.embedding_id if claimed == "claimed" else claimed
    elif lie == "model_id":
        header.embedding.model_id = plan["model_id"]
    elif lie in ("size_bytes", "sha256", "format"):
        setattr(header, lie, plan[lie])
    messages = list(payloads.put_embedding_messages(header, data, plan["chunk_bytes"]))
    if lie == "no_header":
        messages[0].ClearField("header")
    return messages


@UPLOAD_SETTINGS
@given(plan=uploads())
def test_fuzzed_uploads_get_clean_answers(stack: FuzzStack, plan: dict) -> None:
    messages = upload_messages(stack, plan)
    try:
        response = stack.encoder_stub.PutEmbedding(iter(messages), timeout=30)
    except grpc.RpcError as exc:
        check_clean_rpc_error(exc)
        return
    event("OK")
    # accepted: stored under the server's import id, and a click on it decodes
    assert response.embedding.embedding_id.startswith("imp-"), response
    request = decoder_pb2.SegmentRequest(embedding_id=response.embedding.embedding_id,
                                         prompts=[decoder_pb2.Prompt(points=[
                                             common_pb2.Point(x_px=5, y_px=5, label=1)])])
    assert call_clean(stack.decoder_stub.Segment, request) is not None


# ----------------------------------------------------------------------- SegmentStream


@st.composite
def stream_requests(draw) -> list:  # noqa: ANN001
    """0-5 requests: fuzzed ones, plain clicks on the valid id, and plain clicks with no id
    (reusing the stream's last embedding)."""
    items = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["fuzzed", "click", "reuse"]))
        if kind == "fuzzed":
            request, id_kind, random_id = draw(segment_requests())
        else:
            point = common_pb2.Point(x_px=draw(st.floats(0, 160)), y_px=draw(st.floats(0, 120)),
                                     label=draw(st.sampled_from([1, 2])))
            request = decoder_pb2.SegmentRequest(prompts=[decoder_pb2.Prompt(points=[point])])
            id_kind, random_id = ("valid" if kind == "click" else "empty"), ""
        items.append((draw(st.text(max_size=40)), request, id_kind, random_id))
    return items


@STREAM_SETTINGS
@given(items=stream_requests())
def test_fuzzed_segment_streams_get_clean_answers(stack: FuzzStack, items: list) -> None:
    messages = []
    for request_id, request, id_kind, random_id in items:
        request.embedding_id = {"valid": stack.embedding_id, "random": random_id,
                                "empty": ""}[id_kind]
        messages.append(decoder_pb2.SegmentStreamRequest(request_id=request_id,
                                                         segment=request))
    try:
        responses = list(stack.decoder_stub.SegmentStream(iter(messages), timeout=30))
    except grpc.RpcError as exc:  # the whole stream refused: only for a reason it gives
        check_clean_rpc_error(exc)
        return
    # every request answered, in order, by masks or its own clean error
    assert [r.request_id for r in responses] == [m.request_id for m in messages]
    for message, response in zip(messages, responses, strict=True):
        if response.HasField("error"):
            check_clean_item_status(response.error)
        else:
            event("OK")
            assert len(response.segment.results) == len(message.segment.prompts)


# ----------------------------------------------------------------------- TrackingService

INT32 = st.integers(-(2**31), 2**31 - 1)
FRAME_INDEX = mostly(st.integers(0, FRAME_COUNT - 1), st.integers(-2, 5) | st.integers(
    -(2**31), 2**31 - 1))
OBJECT_ID = mostly(st.integers(1, 3), st.integers(-(2**31), 2**31 - 1))
FRAME_COORD = mostly(st.floats(0, 60), COORD)
TRACKING_METHODS = ("StartSession", "AddPrompt", "Propagate", "RemoveObject", "ResetSession",
                    "CloseSession")


@st.composite
def encoded_masks(draw) -> common_pb2.EncodedMask:  # noqa: ANN001
    # sizes stay small: a huge declared size is tests/integration/test_hostile_inputs.py's
    height, width = draw(st.integers(-3, 300)), draw(st.integers(-3, 300))
    mask = common_pb2.EncodedMask(height_px=height, width_px=width)
    kind = draw(st.sampled_from(["rle", "rle_full", "png", "bits", "none"]))
    if kind == "rle":
        mask.coco_rle_counts = draw(st.text(max_size=40))
    elif kind == "rle_full":  # well-formed counts covering whatever size it claims
        mask.coco_rle_counts = payloads.coco_rle_counts(
            draw(st.lists(st.integers(0, 300), max_size=4)) + [max(0, height * width)])
    elif kind == "png":
        mask.png_data = draw(st.binary(max_size=256) | st.just(VALID_PNG))
    elif kind == "bits":
        mask.packed_bits = draw(st.binary(max_size=512))
    return mask


@st.composite
def tracking_calls(draw) -> list[tuple[str, str, object]]:  # noqa: ANN001
    """1-4 (method, session choice, request without its session id) to make in order."""
    calls = []
    for _ in range(draw(st.integers(1, 4))):
        method = draw(st.sampled_from(TRACKING_METHODS))
        session = draw(mostly("live", st.sampled_from(["random", "empty"])))
        if method == "StartSession":
            request = tracking_pb2.StartSessionRequest(
                model_id=draw(mostly(MODEL_ID, st.sampled_from(["", "sam2.1/nope"]))),
                frame_embedding_ids=draw(st.lists(
                    mostly(st.integers(0, FRAME_COUNT - 1).map(str), st.text(max_size=70)),
                    max_size=6)))
        elif method == "AddPrompt":
            request = tracking_pb2.AddPromptRequest(
                frame_index=draw(FRAME_INDEX), object_id=draw(OBJECT_ID),
                keep_old_points=draw(st.booleans()),
                mask_format=draw(mostly(st.integers(0, 3), st.integers(-1, 5))))
            for _ in range(draw(mostly(st.integers(1, 3), st.integers(0, 4)))):
                request.points.add(x_px=draw(FRAME_COORD), y_px=draw(FRAME_COORD),
                                   label=draw(mostly(st.sampled_from([1, 2]), LABEL)))
            if draw(st.integers(0, 3)) == 0:
                request.box.CopyFrom(common_pb2.Box(
                    x_min_px=draw(FRAME_COORD), y_min_px=draw(FRAME_COORD),
                    x_max_px=draw(FRAME_COORD), y_max_px=draw(FRAME_COORD)))
            if draw(st.integers(0, 3)) == 0:
                request.mask.CopyFrom(draw(encoded_masks()))
        elif method == "Propagate":
            request = tracking_pb2.PropagateRequest(
                reverse=draw(st.booleans()),
                mask_format=draw(mostly(st.integers(0, 3), st.integers(-1, 5))))
            if draw(st.booleans()):
                request.start_frame_index = draw(FRAME_INDEX)
            if draw(st.booleans()):
                request.max_frames = draw(mostly(st.integers(0, FRAME_COUNT), INT32))
        elif method == "RemoveObject":
            request = tracking_pb2.RemoveObjectRequest(object_id=draw(OBJECT_ID))
        elif method == "ResetSession":
            request = tracking_pb2.ResetSessionRequest()
        else:
            request = tracking_pb2.CloseSessionRequest()
        session_id = {"live": None, "empty": ""}.get(session) if session != "random" else draw(
            st.text(max_size=80))
        calls.append((method, session_id, request))
    return calls


@TRACKING_SETTINGS
@given(with_object=mostly(True, st.just(False)), calls=tracking_calls())
def test_fuzzed_tracking_calls_get_clean_answers(stack: FuzzStack, with_object: bool,
                                                 calls: list) -> None:
    with Sam2TrackingClient(stack.encoder.address, stack.decoder.address) as client:
        live = client.start_session(stack.frame_ids).session_id
        if with_object:
            client.add_prompt(live, 0, 1, points=[[20.0, 20.0]], labels=[1])
        sessions = [live]
        for method, session_id, request in calls:
            if method == "StartSession":
                request.frame_embedding_ids[:] = [
                    stack.frame_ids[int(i)] if i.isascii() and i.isdigit() else i
                    for i in request.frame_embedding_ids]
            else:
                request.session_id = live if session_id is None else session_id
            call = getattr(stack.tracking_stub, method)
            try:
                if method == "Propagate":
                    frames = list(call(request, timeout=30))
                    assert len(frames) <= FRAME_COUNT
                else:
                    response = call(request, timeout=30)
                    if method == "StartSession":
                        sessions.append(response.session_id)
                event(f"{method} OK")
            except grpc.RpcError as exc:
                event(method)
                check_clean_rpc_error(exc)
        for session_id in sessions:  # leave no session behind (closed ones are NOT_FOUND)
            try:
                client.close_session(session_id)
            except EmbeddingNotFoundError:
                pass


# ----------------------------------------------------------------------- StartSessionFromFrames

OTHER_SIZE_FRAMES = [_png(32, 40, 7), synthetic_rgb(32, 40, seed=7)]
FRAME_MODEL_ID = st.sampled_from(["", "sam2.1/nope", "sam2.1/hiera_large"]) | st.text(max_size=40)


@st.composite
def stream_frames(draw) -> common_pb2.Image | None:  # noqa: ANN001
    """One frame of a streamed video: mostly one of the fixture's frames (PNG or raw RGB),
    else no frame, a fuzzed image, a raw frame declaring a huge size or sending too few
    pixels for its size, or a frame of another size than the video's."""
    kind = draw(mostly(st.sampled_from(["png", "raw"]), st.sampled_from(
        ["none", "fuzzed", "huge_raw", "short_raw", "other_size"])))
    if kind == "none":
        return None
    if kind == "fuzzed":
        return draw(images())
    if kind == "other_size":
        return image_to_proto(draw(st.sampled_from(OTHER_SIZE_FRAMES)))
    rgb = draw(st.sampled_from(VIDEO_FRAMES))
    if kind == "png":
        return image_to_proto(cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1]
                              .tobytes())
    image = image_to_proto(rgb)
    if kind == "huge_raw":  # a size in the billions of pixels over a few bytes
        image.raw.height_px = draw(st.integers(10_000, 2**31 - 1))
        image.raw.width_px = draw(st.integers(10_000, 2**31 - 1))
        image.raw.pixels = image.raw.pixels[: draw(st.integers(0, 4096))]
    elif kind == "short_raw":
        image.raw.pixels = image.raw.pixels[: draw(st.integers(0, len(image.raw.pixels) - 1))]
    return image


@st.composite
def frame_streams(draw) -> list[tracking_pb2.StartSessionFromFramesRequest]:  # noqa: ANN001
    """0-5 messages: the first mostly names the served model, later ones mostly name none
    (a few name another); each mostly carries a frame."""
    messages = []
    for index in range(draw(mostly(st.integers(1, 5), st.integers(0, 5)))):
        usual_model = MODEL_ID if index == 0 else ""
        message = tracking_pb2.StartSessionFromFramesRequest(
            model_id=draw(mostly(usual_model, FRAME_MODEL_ID | st.just(MODEL_ID))))
        frame = draw(stream_frames())
        if frame is not None:
            message.frame.CopyFrom(frame)
        messages.append(message)
    return messages


def start_session_from_frames(stack: FuzzStack, messages: list
                             ) -> tracking_pb2.StartSessionFromFramesResponse | None:
    """The response, or None after checking the error is clean. While earlier examples'
    frames are being embedded the upload slots are full (RESOURCE_EXHAUSTED, clean too): try
    again for a while, so that the stream's own content is what gets checked."""
    give_up = time.monotonic() + 20
    while True:
        try:
            return stack.tracking_stub.StartSessionFromFrames(iter(messages), timeout=30)
        except grpc.RpcError as exc:
            check_clean_rpc_error(exc)
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                return None
        time.sleep(0.25)


@TRACKING_SETTINGS
@given(messages=frame_streams())
def test_fuzzed_frame_streams_get_clean_answers(stack: FuzzStack, messages: list) -> None:
    response = start_session_from_frames(stack, messages)
    if response is None:
        return
    event("OK")
    # accepted: a session over every frame sent, of the served model
    sent = [m for m in messages if m.HasField("frame")]
    assert response.frame_count == len(sent) == len(response.frame_embedding_ids) >= 1
    assert messages[0].model_id == MODEL_ID and response.height_px * response.width_px > 0
    stack.tracking_stub.CloseSession(
        tracking_pb2.CloseSessionRequest(session_id=response.session_id), timeout=30)


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
