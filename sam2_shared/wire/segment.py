"""Images, prompts, masks and predictions: proto <-> domain, for the servicers and the client.

With the rest of ``sam2_shared.wire`` the only place besides the servicers, the server
and the client that knows the generated ``sam2_shared.api`` code. Domain values (``Prompt``,
``Sam2BatchedPrediction``, numpy arrays) never learn the wire format.

Wire conventions handled here:
    * point labels are an enum (FOREGROUND -> 1, BACKGROUND -> 0); an unset label is
      rejected;
    * low-res logits travel as 256 x 256 little-endian float32 bytes, row-major;
    * ``Prompt.multimask_output`` unset means True, as in the in-process API;
    * ``MaskFormat`` unset means COCO RLE.

Semantic checks of prompts against the image (finite, inside, non-degenerate box)
stay in ``sam2_shared.inference.imaging.validate_prompt``; this module checks only what the
wire format itself can get wrong, and raises ``InvalidInputError`` for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sam2_shared.api.v1 import common_pb2, decoder_pb2
from sam2_shared.errors import InvalidInputError, LogitsNotFoundError
from sam2_shared.prompts import LOW_RES_SIZE, Prompt, Sam2BatchedPrediction
from sam2_shared.wire import masks as mask_codec
from sam2_shared.wire.masks import MaskEncoding

LOGITS_DTYPE = np.dtype("<f4")
LOGITS_NBYTES = LOW_RES_SIZE * LOW_RES_SIZE * LOGITS_DTYPE.itemsize

# Raw colour format -> (channel count, input_color_format for imaging.decode_image).
_RAW_FORMATS: dict[int, tuple[int, str]] = {
    common_pb2.COLOR_FORMAT_GRAY: (1, "rgb"),  # gray ignores the colour order
    common_pb2.COLOR_FORMAT_RGB: (3, "rgb"),
    common_pb2.COLOR_FORMAT_BGR: (3, "bgr"),
    common_pb2.COLOR_FORMAT_RGBA: (4, "rgb"),
    common_pb2.COLOR_FORMAT_BGRA: (4, "bgr"),
}
_DEFAULT_RAW_FORMAT = {
    1: common_pb2.COLOR_FORMAT_GRAY,
    3: common_pb2.COLOR_FORMAT_RGB,
    4: common_pb2.COLOR_FORMAT_RGBA,
}
_MASK_FORMATS = {
    common_pb2.MASK_FORMAT_UNSPECIFIED: MaskEncoding.COCO_RLE,
    common_pb2.MASK_FORMAT_COCO_RLE: MaskEncoding.COCO_RLE,
    common_pb2.MASK_FORMAT_PNG: MaskEncoding.PNG,
    common_pb2.MASK_FORMAT_RAW_BITS: MaskEncoding.RAW_BITS,
}
_MASK_FORMAT_OF_ENCODING = {
    MaskEncoding.COCO_RLE: common_pb2.MASK_FORMAT_COCO_RLE,
    MaskEncoding.PNG: common_pb2.MASK_FORMAT_PNG,
    MaskEncoding.RAW_BITS: common_pb2.MASK_FORMAT_RAW_BITS,
}
_MASK_FIELD = {
    MaskEncoding.COCO_RLE: "coco_rle_counts",
    MaskEncoding.PNG: "png_data",
    MaskEncoding.RAW_BITS: "packed_bits",
}
_ENCODING_OF_FIELD = {field: encoding for encoding, field in _MASK_FIELD.items()}
_LABEL_VALUES = {common_pb2.POINT_LABEL_FOREGROUND: 1, common_pb2.POINT_LABEL_BACKGROUND: 0}
_LABEL_ENUMS = {value: enum for enum, value in _LABEL_VALUES.items()}

LogitsResolver = Callable[[str], np.ndarray]


# --- images -----------------------------------------------------------------------


def image_from_proto(image: common_pb2.Image) -> tuple[bytes | np.ndarray, str]:
    """``Image`` -> ``(image, input_color_format)`` for ``imaging.decode_image``.

    Encoded bytes are passed through (the colour format is then ignored); raw pixels
    become a zero-copy read-only [H, W] or [H, W, C] uint8 view with the colour order
    they declared.
    """
    source = image.WhichOneof("source")
    if source == "encoded_bytes":
        if not image.encoded_bytes:
            raise InvalidInputError("image.encoded_bytes is empty")
        return image.encoded_bytes, "rgb"
    if source == "raw":
        return _raw_from_proto(image.raw)
    raise InvalidInputError("image has no pixels: set encoded_bytes or raw")


def _raw_from_proto(raw: common_pb2.RawImage) -> tuple[np.ndarray, str]:
    height, width, channels = raw.height_px, raw.width_px, raw.channel_count
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"raw image size must be positive, got {width}x{height}")
    color_format = raw.color_format or _DEFAULT_RAW_FORMAT.get(channels)
    if color_format is None:
        raise InvalidInputError(f"raw image channel_count must be 1, 3 or 4, got {channels}")
    if color_format not in _RAW_FORMATS:
        raise InvalidInputError(f"unknown raw image color_format {color_format}")
    expected_channels, order = _RAW_FORMATS[color_format]
    if channels != expected_channels:
        name = common_pb2.ColorFormat.Name(color_format)
        raise InvalidInputError(
            f"raw image color_format {name} needs channel_count {expected_channels}, got {channels}"
        )
    expected_bytes = height * width * channels
    if len(raw.pixels) != expected_bytes:
        raise InvalidInputError(
            f"raw image of {width}x{height}x{channels} needs {expected_bytes} pixel bytes, "
            f"got {len(raw.pixels)}"
        )
    pixels = np.frombuffer(raw.pixels, dtype=np.uint8)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return pixels.reshape(shape), order


def image_to_proto(image: bytes | np.ndarray, input_color_format: str = "rgb") -> common_pb2.Image:
    """Encoded bytes or an [H, W] / [H, W, 3|4] uint8 array -> ``Image``.

    ``input_color_format`` ("rgb" or "bgr") is the channel order of 3/4-channel arrays.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return common_pb2.Image(encoded_bytes=bytes(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InvalidInputError(f"raw images must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    order = input_color_format.lower()
    formats = {
        (1, "rgb"): common_pb2.COLOR_FORMAT_GRAY,
        (1, "bgr"): common_pb2.COLOR_FORMAT_GRAY,
        (3, "rgb"): common_pb2.COLOR_FORMAT_RGB,
        (3, "bgr"): common_pb2.COLOR_FORMAT_BGR,
        (4, "rgb"): common_pb2.COLOR_FORMAT_RGBA,
        (4, "bgr"): common_pb2.COLOR_FORMAT_BGRA,
    }
    if (channels, order) not in formats:
        raise InvalidInputError(
            f"cannot send an image array of shape {array.shape} as {input_color_format!r}; "
            "expected HxW, HxWx3 or HxWx4 uint8 and 'rgb' or 'bgr'"
        )
    raw = common_pb2.RawImage(
        pixels=np.ascontiguousarray(array).tobytes(),
        height_px=array.shape[0],
        width_px=array.shape[1],
        channel_count=channels,
        color_format=formats[(channels, order)],
    )
    return common_pb2.Image(raw=raw)


def embedding_to_proto(
    embedding_id: str, model_id: str, original_hw: tuple[int, int]
) -> common_pb2.Embedding:
    return common_pb2.Embedding(
        embedding_id=embedding_id,
        model_id=model_id,
        height_px=original_hw[0],
        width_px=original_hw[1],
    )


# --- prompts ----------------------------------------------------------------------


def logits_from_bytes(data: bytes) -> np.ndarray:
    """256 x 256 little-endian float32 bytes -> [256, 256] float32 (a writable copy)."""
    if len(data) != LOGITS_NBYTES:
        raise InvalidInputError(
            f"mask logits must be {LOW_RES_SIZE}x{LOW_RES_SIZE} float32 ({LOGITS_NBYTES} "
            f"bytes), got {len(data)} bytes"
        )
    logits = np.frombuffer(data, dtype=LOGITS_DTYPE).reshape(LOW_RES_SIZE, LOW_RES_SIZE)
    return logits.astype(np.float32)


def logits_to_bytes(logits: np.ndarray) -> bytes:
    """[256, 256] (or [1, 256, 256]) logits -> little-endian float32 bytes."""
    array = np.asarray(logits)
    if array.size != LOW_RES_SIZE * LOW_RES_SIZE:
        raise InvalidInputError(f"mask logits must have shape [256, 256], got {array.shape}")
    return np.ascontiguousarray(array, dtype=LOGITS_DTYPE).tobytes()


def points_from_proto(
    points: Sequence[common_pb2.Point], where: str, **metadata: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Wire points -> ([N, 2] float32 (x, y), [N] int32 labels 1/0), or (None, None).

    Every point needs a label; ``where`` ("prompt 2") starts the error message.
    """
    if not points:
        return None, None
    coords = np.array([(p.x_px, p.y_px) for p in points], dtype=np.float32)
    try:
        labels = np.array([_LABEL_VALUES[p.label] for p in points], dtype=np.int32)
    except KeyError:
        bad = next(j for j, p in enumerate(points) if p.label not in _LABEL_VALUES)
        raise InvalidInputError(
            f"{where} point {bad}: label must be POINT_LABEL_FOREGROUND or "
            "POINT_LABEL_BACKGROUND",
            **metadata,
        ) from None
    return coords, labels


def points_to_proto(target: Any, coords: Any, labels: Any) -> None:
    """Append [N, 2] (x, y) pixels with [N] labels 1/0 to a repeated ``Point`` field."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64).reshape(-1)
    if labels.shape[0] != coords.shape[0]:
        raise InvalidInputError(f"{coords.shape[0]} points but {labels.shape[0]} point_labels")
    for (x, y), label in zip(coords, labels, strict=True):
        if int(label) not in _LABEL_ENUMS:
            raise InvalidInputError(f"point labels must be 1 or 0, got {label}")
        target.add(x_px=x, y_px=y, label=_LABEL_ENUMS[int(label)])


def box_from_proto(box: common_pb2.Box) -> np.ndarray:
    """Wire box -> [4] float32 ``[x_min, y_min, x_max, y_max]`` pixels."""
    return np.array([box.x_min_px, box.y_min_px, box.x_max_px, box.y_max_px], dtype=np.float32)


def box_to_proto(box: Any) -> common_pb2.Box:
    x_min, y_min, x_max, y_max = np.asarray(box, dtype=np.float64).reshape(4).tolist()
    return common_pb2.Box(x_min_px=x_min, y_min_px=y_min, x_max_px=x_max, y_max_px=y_max)


def encoded_mask_to_proto(
    mask: np.ndarray, encoded: bytes | str, area: int, bbox: np.ndarray, encoding: MaskEncoding
) -> common_pb2.EncodedMask:
    """One [H, W] mask's encoding, area and bounding box -> ``EncodedMask``."""
    height, width = mask.shape[-2:]
    message = common_pb2.EncodedMask(height_px=height, width_px=width, area_px=int(area))
    setattr(message, _MASK_FIELD[encoding], encoded)
    message.bbox.CopyFrom(box_to_proto(bbox))
    return message


def prompts_from_proto(
    prompts: Sequence[decoder_pb2.Prompt], resolve_logits: LogitsResolver | None = None
) -> list[Prompt]:
    """Wire prompts -> domain ``Prompt``s.

    ``resolve_logits(handle)`` returns the [256, 256] logits of a handle or raises
    ``LogitsNotFoundError``; without it, any handle is reported as not found.
    """
    if not prompts:
        raise InvalidInputError("no prompts: give at least one prompt")
    return [_prompt_from_proto(i, p, resolve_logits) for i, p in enumerate(prompts)]


def _prompt_from_proto(
    index: int, prompt: decoder_pb2.Prompt, resolve_logits: LogitsResolver | None
) -> Prompt:
    mask_input = None
    coords, labels = points_from_proto(prompt.points, f"prompt {index}", prompt_index=str(index))
    box = box_from_proto(prompt.box) if prompt.HasField("box") else None
    source = prompt.WhichOneof("mask_input")
    if source == "mask_logits":
        try:
            mask_input = logits_from_bytes(prompt.mask_logits)
        except InvalidInputError as exc:
            raise InvalidInputError(f"prompt {index}: {exc}", prompt_index=str(index)) from None
    elif source == "logits_handle":
        if resolve_logits is None:
            raise LogitsNotFoundError(
                f"prompt {index}: logits handle {prompt.logits_handle!r} is unknown or expired; "
                "send the logits inline or start again from points or a box",
                prompt_index=str(index),
            )
        mask_input = resolve_logits(prompt.logits_handle)
    multimask = prompt.multimask_output if prompt.HasField("multimask_output") else True
    return Prompt(
        point_coords=coords,
        point_labels=labels,
        box=box,
        mask_input=mask_input,
        multimask_output=multimask,
    )


def prompt_to_proto(prompt: Prompt, logits_handle: str | None = None) -> decoder_pb2.Prompt:
    """Domain ``Prompt`` -> wire prompt; ``logits_handle`` replaces ``mask_input``."""
    message = decoder_pb2.Prompt(multimask_output=bool(prompt.multimask_output))
    if prompt.point_coords is not None:
        points_to_proto(message.points, prompt.point_coords, prompt.point_labels)
    if prompt.box is not None:
        message.box.CopyFrom(box_to_proto(prompt.box))
    if logits_handle is not None:
        message.logits_handle = logits_handle
    elif prompt.mask_input is not None:
        message.mask_logits = logits_to_bytes(prompt.mask_input)
    return message


# --- masks and predictions ----------------------------------------------------------


def mask_encoding_from_proto(mask_format: int) -> MaskEncoding:
    """``MaskFormat`` -> ``MaskEncoding``; unspecified means COCO RLE."""
    try:
        return _MASK_FORMATS[mask_format]
    except KeyError:
        raise InvalidInputError(f"unknown mask_format {mask_format}") from None


def mask_format_to_proto(encoding: MaskEncoding) -> int:
    return _MASK_FORMAT_OF_ENCODING[MaskEncoding(encoding)]


def prompt_results_to_proto(
    predictions: Sam2BatchedPrediction | Sequence[Sam2BatchedPrediction],
    encoding: MaskEncoding = MaskEncoding.COCO_RLE,
    logits_handles: Sequence[Sequence[str]] | None = None,
    include_logits: bool = False,
) -> list[decoder_pb2.PromptResult]:
    """Predictions -> one ``PromptResult`` per prompt row.

    Masks are taken one candidate at a time (``masks[p, c]``), encoded and dropped before the
    next: with the decoder's ``DeferredMasks`` only one full-size mask exists at a time.

    Arguments:
        predictions: one ``Sam2BatchedPrediction`` for all P prompts, or a sequence of them
            (e.g. one per prompt, whose candidate counts may differ). ``masks`` is a
            [P, C, H, W] bool array or anything with that ``shape`` indexable by ``[p, c]``.
        encoding: how to encode the masks.
        logits_handles: per prompt row, one handle per candidate, or None.
        include_logits: also put each candidate's low-res logits inline.
    """
    rows = [predictions] if isinstance(predictions, Sam2BatchedPrediction) \
        else list(predictions)
    results: list[decoder_pb2.PromptResult] = []
    for prediction in rows:
        masks = prediction.masks
        prompt_count, candidate_count = masks.shape[:2]
        scores = np.asarray(prediction.scores, dtype=np.float32)
        objects = np.asarray(prediction.object_score_logits, dtype=np.float32).reshape(-1)
        for p in range(prompt_count):
            result = decoder_pb2.PromptResult(
                best_index=int(scores[p].argmax()),
                object_score_logit=float(objects[p]),
            )
            handles = logits_handles[len(results)] if logits_handles is not None else None
            if handles is not None and len(handles) != candidate_count:
                raise ValueError(f"{len(handles)} logits handles for {candidate_count} candidates")
            for c in range(candidate_count):
                mask = mask_to_proto(_candidate_mask(masks, p, c, encoding), encoding)
                candidate = result.candidates.add(mask=mask, score=float(scores[p, c]))
                if handles is not None:
                    candidate.logits_handle = handles[c]
                if include_logits:
                    candidate.logits = logits_to_bytes(prediction.logits[p, c])
            results.append(result)
    if logits_handles is not None and len(logits_handles) != len(results):
        raise ValueError(f"{len(logits_handles)} handle rows for {len(results)} prompts")
    return results


def _candidate_mask(masks: Any, p: int, c: int, encoding: MaskEncoding) -> np.ndarray:
    """``masks[p, c]``; made column-major when ``masks`` can (the decoder's ``DeferredMasks``)
    and the encoding is COCO RLE, whose runs go down the columns: no transposing copy."""
    candidate = getattr(masks, "candidate", None)
    if candidate is not None:
        return candidate(p, c, column_major=encoding is MaskEncoding.COCO_RLE)
    return np.asarray(masks[p, c])


def mask_to_proto(mask: np.ndarray, encoding: MaskEncoding) -> common_pb2.EncodedMask:
    """One [H, W] bool mask -> ``EncodedMask`` with its encoding, area and bounding box."""
    (encoded,) = mask_codec.encode_masks(mask, encoding)
    (area,) = mask_codec.mask_areas(mask)
    (bbox,) = mask_codec.mask_bboxes(mask)
    return encoded_mask_to_proto(mask, encoded, area, bbox, encoding)


def mask_from_proto(mask: common_pb2.EncodedMask,
                    expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """``EncodedMask`` -> [H, W] bool.

    ``expected_hw``: the only size accepted (a mask a caller sends), checked before decoding,
    so the declared size cannot make the server allocate more than that.
    """
    field = mask.WhichOneof("data")
    if field is None:
        raise InvalidInputError("encoded mask carries no data")
    if expected_hw is not None and (mask.height_px, mask.width_px) != tuple(expected_hw):
        raise InvalidInputError(
            f"mask is {mask.width_px}x{mask.height_px} pixels; send it at the video's size, "
            f"{expected_hw[1]}x{expected_hw[0]}",
            expected_height_px=str(expected_hw[0]), expected_width_px=str(expected_hw[1]))
    return mask_codec.decode_mask(
        getattr(mask, field), _ENCODING_OF_FIELD[field], mask.height_px, mask.width_px
    )


def predictions_from_proto(
    results: Sequence[decoder_pb2.PromptResult],
) -> tuple[list[Sam2BatchedPrediction], list[list[str]]]:
    """Wire results -> one ``Sam2BatchedPrediction`` (P = 1) per prompt, and per prompt the
    candidates' logits handles.

    ``logits`` is [1, C, 256, 256] when the response included them, else an empty
    [1, C, 0, 0] array (ask with ``include_logits`` or use the handles).
    """
    predictions: list[Sam2BatchedPrediction] = []
    handles: list[list[str]] = []
    for result in results:
        candidates = list(result.candidates)
        if not candidates:
            raise InvalidInputError("a prompt result has no candidates")
        masks = np.stack([mask_from_proto(c.mask) for c in candidates])
        if all(c.logits for c in candidates):
            logits = np.stack([logits_from_bytes(c.logits) for c in candidates])
        else:
            logits = np.zeros((len(candidates), 0, 0), dtype=np.float32)
        predictions.append(
            Sam2BatchedPrediction(
                masks=masks[None],
                scores=np.array([[c.score for c in candidates]], dtype=np.float32),
                logits=logits[None],
                object_score_logits=np.array([result.object_score_logit], dtype=np.float32),
            )
        )
        handles.append([c.logits_handle for c in candidates])
    return predictions, handles


def prediction_from_proto(
    results: Sequence[decoder_pb2.PromptResult],
) -> tuple[Sam2BatchedPrediction, list[list[str]]]:
    """Like ``predictions_from_proto`` but stacked into one [P, C, ...] prediction.

    All prompts must have the same candidate count (same ``multimask_output``).
    """
    rows, handles = predictions_from_proto(results)
    return Sam2BatchedPrediction.concatenate(rows), handles
