"""The decoder tier through real gRPC: a real encoder and decoders (subprocesses of the CLIs)
on 127.0.0.1 over a diskcache store, checked against the in-process ``Sam2Model``."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from sam2_shared import wire
from sam2_shared.api.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc
from sam2_shared.client import Sam2Client
from sam2_shared.client.channels import channel_options
from sam2_shared.inference.sam2_model import Sam2Model
from sam2_shared.model.transformer import _SCRATCH_BYTES
from sam2_shared.prompts import Prompt
from sam2_shared.store import open_blob_store, open_store
from sam2_shared.wire.status import error_from_rpc_error, error_from_status
from tests.helpers.synthetic_images import synthetic_rgb
from tests.helpers.tier_processes import TierProcess, decoder_process, encoder_process

MODEL_ID = "sam2.1/hiera_tiny"
HEIGHT, WIDTH = 240, 320
FOREGROUND = common_pb2.POINT_LABEL_FOREGROUND


class Stack:
    """An encoder, a decoder that may call it and one that may not, on one store."""

    def __init__(self, checkpoint: Path) -> None:
        self.store_url = "diskcache://" + tempfile.mkdtemp(prefix="sam2-decoder-test-")
        self.encoder = encoder_process(checkpoint, self.store_url, "--store-dtype", "float32")
        self.decoder = decoder_process(checkpoint, self.store_url, "--logits-ttl-s", "5")
        self.processes: list[TierProcess] = [self.encoder, self.decoder]
        self.encoder.start()
        self.decoder.start()
        self.decoder_with_encoder = decoder_process(
            checkpoint, self.store_url, "--encoder-address", self.encoder.address
        )
        self.processes.append(self.decoder_with_encoder.start())
        self.channels = [grpc.insecure_channel(p.address, options=channel_options())
                         for p in (self.decoder, self.decoder_with_encoder)]
        self.stub = decoder_pb2_grpc.DecoderServiceStub(self.channels[0])
        self.stub_with_encoder = decoder_pb2_grpc.DecoderServiceStub(self.channels[1])
        self.client = Sam2Client(encoder=self.encoder.address, decoder=self.decoder.address)

    def close(self) -> None:
        self.client.close()
        for channel in self.channels:
            channel.close()
        for process in self.processes:
            process.stop()


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path) -> Iterator[Stack]:
    stack = Stack(tiny_checkpoint)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Sam2Model:
    return Sam2Model.from_pretrained(MODEL_ID, tiny_checkpoint)


@pytest.fixture(scope="module")
def image(stack: Stack) -> tuple[np.ndarray, str]:
    """An embedded image and its id."""
    rgb = synthetic_rgb(HEIGHT, WIDTH, seed=11)
    [embedding] = stack.client.embed_images(rgb, input_color_format="rgb")
    return rgb, embedding.embedding_id


def point_prompt(x: float, y: float, **fields) -> decoder_pb2.Prompt:
    return decoder_pb2.Prompt(points=[common_pb2.Point(x_px=x, y_px=y, label=FOREGROUND)],
                              **fields)


def call(stub_method, request):
    try:
        return stub_method(request, timeout=60)
    except grpc.RpcError as exc:
        return exc


def test_segment_matches_in_process_model(stack: Stack, model: Sam2Model, image) -> None:
    rgb, embedding_id = image
    box = common_pb2.Box(x_min_px=30, y_min_px=40, x_max_px=200, y_max_px=180)
    request = decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, include_logits=True,
        prompts=[point_prompt(100, 120), decoder_pb2.Prompt(box=box, multimask_output=False)],
    )
    response = stack.stub.Segment(request, timeout=60)
    assert response.embedding.embedding_id == embedding_id
    assert (response.embedding.height_px, response.embedding.width_px) == (HEIGHT, WIDTH)
    rows, handles = wire.predictions_from_proto(response.results)
    [points] = model.segment_images(rgb, point_coordinates=[[100, 120]], point_labels=[1],
                                    input_color_format="rgb", use_mask_input_cache=False)
    [boxed] = model.segment_images(rgb, boxes=[30, 40, 200, 180], multimask_output=False,
                                   input_color_format="rgb", use_mask_input_cache=False)
    for got, want in ((rows[0], points.batched), (rows[1], boxed.batched)):
        assert got.masks.shape == want.masks.shape
        np.testing.assert_array_equal(got.masks, want.masks)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
        np.testing.assert_allclose(got.object_score_logits, want.object_score_logits, atol=1e-4)
    assert [len(h) for h in handles] == [3, 1] and all(h for row in handles for h in row)
    assert response.results[0].best_index == int(points.scores.argmax())


def test_mask_formats_decode_to_the_same_masks(stack: Stack, image) -> None:
    _, embedding_id = image
    masks = {}
    for mask_format in (common_pb2.MASK_FORMAT_UNSPECIFIED, common_pb2.MASK_FORMAT_PNG,
                        common_pb2.MASK_FORMAT_RAW_BITS):
        response = stack.stub.Segment(decoder_pb2.SegmentRequest(
            embedding_id=embedding_id, prompts=[point_prompt(60, 150)], mask_format=mask_format,
        ), timeout=60)
        candidates = response.results[0].candidates
        masks[mask_format] = np.stack([wire.mask_from_proto(c.mask) for c in candidates])
        assert not candidates[0].logits  # only with include_logits
    default = response = stack.stub.Segment(decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, prompts=[point_prompt(60, 150)]), timeout=60)
    first = default.results[0].candidates[0].mask
    assert first.WhichOneof("data") == "coco_rle_counts"  # COCO RLE by default
    rle = {"size": [first.height_px, first.width_px], "counts": first.coco_rle_counts}
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), masks[0][0])
    assert first.area_px == int(masks[0][0].sum())
    np.testing.assert_array_equal(masks[common_pb2.MASK_FORMAT_PNG], masks[0])
    np.testing.assert_array_equal(masks[common_pb2.MASK_FORMAT_RAW_BITS], masks[0])


def test_refinement_by_handle_equals_inline_logits(stack: Stack, image) -> None:
    _, embedding_id = image
    first = stack.stub.Segment(decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, prompts=[point_prompt(100, 120)], include_logits=True,
    ), timeout=60).results[0]
    best = first.candidates[first.best_index]
    second_points = [common_pb2.Point(x_px=100, y_px=120, label=FOREGROUND),
                     common_pb2.Point(x_px=150, y_px=60, label=common_pb2.POINT_LABEL_BACKGROUND)]
    by_handle = decoder_pb2.Prompt(points=second_points, logits_handle=best.logits_handle)
    inline = decoder_pb2.Prompt(points=second_points, mask_logits=best.logits)
    response = stack.stub.Segment(decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, prompts=[by_handle, inline], include_logits=True,
    ), timeout=60)
    rows, _ = wire.predictions_from_proto(response.results)
    np.testing.assert_array_equal(rows[0].masks, rows[1].masks)
    np.testing.assert_allclose(rows[0].scores, rows[1].scores, atol=1e-6)
    # the logits prior changed the answer: refinement really used it
    plain = stack.stub.Segment(decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, prompts=[decoder_pb2.Prompt(points=second_points)],
        include_logits=True), timeout=60)
    assert not np.allclose(wire.predictions_from_proto(plain.results)[0][0].logits,
                           rows[0].logits)


def test_segment_stream_answers_each_click_and_survives_errors(stack: Stack, image) -> None:
    _, embedding_id = image

    def requests():
        yield decoder_pb2.SegmentStreamRequest(request_id="a", segment=decoder_pb2.SegmentRequest(
            embedding_id=embedding_id, prompts=[point_prompt(100, 120)]))
        # later clicks may leave the embedding out: the session's image is reused
        yield decoder_pb2.SegmentStreamRequest(request_id="b", segment=decoder_pb2.SegmentRequest(
            prompts=[point_prompt(110, 130)]))
        yield decoder_pb2.SegmentStreamRequest(request_id="bad", segment=decoder_pb2.SegmentRequest(
            prompts=[point_prompt(WIDTH + 50, 10)]))
        yield decoder_pb2.SegmentStreamRequest(request_id="c", segment=decoder_pb2.SegmentRequest(
            prompts=[point_prompt(120, 140), point_prompt(20, 20)]))

    responses = list(stack.stub.SegmentStream(requests(), timeout=120))
    assert [r.request_id for r in responses] == ["a", "b", "bad", "c"]
    assert [r.WhichOneof("outcome") for r in responses] == ["segment", "segment", "error",
                                                            "segment"]
    error = error_from_status(responses[2].error)
    assert responses[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.reason == "INVALID_ARGUMENT" and "outside" in str(error)
    assert responses[1].segment.embedding.embedding_id == embedding_id
    assert len(responses[3].segment.results) == 2


def _bad_requests(embedding_id: str, rgb: np.ndarray) -> dict[str, tuple]:
    ok = [point_prompt(10, 10)]
    nan = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=float("nan"), y_px=3,
                                                      label=FOREGROUND)])
    inf = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=float("inf"), y_px=3,
                                                      label=FOREGROUND)])
    unlabeled = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=5, y_px=5)])
    degenerate = decoder_pb2.Prompt(box=common_pb2.Box(x_min_px=50, y_min_px=10, x_max_px=50,
                                                       y_max_px=90))
    outside_box = decoder_pb2.Prompt(box=common_pb2.Box(x_min_px=0, y_min_px=0,
                                                        x_max_px=WIDTH + 1, y_max_px=20))
    bad_mask = point_prompt(10, 10, mask_logits=b"\0" * 1000)
    many_points = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=1, y_px=1, label=FOREGROUND)]
                                     * 65)
    other = wire.image_to_proto(synthetic_rgb(HEIGHT, WIDTH, seed=99), "rgb")
    invalid, not_found = "INVALID_ARGUMENT", "NOT_FOUND"
    r = decoder_pb2.SegmentRequest
    return {
        "nan": (r(embedding_id=embedding_id, prompts=[nan]), invalid, "INVALID_ARGUMENT"),
        "inf": (r(embedding_id=embedding_id, prompts=[inf]), invalid, "INVALID_ARGUMENT"),
        "outside": (r(embedding_id=embedding_id, prompts=[point_prompt(5, HEIGHT + 1)]),
                    invalid, "INVALID_ARGUMENT"),
        "unlabeled_point": (r(embedding_id=embedding_id, prompts=[unlabeled]), invalid,
                            "INVALID_ARGUMENT"),
        "degenerate_box": (r(embedding_id=embedding_id, prompts=[degenerate]), invalid,
                           "INVALID_ARGUMENT"),
        "box_outside": (r(embedding_id=embedding_id, prompts=[outside_box]), invalid,
                        "INVALID_ARGUMENT"),
        "mask_shape": (r(embedding_id=embedding_id, prompts=[bad_mask]), invalid,
                       "INVALID_ARGUMENT"),
        "empty_prompt": (r(embedding_id=embedding_id, prompts=[decoder_pb2.Prompt()]), invalid,
                         "INVALID_ARGUMENT"),
        "no_prompts": (r(embedding_id=embedding_id), invalid, "INVALID_ARGUMENT"),
        "too_many_prompts": (r(embedding_id=embedding_id, prompts=ok * 65), invalid,
                             "INVALID_ARGUMENT"),
        "too_many_points": (r(embedding_id=embedding_id, prompts=[many_points]), invalid,
                            "INVALID_ARGUMENT"),
        "unknown_model": (r(embedding_id=embedding_id, model_id="sam2.1/hiera_large",
                            prompts=ok), invalid, "UNKNOWN_MODEL"),
        "unknown_embedding": (r(embedding_id="0" * 64, prompts=ok), not_found,
                              "EMBEDDING_NOT_FOUND"),
        "malformed_embedding_id": (r(embedding_id="../etc/passwd", prompts=ok), invalid,
                                   "INVALID_ARGUMENT"),
        "nothing_to_segment": (r(prompts=ok), invalid, "INVALID_ARGUMENT"),
        "id_not_of_image": (r(embedding_id=embedding_id, image=other, prompts=ok), invalid,
                            "INVALID_ARGUMENT"),
        "undecodable_image": (r(image=common_pb2.Image(encoded_bytes=b"not an image"),
                                prompts=ok), invalid, "INVALID_ARGUMENT"),
        "unknown_handle": (r(embedding_id=embedding_id,
                             prompts=[point_prompt(5, 5, logits_handle="feedbeef.0")]),
                           not_found, "LOGITS_NOT_FOUND"),
        "unknown_mask_format": (r(embedding_id=embedding_id, prompts=ok, mask_format=42),
                                invalid, "INVALID_ARGUMENT"),
    }


BAD_CASES = list(_bad_requests("x", np.zeros((1, 1, 3), np.uint8)))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(stack: Stack, image,
                                                                    case: str) -> None:
    rgb, embedding_id = image
    request, code, reason = _bad_requests(embedding_id, rgb)[case]
    outcome = call(stack.stub.Segment, request)
    assert isinstance(outcome, grpc.RpcError), f"{case} was accepted"
    assert outcome.code().name == code
    error = error_from_rpc_error(outcome)
    assert error.reason == reason
    assert str(error) and "internal" not in str(error).lower()
    ok = stack.stub.Segment(decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, prompts=[point_prompt(10, 10)]), timeout=60)
    assert len(ok.results[0].candidates) == 3


def test_expired_logits_handle_is_not_found(stack: Stack, image) -> None:
    _, embedding_id = image  # stack.decoder runs with --logits-ttl-s 5 (2 s was tight for
    # the refine below to come in time on a loaded machine)
    result = stack.stub.Segment(decoder_pb2.SegmentRequest(
        embedding_id=embedding_id, prompts=[point_prompt(100, 120)]), timeout=60).results[0]
    handle = result.candidates[0].logits_handle
    refine = decoder_pb2.SegmentRequest(embedding_id=embedding_id,
                                        prompts=[point_prompt(100, 120, logits_handle=handle)])
    assert stack.stub.Segment(refine, timeout=60).results  # valid while fresh
    time.sleep(5.5)
    outcome = call(stack.stub.Segment, refine)
    assert isinstance(outcome, grpc.RpcError)
    assert outcome.code() == grpc.StatusCode.NOT_FOUND
    assert error_from_rpc_error(outcome).reason == "LOGITS_NOT_FOUND"


def test_corrupt_store_entry_is_a_miss(stack: Stack, model: Sam2Model) -> None:
    rgb = synthetic_rgb(HEIGHT, WIDTH, seed=21)
    [embedding] = stack.client.embed_images(rgb, input_color_format="rgb")
    key = "emb/" + embedding.embedding_id
    blobs = open_blob_store(stack.store_url)

    def corrupt() -> None:
        data = bytearray(blobs.get(key))
        data[len(data) // 2] ^= 0xFF  # one flipped byte in the payload
        blobs.put(key, bytes(data))

    try:
        corrupt()
        request = decoder_pb2.SegmentRequest(embedding_id=embedding.embedding_id,
                                             prompts=[point_prompt(100, 120)])
        outcome = call(stack.stub.Segment, request)  # never read before: not in the hot LRU
        assert isinstance(outcome, grpc.RpcError)
        assert error_from_rpc_error(outcome).reason == "EMBEDDING_NOT_FOUND"
        assert blobs.get(key) is None  # the corrupt entry was dropped

        # With the image and an encoder, the decoder has it recomputed and proceeds.
        stack.client.embed_images(rgb, input_color_format="rgb")
        corrupt()
        request.image.CopyFrom(wire.image_to_proto(rgb, "rgb"))
        response = stack.stub_with_encoder.Segment(request, timeout=120)
        got, _ = wire.predictions_from_proto(response.results)
        [want] = model.decode_prompts(
            model.embed_images(rgb, input_color_format="rgb")[0],
            [Prompt(np.array([[100.0, 120.0]], np.float32), np.array([1], np.int32))],
        )
        assert got[0].masks.shape == want.masks.shape
        assert (got[0].masks != want.masks).mean() < 1e-4  # same masks, up to a flip at 0
        assert blobs.get(key) is not None  # stored again, intact
    finally:
        blobs.close()


def _peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_large_masks_are_made_one_at_a_time(tiny_checkpoint: Path, model: Sam2Model) -> None:
    """16 multimask box prompts on a 12 MP image: 48 masks of 11.4 MiB (549 MiB at once). The
    decoder's peak RSS grows far less than that over the same prompts on a small image (which
    pays the batched forward, independent of the image size); the masks are right; a normal
    request works afterwards.

    The forward's two 64 MiB image states stay allocated between forwards (the transformer's
    per-thread ``ScratchBuffers``), so they no longer leave room under the first request's
    peak for the second one's masks: the bound allows for them."""
    store_url = "diskcache://" + tempfile.mkdtemp(prefix="sam2-decoder-memory-")
    store = open_store(store_url)
    ids = {}
    for height, width in ((480, 640), (3000, 4000)):
        [embedding] = model.embed_images(synthetic_rgb(height, width, seed=31),
                                         input_color_format="rgb")
        store.put_embedding(embedding)
        ids[height, width] = embedding

    def boxes(height: int, width: int) -> list[decoder_pb2.Prompt]:
        return [decoder_pb2.Prompt(box=common_pb2.Box(
            x_min_px=width * i / 40, y_min_px=height * i / 50,
            x_max_px=width * (0.5 + i / 40), y_max_px=height * (0.6 + i / 50)))
            for i in range(16)]

    all_at_once_mib = 16 * 3 * 3000 * 4000 / 2**20
    with decoder_process(tiny_checkpoint, store_url, "--max-mask-pixels", "600000000",
                         "--max-message-mb", "256") as decoder, \
            grpc.insecure_channel(decoder.address,
                                  options=channel_options(256 * 2**20)) as channel:
        stub = decoder_pb2_grpc.DecoderServiceStub(channel)
        pid = decoder.process.pid  # type: ignore[union-attr]
        small = ids[480, 640]
        stub.Segment(decoder_pb2.SegmentRequest(embedding_id=small.embedding_id,
                                                prompts=boxes(480, 640)), timeout=120)
        before = _peak_rss_mib(pid)
        large = ids[3000, 4000]
        request = decoder_pb2.SegmentRequest(embedding_id=large.embedding_id,
                                             prompts=boxes(3000, 4000),
                                             mask_format=common_pb2.MASK_FORMAT_RAW_BITS)
        response = stub.Segment(request, timeout=300)
        growth = _peak_rss_mib(pid) - before
        bound = 250 + _SCRATCH_BYTES / 2**20
        assert growth < bound < all_at_once_mib, f"peak RSS grew {growth:.0f} MiB"

        # The same batch in process, on the embedding as the decoder read it; a few masks
        # made at a time, so that the test's own memory stays bounded too.
        prompts = [Prompt(box=wire.box_from_proto(p.box)) for p in request.prompts]
        stored = store.get_embedding(large.embedding_id, model.model_id)
        want = model.decode_prompts(stored, prompts, deferred_masks=True)
        for index in (0, 9, 15):
            got = [wire.mask_from_proto(c.mask) for c in response.results[index].candidates]
            np.testing.assert_array_equal(np.stack(got), np.asarray(want[index].masks)[0])
        assert len(response.results) == 16
        assert all(len(r.candidates) == 3 for r in response.results)

        ok = stub.Segment(decoder_pb2.SegmentRequest(
            embedding_id=small.embedding_id, prompts=[point_prompt(100, 120)]), timeout=60)
        assert len(ok.results[0].candidates) == 3
