"""Proto <-> domain conversion: images, prompts, predictions, through serialised bytes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from sam2_shared import wire
from sam2_shared.api.v1 import common_pb2, decoder_pb2, tracking_pb2
from sam2_shared.errors import InvalidInputError, LogitsNotFoundError
from sam2_shared.inference.imaging import decode_image
from sam2_shared.prompts import Prompt, Sam2BatchedPrediction
from sam2_shared.wire.masks import MaskEncoding
from sam2_shared.wire.tracking import tracking_prompt_from_proto, tracking_prompt_to_proto


def _through_wire(message):  # type: ignore[no-untyped-def]
    """What the peer sees: serialise and parse again."""
    return type(message).FromString(message.SerializeToString())


def _rgb_image(height: int = 6, width: int = 5) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# --- images -----------------------------------------------------------------------


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_raw_color_images_decode_to_the_same_rgb(order: str) -> None:
    rgb = _rgb_image()
    sent = rgb if order == "rgb" else rgb[:, :, ::-1]
    proto = _through_wire(wire.image_to_proto(sent, order))
    assert proto.raw.channel_count == 3 and proto.raw.height_px == 6 and proto.raw.width_px == 5
    data, color_format = wire.image_from_proto(proto)
    np.testing.assert_array_equal(decode_image(data, input_color_format=color_format), rgb)


@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_raw_alpha_images_drop_alpha(order: str) -> None:
    rgb = _rgb_image()
    alpha = np.full((6, 5, 1), 7, dtype=np.uint8)
    sent = np.concatenate([rgb if order == "rgb" else rgb[:, :, ::-1], alpha], axis=2)
    data, color_format = wire.image_from_proto(_through_wire(wire.image_to_proto(sent, order)))
    np.testing.assert_array_equal(decode_image(data, input_color_format=color_format), rgb)


def test_raw_gray_and_unspecified_format() -> None:
    gray = _rgb_image()[:, :, 0]
    proto = common_pb2.Image(
        raw=common_pb2.RawImage(pixels=gray.tobytes(), height_px=6, width_px=5, channel_count=1)
    )
    data, color_format = wire.image_from_proto(proto)
    np.testing.assert_array_equal(
        decode_image(data, input_color_format=color_format)[:, :, 1], gray
    )
    # Three channels with no declared order mean RGB.
    rgb = _rgb_image()
    proto = common_pb2.Image(
        raw=common_pb2.RawImage(pixels=rgb.tobytes(), height_px=6, width_px=5, channel_count=3)
    )
    data, color_format = wire.image_from_proto(proto)
    np.testing.assert_array_equal(decode_image(data, input_color_format=color_format), rgb)


def test_encoded_bytes_pass_through() -> None:
    rgb = _rgb_image(16, 12)
    ok, png = cv2.imencode(".png", rgb[:, :, ::-1])
    assert ok
    data, color_format = wire.image_from_proto(_through_wire(wire.image_to_proto(png.tobytes())))
    assert data == png.tobytes()
    np.testing.assert_array_equal(decode_image(data, input_color_format=color_format), rgb)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (dict(pixels=b"\0" * 30, height_px=0, width_px=5, channel_count=1), "positive"),
        (dict(pixels=b"\0" * 30, height_px=6, width_px=5, channel_count=2), "channel_count"),
        (dict(pixels=b"\0" * 29, height_px=6, width_px=5, channel_count=1), "30 pixel bytes"),
        (
            dict(
                pixels=b"\0" * 90,
                height_px=6,
                width_px=5,
                channel_count=3,
                color_format=common_pb2.COLOR_FORMAT_RGBA,
            ),
            "COLOR_FORMAT_RGBA needs channel_count 4",
        ),
        (dict(pixels=b"", height_px=6, width_px=5, channel_count=1, color_format=99), "unknown"),
    ],
)
def test_bad_raw_images_are_rejected(raw: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        wire.image_from_proto(common_pb2.Image(raw=common_pb2.RawImage(**raw)))


def test_empty_images_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="no pixels"):
        wire.image_from_proto(common_pb2.Image())
    with pytest.raises(InvalidInputError, match="empty"):
        wire.image_from_proto(common_pb2.Image(encoded_bytes=b""))


# --- prompts ----------------------------------------------------------------------


def test_prompt_round_trip() -> None:
    logits = np.random.default_rng(2).normal(size=(256, 256)).astype(np.float32)
    prompt = Prompt(
        point_coords=np.array([[10.5, 20.25], [3.0, 4.0]], dtype=np.float32),
        point_labels=np.array([1, 0]),
        box=np.array([1.0, 2.0, 30.0, 40.0]),
        mask_input=logits,
        multimask_output=False,
    )
    proto = _through_wire(wire.prompt_to_proto(prompt))
    assert [p.label for p in proto.points] == [
        common_pb2.POINT_LABEL_FOREGROUND,
        common_pb2.POINT_LABEL_BACKGROUND,
    ]
    assert len(proto.mask_logits) == 256 * 256 * 4
    (back,) = wire.prompts_from_proto([proto])
    np.testing.assert_array_equal(back.point_coords, prompt.point_coords)
    np.testing.assert_array_equal(back.point_labels, [1, 0])
    np.testing.assert_array_equal(back.box, prompt.box)
    np.testing.assert_array_equal(back.mask_input, logits)
    assert back.mask_input.flags.writeable and back.mask_input.dtype == np.float32
    assert back.multimask_output is False


def test_multimask_defaults_to_true_when_unset() -> None:
    proto = decoder_pb2.Prompt(box=common_pb2.Box(x_min_px=1, y_min_px=1, x_max_px=5, y_max_px=5))
    (prompt,) = wire.prompts_from_proto([_through_wire(proto)])
    assert prompt.multimask_output is True
    assert prompt.point_coords is None and prompt.mask_input is None


def test_logits_handle_goes_through_the_resolver() -> None:
    stored = np.full((256, 256), 3.0, dtype=np.float32)
    proto = wire.prompt_to_proto(
        Prompt(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1])), logits_handle="h1"
    )
    (prompt,) = wire.prompts_from_proto([proto], {"h1": stored}.__getitem__)
    assert prompt.mask_input is stored
    with pytest.raises(LogitsNotFoundError) as info:
        wire.prompts_from_proto([proto])
    assert info.value.reason == "LOGITS_NOT_FOUND"


def test_bad_prompts_are_rejected() -> None:
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        wire.prompts_from_proto([])
    unlabeled = decoder_pb2.Prompt(points=[common_pb2.Point(x_px=1, y_px=1)])
    with pytest.raises(InvalidInputError, match="prompt 1 point 0: label") as info:
        wire.prompts_from_proto([decoder_pb2.Prompt(), unlabeled])
    assert info.value.metadata == {"prompt_index": "1"}
    for size in (1000, 256 * 256 * 4 + 4):  # the length is checked before any is read
        wrong_logits = decoder_pb2.Prompt(mask_logits=b"\0" * size)
        with pytest.raises(InvalidInputError,
                           match=rf"prompt 0: .*\(262144 bytes\), got {size} bytes") as info:
            wire.prompts_from_proto([wrong_logits])
        assert info.value.metadata == {"prompt_index": "0"}
    with pytest.raises(InvalidInputError, match="2 points but 1 point_labels"):
        wire.prompt_to_proto(Prompt(point_coords=np.zeros((2, 2)), point_labels=np.array([1])))
    with pytest.raises(InvalidInputError, match="1 or 0"):
        wire.prompt_to_proto(Prompt(point_coords=np.zeros((1, 2)), point_labels=np.array([2])))


# --- predictions ------------------------------------------------------------------


def _prediction(prompt_count: int, candidate_count: int, height: int = 21, width: int = 34):
    rng = np.random.default_rng(prompt_count * 10 + candidate_count)
    return Sam2BatchedPrediction(
        masks=rng.random((prompt_count, candidate_count, height, width)) < 0.3,
        scores=rng.random((prompt_count, candidate_count)).astype(np.float32),
        logits=rng.normal(size=(prompt_count, candidate_count, 256, 256)).astype(np.float32),
        object_score_logits=rng.normal(size=prompt_count).astype(np.float32),
    )


@pytest.mark.parametrize("encoding", list(MaskEncoding))
def test_prediction_round_trip(encoding: MaskEncoding) -> None:
    prediction = _prediction(2, 3)
    handles = [["a0", "a1", "a2"], ["b0", "b1", "b2"]]
    results = wire.prompt_results_to_proto(prediction, encoding, handles, include_logits=True)
    response = _through_wire(decoder_pb2.SegmentResponse(results=results))
    back, back_handles = wire.prediction_from_proto(response.results)
    np.testing.assert_array_equal(back.masks, prediction.masks)
    np.testing.assert_array_equal(back.scores, prediction.scores)
    np.testing.assert_array_equal(back.logits, prediction.logits)
    np.testing.assert_array_equal(back.object_score_logits, prediction.object_score_logits)
    np.testing.assert_array_equal(back.best_indices, prediction.best_indices)
    assert [r.best_index for r in response.results] == prediction.best_indices.tolist()
    assert back_handles == handles


def test_masks_carry_area_bbox_and_pycocotools_counts() -> None:
    prediction = _prediction(1, 1)
    prediction.masks[:] = False
    prediction.masks[0, 0, 4:9, 10:13] = True
    (result,) = wire.prompt_results_to_proto(prediction)
    mask = result.candidates[0].mask
    assert (mask.height_px, mask.width_px, mask.area_px) == (21, 34, 15)
    bbox = mask.bbox
    assert (bbox.x_min_px, bbox.y_min_px, bbox.x_max_px, bbox.y_max_px) == (10, 4, 13, 9)
    rle = {"size": [21, 34], "counts": mask.coco_rle_counts}
    np.testing.assert_array_equal(coco_mask.decode(rle).astype(bool), prediction.masks[0, 0])
    assert result.candidates[0].logits == b""  # only on request


def test_ragged_candidate_counts() -> None:
    rows = [_prediction(1, 3), _prediction(1, 1)]
    results = wire.prompt_results_to_proto(rows, MaskEncoding.RAW_BITS)
    assert [len(r.candidates) for r in results] == [3, 1]
    back, handles = wire.predictions_from_proto(results)
    assert [b.masks.shape for b in back] == [(1, 3, 21, 34), (1, 1, 21, 34)]
    assert back[0].logits.shape == (1, 3, 0, 0)  # not requested
    assert handles == [["", "", ""], [""]]
    with pytest.raises(InvalidInputError, match="different candidate counts"):
        wire.prediction_from_proto(results)


def test_handle_count_must_match() -> None:
    with pytest.raises(ValueError, match="2 logits handles for 3 candidates"):
        wire.prompt_results_to_proto(_prediction(1, 3), logits_handles=[["x", "y"]])


def test_mask_formats() -> None:
    assert (
        wire.mask_encoding_from_proto(common_pb2.MASK_FORMAT_UNSPECIFIED) is MaskEncoding.COCO_RLE
    )
    for encoding in MaskEncoding:
        assert wire.mask_encoding_from_proto(wire.mask_format_to_proto(encoding)) is encoding
    with pytest.raises(InvalidInputError, match="unknown mask_format"):
        wire.mask_encoding_from_proto(42)


def test_embedding_to_proto() -> None:
    proto = wire.embedding_to_proto("abc", "sam2.1/hiera_tiny", (480, 640))
    assert (proto.embedding_id, proto.model_id, proto.height_px, proto.width_px) == (
        "abc",
        "sam2.1/hiera_tiny",
        480,
        640,
    )


@pytest.mark.parametrize("field", ["coco_rle_counts", "png_data", "packed_bits"])
def test_a_tracking_mask_must_have_the_videos_size_before_it_is_decoded(field: str) -> None:
    # 6 characters of COCO RLE can claim 16384x16384 (268 M pixels); the declared size is
    # checked against the session's video size first, so nothing that size is allocated.
    request = tracking_pb2.AddPromptRequest(session_id="s", frame_index=0, object_id=1)
    request.mask.height_px, request.mask.width_px = 16384, 16384
    setattr(request.mask, field, "0" if field == "coco_rle_counts" else b"\x00")
    with pytest.raises(InvalidInputError, match="send it at the video's size, 80x64"):
        tracking_prompt_from_proto(request, (64, 80))
    tracking_prompt_to_proto(request, mask=np.eye(64, 80, dtype=bool))
    assert tracking_prompt_from_proto(request, (64, 80)).mask.sum() == 64
