"""Video tracking: proto <-> domain, for ``TrackingService`` and ``Sam2TrackingClient``.

Points, boxes and masks are read and written with the same helpers (and so the same label
table and errors) as ``Segment``'s prompts in ``sam2_shared.wire.segment``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sam2_shared.api.v1 import tracking_pb2
from sam2_shared.errors import InvalidInputError
from sam2_shared.wire.masks import (
    MaskEncoding,
    encode_coco_rle,
    encode_masks,
    mask_areas,
    mask_bboxes,
)
from sam2_shared.wire.segment import (
    box_from_proto,
    box_to_proto,
    encoded_mask_to_proto,
    mask_from_proto,
    points_from_proto,
    points_to_proto,
)


@dataclass(frozen=True)
class TrackingPrompt:
    """An ``AddPrompt``'s clicks, box and mask in domain values (each may be None).

    Attributes:
        points: [N, 2] float32 (x, y) pixels; labels: [N] int32, 1 positive / 0 negative.
        box: [4] float32 ``[x_min, y_min, x_max, y_max]`` pixels.
        mask: [H, W] bool mask at the video's size.
    """

    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None
    mask: np.ndarray | None


def tracking_prompt_from_proto(request: tracking_pb2.AddPromptRequest,
                               video_hw: tuple[int, int] | None = None) -> TrackingPrompt:
    """``video_hw``: the session's video size, the only mask size accepted (checked before
    the mask is decoded)."""
    points, labels = points_from_proto(request.points, "prompt")
    box = box_from_proto(request.box) if request.HasField("box") else None
    mask = mask_from_proto(request.mask, video_hw) if request.HasField("mask") else None
    return TrackingPrompt(points, labels, box, mask)


def tracking_prompt_to_proto(
    request: tracking_pb2.AddPromptRequest, points: Any = None, labels: Any = None,
    box: Any = None, mask: Any = None,
) -> None:
    """Fill ``request``'s prompt fields; labels default to 1 (foreground) per point."""
    if points is not None:
        coords = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        points_to_proto(request.points, coords, np.ones(len(coords)) if labels is None
                        else labels)
    if box is not None:
        request.box.CopyFrom(box_to_proto(box))
    if mask is not None:
        binary = np.asarray(mask).astype(bool)
        if binary.ndim != 2:
            raise InvalidInputError(f"mask must be HxW, got {binary.shape}")
        request.mask.height_px, request.mask.width_px = binary.shape
        request.mask.coco_rle_counts = encode_coco_rle(binary)[0]


def frame_to_proto(result: Any, encoding: MaskEncoding) -> tracking_pb2.FrameMasks:
    """Every object's mask of one frame (a ``FrameResult``), encoded."""
    masks = np.asarray(result.masks)
    frame = tracking_pb2.FrameMasks(frame_index=int(result.frame_idx))
    if masks.shape[0] == 0:
        return frame
    encoded = encode_masks(masks, encoding)
    areas, boxes = mask_areas(masks), mask_bboxes(masks)
    for k, obj_id in enumerate(result.obj_ids):
        frame.objects.add(
            object_id=int(obj_id),
            mask=encoded_mask_to_proto(masks[k], encoded[k], areas[k], boxes[k], encoding),
            object_score_logit=float(result.object_score_logits[k]),
        )
    return frame


@dataclass(frozen=True)
class TrackedFrame:
    """Every object's mask on one frame.

    Attributes:
        frame_index: 0-based frame index.
        object_ids: object ids, in the session's order.
        masks: [O, H, W] bool at the video's size.
        object_score_logits: [O] float32 presence logits (> 0: visible).
    """

    frame_index: int
    object_ids: list[int]
    masks: np.ndarray
    object_score_logits: np.ndarray


def tracked_frame_from_proto(frame: Any) -> TrackedFrame:
    masks = [mask_from_proto(o.mask) for o in frame.objects]
    return TrackedFrame(
        frame_index=int(frame.frame_index),
        object_ids=[int(o.object_id) for o in frame.objects],
        masks=np.stack(masks) if masks else np.zeros((0, 0, 0), dtype=bool),
        object_score_logits=np.array([o.object_score_logit for o in frame.objects],
                                     dtype=np.float32),
    )
