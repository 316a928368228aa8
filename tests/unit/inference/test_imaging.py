from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sam2_shared.errors import InvalidInputError
from sam2_shared.inference.imaging import (
    IMAGE_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    boxes_to_points,
    decode_image,
    masks_from_low_res,
    points_to_model_frame,
    validate_prompt,
)
from sam2_shared.inference.transforms import postprocess_masks, preprocess_images
from sam2_shared.prompts import Prompt
from tests.helpers.hostile_payloads import png_header_only

RED_RGB = (200, 10, 30)


def _colour_image_rgb(height: int = 6, width: int = 8) -> np.ndarray:
    """A distinct colour per quadrant so that order and orientation errors show."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2, : width // 2] = RED_RGB
    rgb[: height // 2, width // 2 :] = (0, 200, 0)
    rgb[height // 2 :, : width // 2] = (0, 0, 200)
    rgb[height // 2 :, width // 2 :] = (250, 250, 250)
    return rgb


def _png(pixels: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", pixels)  # cv2 expects BGR(A) or gray
    assert ok
    return encoded.tobytes()


# ----- numpy arrays -----------------------------------------------------------------------


def test_bgr_array_is_default_and_converted_to_rgb() -> None:
    rgb = _colour_image_rgb()
    out = decode_image(np.ascontiguousarray(rgb[:, :, ::-1]))
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    assert tuple(out[0, 0]) == RED_RGB
    np.testing.assert_array_equal(out, rgb)


def test_rgb_array_with_rgb_flag_is_kept() -> None:
    rgb = _colour_image_rgb()
    out = decode_image(rgb, input_color_format="RGB")
    assert tuple(out[0, 0]) == RED_RGB
    np.testing.assert_array_equal(out, rgb)


def test_gray_arrays_expand_to_three_equal_channels() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for array in (gray, gray[:, :, None]):
        out = decode_image(array)
        assert out.shape == (3, 4, 3)
        for channel in range(3):
            np.testing.assert_array_equal(out[:, :, channel], gray)


@pytest.mark.parametrize("color_format", ["bgr", "rgb"])
def test_four_channel_arrays_drop_alpha(color_format: str) -> None:
    rgb = _colour_image_rgb()
    ordered = rgb[:, :, ::-1] if color_format == "bgr" else rgb
    with_alpha = np.concatenate([ordered, np.full((*rgb.shape[:2], 1), 7, np.uint8)], axis=2)
    out = decode_image(with_alpha, input_color_format=color_format)
    np.testing.assert_array_equal(out, rgb)


def test_uint16_array_keeps_high_byte() -> None:
    values = np.array([[0, 255, 256, 0x80FF], [0xFFFF, 0x1234, 0xFF00, 1]], np.uint16)
    out = decode_image(values)
    np.testing.assert_array_equal(out[:, :, 0], (values >> 8).astype(np.uint8))


def test_bool_array_maps_to_0_and_255() -> None:
    out = decode_image(np.array([[True, False]]))
    np.testing.assert_array_equal(out[0, :, 1], [255, 0])


def test_non_contiguous_array_gives_contiguous_output() -> None:
    rgb = _colour_image_rgb(8, 8)
    view = rgb[::2, ::2]
    out = decode_image(view, input_color_format="rgb")
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((4, 4, 3), np.float32), "float32"),
        (np.zeros((4, 4, 3), np.int32), "int32"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 4, 2), np.uint8), "(4, 4, 2)"),
        (np.zeros((4, 4, 5), np.uint8), "(4, 4, 5)"),
        (np.zeros((2, 4, 4, 3), np.uint8), "(2, 4, 4, 3)"),
        (np.zeros(5, np.uint8), "(5,)"),
    ],
)
def test_bad_arrays_are_rejected_with_what_was_received(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        decode_image(array)
    assert fragment in str(error.value)
    assert isinstance(error.value, ValueError)


def test_unknown_color_format_rejected() -> None:
    with pytest.raises(InvalidInputError, match="input_color_format"):
        decode_image(np.zeros((2, 2, 3), np.uint8), input_color_format="hsv")


# ----- encoded bytes and files ------------------------------------------------------------


def test_png_bytes_in_every_buffer_type_decode_to_real_colours() -> None:
    rgb = _colour_image_rgb()
    data = _png(rgb[:, :, ::-1])
    for buffer in (data, bytearray(data), memoryview(data)):
        # input_color_format does not apply to encoded images
        for color_format in ("bgr", "rgb"):
            out = decode_image(buffer, input_color_format=color_format)
            np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("extension", [".bmp", ".tiff", ".webp"])
def test_lossless_formats_round_trip(extension: str) -> None:
    rgb = _colour_image_rgb()
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if extension == ".webp" else []  # 101 = lossless
    ok, encoded = cv2.imencode(extension, rgb[:, :, ::-1], params)
    assert ok
    np.testing.assert_array_equal(decode_image(encoded.tobytes()), rgb)


def test_jpeg_bytes_decode_close_to_original() -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[...] = RED_RGB
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95)
    out = decode_image(buffer.getvalue())
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 4


def test_gray_png_expands_to_rgb() -> None:
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    out = decode_image(_png(gray))
    assert out.shape == (4, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_sixteen_bit_png_is_scaled_like_sixteen_bit_arrays() -> None:
    gray16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000 + 0x80FF).astype(np.uint16)
    out = decode_image(_png(gray16))
    np.testing.assert_array_equal(out[:, :, 0], (gray16 >> 8).astype(np.uint8))
    np.testing.assert_array_equal(out, decode_image(gray16))
    colour16 = np.stack([gray16, gray16 // 2, gray16 // 3], axis=2)  # BGR order for cv2
    np.testing.assert_array_equal(decode_image(_png(colour16)), decode_image(colour16))


def test_rgba_png_drops_alpha_without_compositing() -> None:
    rgb = _colour_image_rgb()
    bgra = np.concatenate([rgb[:, :, ::-1], np.zeros((*rgb.shape[:2], 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(decode_image(_png(bgra)), rgb)


def test_exif_orientation_is_applied() -> None:
    # Stored 20 high x 40 wide, red on the left; Orientation 6 = rotate 90 degrees clockwise
    # to display, so the displayed image is 40 high x 20 wide with red on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buffer.getvalue())
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 1] < 50  # top is red
    assert out[35, 10].max() < 50  # bottom is black


def test_file_paths_as_str_and_path(tmp_path: Path) -> None:
    rgb = _colour_image_rgb()
    path = tmp_path / "picture.png"
    path.write_bytes(_png(rgb[:, :, ::-1]))
    np.testing.assert_array_equal(decode_image(path), rgb)
    np.testing.assert_array_equal(decode_image(str(path)), rgb)


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read image file"):
        decode_image(tmp_path / "nope.png")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty image bytes"),
        (b"this is not an image at all", "could not decode 27 bytes"),
        (_png(np.zeros((4, 4), np.uint8))[:40], "could not decode"),
    ],
)
def test_bad_bytes_are_rejected(data: bytes, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment) as error:
        decode_image(data)
    assert "accepted" in str(error.value)


def test_pixel_limit_checked_on_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _png(np.zeros((100, 50), np.uint8))

    def must_not_decode(*_: object) -> None:
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(cv2, "imdecode", must_not_decode)
    with pytest.raises(InvalidInputError, match="exceeds the limit of 4999 pixels"):
        decode_image(data, max_pixels=4999)


def test_pixel_limit_passes_at_the_limit_and_applies_to_arrays() -> None:
    data = _png(np.zeros((100, 50), np.uint8))
    assert decode_image(data, max_pixels=5000).shape == (100, 50, 3)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        decode_image(np.zeros((100, 50), np.uint8), max_pixels=4999)


# PIL warns above MAX_IMAGE_PIXELS (~89M) while we read the header; our own check refuses.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    ("width", "height", "fragment"),
    [
        (12000, 10000, "120000000 pixels exceeds the limit of 100000000"),  # our limit
        (40000, 40000, "exceeds the limit of 100000000 pixels"),  # PIL refuses first
    ],
)
def test_pixel_limit_on_bomb_headers(width: int, height: int, fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        decode_image(png_header_only(width, height))


# ----- PIL and other types ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_pil_images_convert_to_rgb(mode: str) -> None:
    rgb = _colour_image_rgb()
    pil = Image.fromarray(rgb).convert(mode)
    out = decode_image(pil)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(pil.convert("RGB")))
    if mode in ("RGB", "RGBA"):
        np.testing.assert_array_equal(out, rgb)


def test_pil_sixteen_bit_image_is_scaled_not_clipped() -> None:
    gray16 = np.array([[0, 0x1234, 0xFFFF]], np.uint16)
    out = decode_image(Image.fromarray(gray16))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0x12, 0xFF])


@pytest.mark.parametrize("value", [None, 12, [[1, 2], [3, 4]], {"image": b""}])
def test_unsupported_types_rejected(value: object) -> None:
    with pytest.raises(InvalidInputError, match="unsupported image input of type") as error:
        decode_image(value)
    assert "accepted" in str(error.value)


# ----- preprocessing ----------------------------------------------------------------------


def test_constant_image_preprocesses_to_normalised_constant() -> None:
    image = np.full((37, 53, 3), (51, 102, 204), np.uint8)
    batch = preprocess_images([image])
    assert batch.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and batch.dtype == torch.float32
    for channel, value in enumerate((51, 102, 204)):
        expected = (value / 255 - PIXEL_MEAN[channel]) / PIXEL_STD[channel]
        torch.testing.assert_close(
            batch[0, channel], torch.full((IMAGE_SIZE, IMAGE_SIZE), expected), atol=1e-5, rtol=0
        )


def test_preprocess_matches_reference_recipe_and_handles_mixed_sizes() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 48), (1500, 20))]
    batch = preprocess_images(images)
    assert batch.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    for index, image in enumerate(images):
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        resized = F.interpolate(
            x[None], size=(1024, 1024), mode="bilinear", align_corners=False, antialias=True
        )[0]
        torch.testing.assert_close(batch[index], (resized - mean) / std, atol=0, rtol=0)
    # antialias matters when downscaling: the plain bilinear resize is measurably different
    plain = F.interpolate(
        torch.from_numpy(images[1]).permute(2, 0, 1).float()[None] / 255, size=(1024, 1024),
        mode="bilinear", align_corners=False,
    )[0]
    assert not torch.allclose(batch[1], (plain - mean) / std, atol=1e-3)


@pytest.mark.parametrize(
    "images",
    [[], [np.zeros((4, 4), np.uint8)], [np.zeros((4, 4, 3), np.float32)], ["x"]],
)
def test_preprocess_rejects_non_rgb_uint8(images: list) -> None:
    with pytest.raises(InvalidInputError):
        preprocess_images(images)


# ----- coordinates ------------------------------------------------------------------------


def test_points_scale_x_by_width_and_y_by_height() -> None:
    coords = np.array([[0.0, 0.0], [640.0, 480.0], [320.0, 120.0]])
    out = points_to_model_frame(coords, (480, 640))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0, 0], [1024, 1024], [512, 256]])
    assert coords[1, 0] == 640.0  # input untouched


def test_points_keep_leading_shape_and_match_float32_torch_order() -> None:
    coords = np.array([[[10.3, 7.7]], [[99.9, 0.1]]])
    out = points_to_model_frame(coords, (333, 517))
    assert out.shape == (2, 1, 2)
    reference = torch.as_tensor(coords, dtype=torch.float32)
    reference[..., 0] = reference[..., 0] / 517
    reference[..., 1] = reference[..., 1] / 333
    np.testing.assert_array_equal(out, (reference * 1024).numpy())


def test_boxes_become_corner_points() -> None:
    boxes = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    corners = boxes_to_points(boxes)
    assert corners.shape == (2, 2, 2)
    np.testing.assert_array_equal(corners[1], [[5, 6], [7, 8]])
    assert boxes_to_points(np.array([1, 2, 3, 4])).shape == (1, 2, 2)
    with pytest.raises(InvalidInputError):
        boxes_to_points(np.zeros((2, 3)))


# ----- prompt validation ------------------------------------------------------------------

HW = (100, 200)  # H, W


def _points(*xy: tuple[float, float], labels: list[int] | None = None) -> Prompt:
    coords = np.array(xy, np.float32)
    return Prompt(point_coords=coords, point_labels=np.array(labels or [1] * len(xy)))


@pytest.mark.parametrize(
    "prompt",
    [
        _points((0, 0), (200, 100)),  # edges are inside
        Prompt(box=np.array([0, 0, 200, 100])),
        Prompt(mask_input=np.zeros((256, 256), np.float32)),
        Prompt(mask_input=np.zeros((1, 256, 256), np.float32)),
        Prompt(
            point_coords=np.array([[5, 5]]), point_labels=np.array([0]),
            box=np.array([[1, 1, 50, 50]]),
        ),
    ],
)
def test_valid_prompts_pass(prompt: Prompt) -> None:
    validate_prompt(prompt, HW)


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        (Prompt(), "empty prompt"),
        (Prompt(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty prompt"),
        (_points((np.nan, 3)), "NaN or infinite"),
        (_points((np.inf, 3)), "NaN or infinite"),
        (_points((200.5, 3)), "outside the 200x100 image"),
        (_points((-0.1, 3)), "outside"),
        (_points((3, 101)), "outside"),
        (Prompt(point_coords=np.array([[1, 1]])), "point_labels are required"),
        (
            Prompt(point_coords=np.array([[1, 1], [2, 2]]), point_labels=np.array([1])),
            "must have shape [2]",
        ),
        (_points((1, 1), labels=[2]), "1 (positive) or 0 (negative)"),
        (_points((1, 1), labels=[-1]), "1 (positive) or 0 (negative)"),
        (Prompt(point_coords=np.array([1, 1]), point_labels=np.array([1])), "shape [N, 2]"),
        (Prompt(point_labels=np.array([1])), "without point_coords"),
        (Prompt(box=np.array([10, 10, 10, 20])), "degenerate"),
        (Prompt(box=np.array([10, 30, 20, 20])), "degenerate"),
        (Prompt(box=np.array([10, 10, 201, 20])), "outside"),
        (Prompt(box=np.array([-1, 10, 20, 20])), "outside"),
        (Prompt(box=np.array([0, 0, np.nan, 20])), "NaN"),
        (Prompt(box=np.array([0, 0, 5])), "box must have shape [4]"),
        (Prompt(mask_input=np.zeros((64, 64))), "mask_input must have shape [256, 256]"),
        (Prompt(mask_input=np.full((256, 256), np.inf)), "NaN or infinite"),
        (Prompt(point_coords=[["a", "b"]], point_labels=[1]), "numeric"),
    ],
)
def test_invalid_prompts_raise(prompt: Prompt, fragment: str) -> None:
    with pytest.raises(InvalidInputError) as error:
        validate_prompt(prompt, HW)
    assert fragment in str(error.value)


# ----- post-processing --------------------------------------------------------------------


def test_postprocess_shapes_dtype_and_interpolation() -> None:
    logits = torch.randn(2, 3, 256, 256, dtype=torch.bfloat16)
    out = postprocess_masks(logits, (300, 500))
    assert out.shape == (2, 3, 300, 500) and out.dtype == torch.float32
    expected = F.interpolate(logits.float(), size=(300, 500), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    same = postprocess_masks(logits.float(), (256, 256))
    torch.testing.assert_close(same, logits.float(), atol=0, rtol=0)
    with pytest.raises(InvalidInputError):
        postprocess_masks(torch.zeros(3, 256, 256), (10, 10))


def test_fast_mask_upsampling_agrees_with_the_exact_path() -> None:
    """``masks_from_low_res`` (OpenCV, the serving path) vs ``postprocess_masks`` > 0 (torch,
    Meta's formula): only pixels whose logit is within ~1e-3 of 0 may flip."""
    torch.manual_seed(0)
    logits = F.interpolate(torch.randn(2, 3, 32, 32) * 8, size=(256, 256), mode="bilinear")
    for hw in ((1080, 1920), (17, 23), (64, 2048)):
        exact = postprocess_masks(logits, hw).numpy()
        fast = masks_from_low_res(logits.numpy(), hw)
        assert fast.shape == exact.shape and fast.dtype == np.bool_
        flips = fast != (exact > 0)
        assert flips.mean() < 1e-4
        assert np.abs(exact[flips]).max(initial=0.0) < 1e-3
    with pytest.raises(InvalidInputError):
        masks_from_low_res(np.zeros((3, 256, 256), np.float32), (10, 10))


@pytest.mark.parametrize(
    "data",
    [
        b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 30000 +X 30000\n" + bytes(64),  # HDR
        b"v/1\x01" + bytes(64),  # OpenEXR
        b"PF\n30000 30000\n-1.0\n" + bytes(64),  # PFM
        b"GIF89a" + bytes(64),
    ],
    ids=["radiance-hdr", "openexr", "pfm", "gif"],
)
def test_formats_outside_the_allow_list_are_refused_before_decoding(data: bytes) -> None:
    with pytest.raises(InvalidInputError, match="not JPEG, PNG, WebP, TIFF or BMP") as refused:
        decode_image(data, max_pixels=1_000_000)
    assert refused.value.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize("extension", [".png", ".jpg", ".webp", ".tiff", ".bmp"])
def test_the_allow_list_knows_every_accepted_format(extension: str) -> None:
    from sam2_shared.inference.imaging import encoded_format

    ok, data = cv2.imencode(extension, np.zeros((8, 8, 3), np.uint8))
    assert ok and encoded_format(data.tobytes()) is not None
