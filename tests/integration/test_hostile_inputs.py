"""Hostile inputs against the real tiers on 127.0.0.1: one case per input, each asserting the
status code and ErrorInfo reason, the time to answer, the growth of the server's peak RSS
(VmHWM, reset before each case) and that both tiers still answer a normal request the same
way afterwards.

The tiers (sam2.1/hiera_tiny, seeded random weights, one diskcache store) are shared by the
module and run with their limits spelled out as flags. Every case adds a row to
``tests/integration/.hostile_report.json`` (git-ignored); print it as a markdown table with
``python -m tests.integration.test_hostile_inputs``.

Bounds are measured figures with headroom for a loaded 2-core CI machine; each case's
comment gives what it measured (idle, the encoder holds ~1160 MiB and the decoder ~560 MiB).
A case answered wrongly today is a strict xfail naming the bug, so fixing it flips the test.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decoder_service.tracking import MAX_FRAMES, MAX_OBJECTS
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
from sam2_shared.client.retry import NO_RETRY
from sam2_shared.client.tracking import Sam2TrackingClient
from sam2_shared.embedding import ImageEmbedding
from sam2_shared.store import codec
from sam2_shared.wire.status import error_from_rpc_error, error_from_status
from tests.helpers import hostile_payloads as payloads
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
REPORT_PATH = Path(__file__).parent / ".hostile_report.json"

# The limits under test, passed as flags (their defaults), so the cases read against them.
MAX_IMAGES_PER_REQUEST = 32
MAX_IMAGE_PIXELS = 100_000_000
MAX_PROMPTS = 64
MAX_POINTS = 64
MAX_MASK_PIXELS = 400_000_000
MAX_MESSAGE_MB = 64

FOREGROUND = common_pb2.POINT_LABEL_FOREGROUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
FRAME_HW = (64, 80)
FRAME_COUNT = 4


@dataclass
class Stack:
    encoder: TierProcess
    decoder: TierProcess
    channels: list[grpc.Channel]
    encoder_stub: encoder_pb2_grpc.EncoderServiceStub
    decoder_stub: decoder_pb2_grpc.DecoderServiceStub
    tracking_stub: tracking_pb2_grpc.TrackingServiceStub
    image_png: bytes
    embedding_id: str
    normal_masks: list[bytes]
    frame_ids: list[str]

    def tier(self, name: str) -> TierProcess:
        return {"encoder": self.encoder, "decoder": self.decoder}[name]

    def tracking_client(self) -> Sam2TrackingClient:
        return Sam2TrackingClient(self.encoder.address, self.decoder.address, model_id=MODEL_ID,
                                  retry=NO_RETRY, timeout_s=60.0)


def _normal_segment(stack_or_stub, embedding_id: str) -> list[bytes]:  # noqa: ANN001
    """The masks (and scores) of one click: the answer every later check must repeat."""
    stub = getattr(stack_or_stub, "decoder_stub", stack_or_stub)
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=50, y_px=66, label=FOREGROUND)])
    response = stub.Segment(decoder_pb2.SegmentRequest(embedding_id=embedding_id,
                                                       prompts=[prompt]), timeout=30)
    return [candidate.mask.SerializeToString() + repr(round(candidate.score, 6)).encode()
            for result in response.results for candidate in result.candidates]


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[Stack]:
    store = "diskcache://" + tempfile.mkdtemp(prefix="sam2-hostile-")
    common = ["--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-message-mb",
              str(MAX_MESSAGE_MB)]
    encoder = encoder_process(tiny_checkpoint, store, *common, "--max-images-per-request",
                              str(MAX_IMAGES_PER_REQUEST)).start()
    decoder = decoder_process(tiny_checkpoint, store, *common, "--encoder-address",
                              encoder.address, "--max-prompts", str(MAX_PROMPTS), "--max-points",
                              str(MAX_POINTS), "--max-mask-pixels", str(MAX_MASK_PIXELS))
    channels: list[grpc.Channel] = []
    try:
        decoder.start()
        channels = [grpc.insecure_channel(p.address, options=channel_options())
                    for p in (encoder, decoder)]
        encoder_stub = encoder_pb2_grpc.EncoderServiceStub(channels[0])
        image_png = _png(synthetic_rgb(120, 160, seed=3))
        [result] = encoder_stub.EmbedImages(encoder_pb2.EmbedImagesRequest(
            model_id=MODEL_ID, images=[common_pb2.Image(encoded_bytes=image_png)]),
            timeout=60).results
        assert result.status.code == 0, result.status.message
        decoder_stub = decoder_pb2_grpc.DecoderServiceStub(channels[1])
        embedding_id = result.embedding.embedding_id
        frames = [synthetic_rgb(*FRAME_HW, seed=20 + i) for i in range(FRAME_COUNT)]
        with Sam2TrackingClient(encoder.address, decoder.address, model_id=MODEL_ID) as client:
            frame_ids = client.embed_frames(frames)
        yield Stack(encoder, decoder, channels, encoder_stub, decoder_stub,
                    tracking_pb2_grpc.TrackingServiceStub(channels[1]), image_png,
                    embedding_id, _normal_segment(decoder_stub, embedding_id), frame_ids)
    finally:
        for channel in channels:
            channel.close()
        decoder.stop()
        encoder.stop()


def _png(rgb) -> bytes:  # noqa: ANN001
    import cv2

    ok, data = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    return data.tobytes()


# ----------------------------------------------------------------------- answers


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    reason: str
    seconds: float
    message: str = ""
    # Set by a case whose legitimate setup (e.g. 64 objects) comes first: the tier's peak RSS
    # was reset after the setup and was this much then, so only the hostile call is bounded.
    baseline_mib: float | None = None


def timed(call: Callable[[], object]) -> Answer:
    """Run one call; its status code, ErrorInfo reason and how long it took to answer.
    Errors without rich status (gRPC's own, e.g. a message over the size limit) keep their
    code name as the reason."""
    started = time.perf_counter()
    try:
        call()
    except grpc.RpcError as exc:
        seconds = time.perf_counter() - started
        return Answer(exc.code(), error_from_rpc_error(exc).reason, seconds, exc.details() or "")
    return Answer(grpc.StatusCode.OK, "", time.perf_counter() - started)


def _code(number: int) -> grpc.StatusCode:
    return next(code for code in grpc.StatusCode if code.value[0] == number)


def embed_one(stack: Stack, image: common_pb2.Image) -> Answer:
    """EmbedImages answers per image: the outcome of the only image."""
    started = time.perf_counter()
    response = stack.encoder_stub.EmbedImages(
        encoder_pb2.EmbedImagesRequest(model_id=MODEL_ID, images=[image]), timeout=60)
    seconds = time.perf_counter() - started
    [result] = response.results
    if result.status.code == 0:
        return Answer(grpc.StatusCode.OK, "", seconds)
    return Answer(_code(result.status.code), error_from_status(result.status).reason, seconds,
                  result.status.message)


def _click(x: float = 30.0, y: float = 20.0, **fields) -> decoder_pb2.Prompt:
    return decoder_pb2.Prompt(points=[common_pb2.Point(x_px=x, y_px=y, label=FOREGROUND)],
                              **fields)


def segment(stack: Stack, prompts: list[decoder_pb2.Prompt], embedding_id: str | None = None,
            **fields) -> Answer:
    request = decoder_pb2.SegmentRequest(
        embedding_id=stack.embedding_id if embedding_id is None else embedding_id,
        prompts=prompts, **fields)
    return timed(lambda: stack.decoder_stub.Segment(request, timeout=60))


def put_embedding(stack: Stack, messages: Iterator[encoder_pb2.PutEmbeddingRequest]
                  ) -> Answer:
    return timed(lambda: stack.encoder_stub.PutEmbedding(messages, timeout=60))


def zero_entry(original_hw: tuple[int, int], embedding_id: str = "ab" * 32) -> bytes:
    """A well-formed float16 embedding entry of zeros claiming ``original_hw``."""
    tensors = [torch.zeros(shape) for _, shape in codec.EMBEDDING_SHAPES]
    embedding = ImageEmbedding(tensors[0], (tensors[1], tensors[2]), original_hw, MODEL_ID,
                               embedding_id)
    return codec.encode_embedding(embedding, "float16")


def import_entry(stack: Stack, data: bytes) -> str:
    response = stack.encoder_stub.PutEmbedding(
        payloads.put_embedding_messages(payloads.blob_header(data, MODEL_ID), data),
        timeout=60)
    return response.embedding.embedding_id


# ----------------------------------------------------------------------- the cases


def too_many_images(stack: Stack) -> Answer:
    image = common_pb2.Image(encoded_bytes=stack.image_png)
    request = encoder_pb2.EmbedImagesRequest(model_id=MODEL_ID,
                                             images=[image] * (MAX_IMAGES_PER_REQUEST + 1))
    return timed(lambda: stack.encoder_stub.EmbedImages(request, timeout=60))


def forged_png_header(stack: Stack) -> Answer:
    return embed_one(stack, common_pb2.Image(
        encoded_bytes=payloads.png_header_only(100_000, 100_000)))


def radiance_hdr(stack: Stack) -> Answer:
    return embed_one(stack, common_pb2.Image(
        encoded_bytes=payloads.radiance_hdr_header(30_000, 30_000)))


def png_bomb(stack: Stack) -> Answer:
    # 140 KiB of file, 144 M pixels once decoded: over --max-image-pixels
    return embed_one(stack, common_pb2.Image(encoded_bytes=payloads.png_bomb(12_000, 12_000)))


def png_bomb_attached_to_segment(stack: Stack) -> Answer:
    request = decoder_pb2.SegmentRequest(
        image=common_pb2.Image(encoded_bytes=payloads.png_bomb(12_000, 12_000)),
        prompts=[_click()])
    return timed(lambda: stack.decoder_stub.Segment(request, timeout=60))


def raw_image_lying_about_its_size(stack: Stack) -> Answer:
    raw = common_pb2.RawImage(pixels=bytes(300), height_px=40_000, width_px=40_000,
                              channel_count=3, color_format=common_pb2.COLOR_FORMAT_RGB)
    return embed_one(stack, common_pb2.Image(raw=raw))


def put_header_over_the_cap(stack: Stack) -> Answer:
    header = payloads.blob_header(b"", MODEL_ID, size_bytes=codec.MAX_EMBEDDING_ENTRY_NBYTES + 1)
    return put_embedding(stack, iter([encoder_pb2.PutEmbeddingRequest(header=header)]))


def put_stream_longer_than_its_header(stack: Stack) -> Answer:
    # the header announces 1 KiB; 64 MiB follow in 1 MiB chunks (the server stops at the first)
    header = payloads.blob_header(b"", MODEL_ID, size_bytes=1024)
    chunk = bytes(1 << 20)
    messages = iter([encoder_pb2.PutEmbeddingRequest(header=header, chunk=chunk)]
                    + [encoder_pb2.PutEmbeddingRequest(chunk=chunk)] * 63)
    return put_embedding(stack, messages)


def put_garbage_at_the_cap(stack: Stack) -> Answer:
    data = bytes(codec.MAX_EMBEDDING_ENTRY_NBYTES)  # the most it accepts, all zeros
    return put_embedding(stack, payloads.put_embedding_messages(
        payloads.blob_header(data, MODEL_ID), data))


def put_nested_metadata(stack: Stack) -> Answer:
    data = payloads.nested_metadata_entry()
    return put_embedding(stack, payloads.put_embedding_messages(
        payloads.blob_header(data, MODEL_ID), data))


def put_tensor_dtype_a_json_list(stack: Stack) -> Answer:
    # a well-formed entry whose first tensor's "dtype" is [] (found by test_fuzz.py)
    entry = zero_entry((120, 160))
    metadata = codec.read_metadata(entry)
    payload = entry[metadata.pop("_payload_offset"):]
    metadata["tensors"][0]["dtype"] = []
    data = payloads.codec_entry(json.dumps(metadata).encode(), payload)
    return put_embedding(stack, payloads.put_embedding_messages(
        payloads.blob_header(data, MODEL_ID), data))


def put_huge_original_hw(stack: Stack) -> Answer:
    data = zero_entry((100_000, 100_000))
    return put_embedding(stack, payloads.put_embedding_messages(
        payloads.blob_header(data, MODEL_ID), data))


def too_many_prompts(stack: Stack) -> Answer:
    return segment(stack, [_click()] * (MAX_PROMPTS + 1))


def too_many_points(stack: Stack) -> Answer:
    prompt = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=5, y_px=5, label=FOREGROUND)]
                                * (MAX_POINTS + 1))
    return segment(stack, [prompt])


def mask_pixels_over_the_cap(stack: Stack) -> Answer:
    # an imported 10000 x 10000 embedding (at --max-image-pixels): 2 prompts x 3 candidates
    # make 600 M mask pixels, over --max-mask-pixels (400 M)
    imported = import_entry(stack, zero_entry((10_000, 10_000), "cd" * 32))
    return segment(stack, [_click(), _click(40, 40)], imported)


def mask_logits_wrong_length(stack: Stack) -> Answer:
    return segment(stack, [_click(mask_logits=bytes(1000))])


def mask_logits_all_nan(stack: Stack) -> Answer:
    return segment(stack, [_click(mask_logits=b"\x00\x00\xc0\x7f" * (256 * 256))])


def logits_handle_with_unicode_digits(stack: Stack) -> Answer:
    return segment(stack, [_click(logits_handle=stack.embedding_id + ".\u00b2")])


def embedding_id_of_a_mebibyte(stack: Stack) -> Answer:
    return segment(stack, [_click()], "f" * (1 << 20))


def logits_handle_of_a_mebibyte(stack: Stack) -> Answer:
    return segment(stack, [_click(logits_handle="f" * (1 << 20))])


def message_over_the_size_limit(stack: Stack) -> Answer:
    # a client allowed to send more than the server receives (--max-message-mb)
    size = MAX_MESSAGE_MB * (1 << 20) + 1
    request = decoder_pb2.SegmentRequest(image=common_pb2.Image(encoded_bytes=bytes(size)),
                                         prompts=[_click()])
    with grpc.insecure_channel(stack.decoder.address,
                               options=channel_options(4 * size)) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        return timed(lambda: stub.Segment(request, timeout=60))


def start_session_with_too_many_frames(stack: Stack) -> Answer:
    request = tracking_pb2.StartSessionRequest(model_id=MODEL_ID,
                                               frame_embedding_ids=["f" * 64] * (MAX_FRAMES + 1))
    return timed(lambda: stack.tracking_stub.StartSession(request, timeout=60))


def start_session_with_duplicate_frames(stack: Stack) -> Answer:
    request = tracking_pb2.StartSessionRequest(
        model_id=MODEL_ID, frame_embedding_ids=[stack.frame_ids[0]] * MAX_FRAMES)
    return timed(lambda: stack.tracking_stub.StartSession(request, timeout=60))


def add_prompt_to_an_unknown_session(stack: Stack) -> Answer:
    request = tracking_pb2.AddPromptRequest(session_id="0123456789abcdef" * 2, object_id=1,
                                            points=[common_pb2.Point(x_px=5, y_px=5,
                                                                     label=FOREGROUND)])
    return timed(lambda: stack.tracking_stub.AddPrompt(request, timeout=30))


def add_prompt_to_a_mebibyte_session_id(stack: Stack) -> Answer:
    request = tracking_pb2.AddPromptRequest(session_id="f" * (1 << 20), object_id=1,
                                            points=[common_pb2.Point(x_px=5, y_px=5,
                                                                     label=FOREGROUND)])
    return timed(lambda: stack.tracking_stub.AddPrompt(request, timeout=30))


def _add_click(session_id: str, object_id: int) -> tracking_pb2.AddPromptRequest:
    return tracking_pb2.AddPromptRequest(
        session_id=session_id, frame_index=0, object_id=object_id,
        points=[common_pb2.Point(x_px=10 + object_id % 60, y_px=30, label=FOREGROUND)])


def too_many_objects(stack: Stack) -> Answer:
    with stack.tracking_client() as client:
        session = client.start_session(stack.frame_ids)
        try:
            for object_id in range(1, MAX_OBJECTS + 1):
                stack.tracking_stub.AddPrompt(_add_click(session.session_id, object_id),
                                              timeout=60)
            request = _add_click(session.session_id, MAX_OBJECTS + 1)
            baseline_mib = stack.tier("decoder").reset_peak_memory()
            answer = timed(lambda: stack.tracking_stub.AddPrompt(request, timeout=60))
            return dataclasses.replace(answer, baseline_mib=baseline_mib)
        finally:
            client.close_session(session.session_id)


def add_prompt_while_propagating(stack: Stack) -> Answer:
    with stack.tracking_client() as client:
        session = client.start_session(stack.frame_ids)
        try:
            client.add_prompt(session.session_id, 0, 1, points=[[30.0, 30.0]], labels=[1])
            propagation = stack.tracking_stub.Propagate(
                tracking_pb2.PropagateRequest(session_id=session.session_id), timeout=60)
            next(propagation)  # the propagation holds the session now
            try:
                request = _add_click(session.session_id, 2)
                return timed(lambda: stack.tracking_stub.AddPrompt(request, timeout=30))
            finally:
                propagation.cancel()
        finally:
            client.close_session(session.session_id)  # asks again while still busy


def add_prompt_with_a_huge_rle_mask(stack: Stack) -> Answer:
    # six characters of COCO RLE claiming a 16384 x 16384 (268 M pixel) empty mask
    side = 16_384
    with stack.tracking_client() as client:
        session = client.start_session(stack.frame_ids)
        try:
            request = tracking_pb2.AddPromptRequest(session_id=session.session_id,
                                                    frame_index=0, object_id=1)
            request.mask.height_px = request.mask.width_px = side
            request.mask.coco_rle_counts = payloads.coco_rle_counts([side * side])
            return timed(lambda: stack.tracking_stub.AddPrompt(request, timeout=60))
        finally:
            client.close_session(session.session_id)


def add_prompt_with_a_png_bomb_mask(stack: Stack) -> Answer:
    # declared at the video's size, but the PNG itself is 12000 x 12000 (a small file)
    with stack.tracking_client() as client:
        session = client.start_session(stack.frame_ids)
        try:
            request = tracking_pb2.AddPromptRequest(session_id=session.session_id,
                                                    frame_index=0, object_id=1)
            request.mask.height_px, request.mask.width_px = session.video_hw
            request.mask.png_data = payloads.png_bomb(12_000, 12_000)
            return timed(lambda: stack.tracking_stub.AddPrompt(request, timeout=60))
        finally:
            client.close_session(session.session_id)


@dataclass(frozen=True)
class Hostile:
    """One hostile input: what to send to which tier, and the answer it must get.

    ``max_growth_mib`` bounds the tier's peak RSS over its RSS just before the case (after
    its legitimate setup where the case resets the peak there: ``Answer.baseline_mib``);
    ``known_bug`` marks a case answered wrongly today (strict xfail, with the reason).
    """

    name: str
    tier: str
    send: Callable[[Stack], Answer]
    code: grpc.StatusCode
    reason: str
    max_seconds: float
    max_growth_mib: float
    known_bug: str = ""


# Bounds: seconds to answer and MiB of peak-RSS growth; "measured" is one run on the 2-core
# development machine (other jobs running).
CASES = [
    # measured: 0.008 s, +3 MiB
    Hostile("EmbedImages: 33 images (limit 32)", "encoder", too_many_images,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.002 s, +0 MiB
    Hostile("EmbedImages: PNG whose IHDR claims 100000x100000", "encoder", forged_png_header,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.002 s, +0 MiB
    Hostile("EmbedImages: Radiance HDR claiming 30000x30000", "encoder", radiance_hdr,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.003 s, +0.2 MiB
    Hostile("EmbedImages: PNG bomb, 140 KiB -> 12000x12000", "encoder", png_bomb,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.001 s, +0 MiB
    Hostile("EmbedImages: raw image, 300 bytes claiming 40000x40000", "encoder",
            raw_image_lying_about_its_size, INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.009 s, +0.5 MiB
    Hostile("Segment: attached PNG bomb 12000x12000", "decoder", png_bomb_attached_to_segment,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.002 s, +0 MiB
    Hostile("PutEmbedding: header size over the 16.1 MiB cap", "encoder",
            put_header_over_the_cap, INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.005 s, +0.8 MiB
    Hostile("PutEmbedding: 64 MiB streamed after a 1 KiB header", "encoder",
            put_stream_longer_than_its_header, INVALID, "EMBEDDING_CORRUPT", 2.0, 50),
    # measured: 0.067 s, +41 MiB (the chunks and their join: 2 x 16.1 MiB)
    Hostile("PutEmbedding: 16.1 MiB of zeros (at the cap)", "encoder", put_garbage_at_the_cap,
            INVALID, "EMBEDDING_CORRUPT", 3.0, 100),
    # measured: 0.003 s, +0.2 MiB
    Hostile("PutEmbedding: metadata nested 30000 deep", "encoder", put_nested_metadata,
            INVALID, "EMBEDDING_CORRUPT", 2.0, 50),
    # measured before the fix: INTERNAL in 0.026 s, +2.5 MiB
    Hostile("PutEmbedding: tensor dtype [] (a JSON list)", "encoder",
            put_tensor_dtype_a_json_list, INVALID, "EMBEDDING_CORRUPT", 3.0, 100),
    # measured: 0.027 s, +3 MiB
    Hostile("PutEmbedding: original_hw 100000x100000", "encoder", put_huge_original_hw,
            INVALID, "EMBEDDING_CORRUPT", 3.0, 100),
    # measured: 0.001 s, +0 MiB
    Hostile("Segment: 65 prompts (limit 64)", "decoder", too_many_prompts,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.002 s, +0 MiB
    Hostile("Segment: 65 points in a prompt (limit 64)", "decoder", too_many_points,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.035 s, +20 MiB (the imported embedding, loaded)
    Hostile("Segment: 600 M mask pixels (limit 400 M)", "decoder", mask_pixels_over_the_cap,
            INVALID, "INVALID_ARGUMENT", 3.0, 100),
    # measured: 0.001 s, +0 MiB
    Hostile("Segment: mask_logits of 1000 bytes", "decoder", mask_logits_wrong_length,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.003 s, +1 MiB
    Hostile("Segment: mask_logits all NaN", "decoder", mask_logits_all_nan,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured: 0.002 s, +0 MiB
    Hostile("Segment: logits handle '<id>.\u00b2'", "decoder",
            logits_handle_with_unicode_digits, NOT_FOUND, "LOGITS_NOT_FOUND", 2.0, 50),
    # Before errors clipped what they quote, these three echoed the whole id into the
    # trailers, over the client's 16 KiB metadata limit: RESOURCE_EXHAUSTED "Stream removed".
    # measured before the fix: 0.018 s, +18 MiB, RESOURCE_EXHAUSTED
    Hostile("Segment: embedding_id of 1 MiB", "decoder", embedding_id_of_a_mebibyte,
            INVALID, "INVALID_ARGUMENT", 2.0, 50),
    # measured before the fix: 0.013 s, +4 MiB, RESOURCE_EXHAUSTED
    Hostile("Segment: logits handle of 1 MiB", "decoder", logits_handle_of_a_mebibyte,
            NOT_FOUND, "LOGITS_NOT_FOUND", 2.0, 50),
    # measured: 0.34 s, +0.1 MiB (gRPC refuses by the length prefix; its own status, no
    # ErrorInfo, so the reason is the code's name)
    Hostile("Segment: 64 MiB + 1 byte message", "decoder", message_over_the_size_limit,
            grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED", 5.0, 100),
    # measured: 0.041 s, +33 MiB (the 6.7 MB request parsed)
    Hostile("StartSession: 100001 frames (limit 100000)", "decoder",
            start_session_with_too_many_frames, INVALID, "INVALID_ARGUMENT", 3.0, 100),
    # A still camera gives identical frames, hence identical ids: repeats are a valid video.
    # measured: 0.77 s, +49 MiB
    Hostile("StartSession: one frame id 100000 times", "decoder",
            start_session_with_duplicate_frames, grpc.StatusCode.OK, "", 5.0, 150),
    # measured: 0.002 s, +0 MiB
    Hostile("AddPrompt: unknown session", "decoder", add_prompt_to_an_unknown_session,
            NOT_FOUND, "SESSION_NOT_FOUND", 2.0, 50),
    # measured before the fix: 0.009 s, +1 MiB, RESOURCE_EXHAUSTED
    Hostile("AddPrompt: session id of 1 MiB", "decoder", add_prompt_to_a_mebibyte_session_id,
            NOT_FOUND, "SESSION_NOT_FOUND", 2.0, 50),
    # measured: refused in 0.002 s; the 64 objects before it +314 MiB (~5 MiB of state each)
    Hostile("AddPrompt: object 65 (limit 64)", "decoder", too_many_objects,
            INVALID, "INVALID_ARGUMENT", 2.0, 500),
    # measured: refused in 0.002 s; the session and its propagation +254 MiB
    Hostile("AddPrompt while Propagate holds the session", "decoder",
            add_prompt_while_propagating, grpc.StatusCode.ABORTED, "SESSION_BUSY", 1.0, 400),
    # measured before the fix: decoded and resized, OK after 6.7 s, +1560 MiB
    Hostile("AddPrompt: 6-char RLE mask claiming 16384x16384", "decoder",
            add_prompt_with_a_huge_rle_mask, INVALID, "INVALID_ARGUMENT", 2.0, 100),
    Hostile("AddPrompt: PNG mask bomb 12000x12000 declared at the video's size", "decoder",
            add_prompt_with_a_png_bomb_mask, INVALID, "INVALID_ARGUMENT", 2.0, 100),
]


# ----------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def report_rows() -> Iterator[list[dict]]:
    rows: list[dict] = []
    yield rows
    if rows:
        REPORT_PATH.write_text(json.dumps(rows, indent=2) + "\n")


def assert_normal_requests_work(stack: Stack) -> None:
    for channel in stack.channels:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    [result] = stack.encoder_stub.EmbedImages(encoder_pb2.EmbedImagesRequest(
        model_id=MODEL_ID, images=[common_pb2.Image(encoded_bytes=stack.image_png)]),
        timeout=60).results
    assert result.status.code == 0 and result.embedding.embedding_id == stack.embedding_id
    assert _normal_segment(stack, stack.embedding_id) == stack.normal_masks


def _param(case: Hostile):  # noqa: ANN202
    marks = [pytest.mark.xfail(strict=True, reason=case.known_bug)] if case.known_bug else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile_input(stack: Stack, case: Hostile, report_rows: list[dict]) -> None:
    process = stack.tier(case.tier)
    before_mib = process.reset_peak_memory()
    answer = case.send(stack)
    after_mib = process.memory_mib("VmHWM")
    if answer.baseline_mib is not None:
        before_mib = answer.baseline_mib
    report_rows.append({
        "input": case.name, "tier": case.tier, "code": answer.code.name,
        "reason": answer.reason, "seconds": round(answer.seconds, 3),
        "vmhwm_before_mib": round(before_mib, 1), "vmhwm_after_mib": round(after_mib, 1),
        "expected": f"{case.code.name} {case.reason}", "max_seconds": case.max_seconds,
        "max_growth_mib": case.max_growth_mib, "known_bug": case.known_bug,
        "message": answer.message[:200],
    })
    assert_normal_requests_work(stack)
    assert (answer.code, answer.reason) == (case.code, case.reason), answer
    assert answer.seconds < case.max_seconds, answer
    assert after_mib - before_mib < case.max_growth_mib, (before_mib, after_mib)


# ----------------------------------------------------------------------- the table


def markdown_table(rows: list[dict]) -> str:
    """The report as a markdown table; known bugs are numbered below it."""
    lines = ["| hostile input | tier | answer | seconds | VmHWM before -> after (MiB) |",
             "|---|---|---|---:|---|"]
    bugs: list[str] = []
    for row in rows:
        answer = f"{row['code']} {row['reason']}".strip()
        if row["known_bug"]:
            bugs.append(row["known_bug"])
            answer += f" (bug {len(bugs)}; expected {row['expected']})"
        lines.append(f"| {row['input']} | {row['tier']} | {answer} | {row['seconds']:.3f} | "
                     f"{row['vmhwm_before_mib']:.0f} -> {row['vmhwm_after_mib']:.0f} |")
    lines += [""] + [f"{number}. {bug}" for number, bug in enumerate(bugs, start=1)]
    return "\n".join(lines)


def main() -> int:
    if not REPORT_PATH.exists():
        print(f"no report at {REPORT_PATH}: run pytest {Path(__file__).name} first",
              file=sys.stderr)
        return 1
    print(markdown_table(json.loads(REPORT_PATH.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

