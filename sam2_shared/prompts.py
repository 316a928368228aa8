"""Prompts and predictions of the in-process API, and the argument rules of
``segment_images`` (numpy only: no torch, so that the client can use them).

``segment_images`` accepts what users of the well-known SAM 2 model API write:

- per-image arguments (``point_coordinates``, ``point_labels``, ``boxes``, ``mask_input``):
  a bare array/tensor is *the* prompt of one image, and with a batch of N images the same
  prompt for every image; a list/tuple of length 1 is broadcast to every image; a list/tuple
  of length N gives one entry per image; with several images any other length is an error
  (``split_per_image``). A nested list of numbers is read as per-image entries when its
  entries have at least one image's rank (a point list ``[[x, y]]`` is one image's points);
- per image, points ``[N, 2]`` + labels ``[N]`` are one prompt, ``[B, N, 2]`` + ``[B, N]``
  are B prompts; boxes ``[4]`` / ``[1, 4]`` one, ``[B, 4]`` B; points and boxes together
  pair up one box per point set; ``mask_input`` ``[256, 256]`` / ``[1, 256, 256]`` one,
  ``[B, 256, 256]`` / ``[B, 1, 256, 256]`` B — with points or boxes giving the B; alone,
  only ``[B, 1, 256, 256]``, since ``[3, 256, 256]`` is most often the three candidates of
  one earlier prompt (``prompts_from_arrays``).

Results: ``Sam2Prediction`` holds the user's shapes (one prompt: ``masks`` (C, H, W),
``scores`` (C,), ``logits`` (C, 256, 256); B > 1 prompts add a leading B axis) and
``.batched``, the same values always as [P, C, ...] (``Sam2BatchedPrediction``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam2_shared.errors import InvalidInputError

LOW_RES_SIZE = 256  # side of the decoder's low-resolution logits

# Per argument: (fewest dims of one image's value, most dims of one image's value).
_IMAGE_VALUE_NDIM = {
    "point_coordinates": (2, 3),
    "point_labels": (1, 2),
    "boxes": (1, 2),
    "mask_input": (2, 4),
}


@dataclass
class Prompt:
    """One prompt for one image, in original-image pixels.

    Attributes:
        point_coords: [N, 2] float (x, y) pixels, or None.
        point_labels: [N] int, 1 positive / 0 negative, or None.
        box: [4] float ``[x_min, y_min, x_max, y_max]`` pixels, or None.
        mask_input: [256, 256] float32 low-res logits of an earlier prediction, or None.
        multimask_output: return the 3 multimask candidates (True) or one mask.
    """

    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    multimask_output: bool = True


@dataclass(frozen=True, eq=False)
class Sam2BatchedPrediction:
    """Decoder output for the P prompts of one image, always batched.

    The library's internals use it with numpy arrays; ``Sam2Prediction.batched`` holds the
    same with the caller's array type (torch tensors in process).

    Attributes:
        masks: [P, C, H, W] bool masks at the original size (C = 3 multimask, else 1).
        scores: [P, C] float32 predicted IoU.
        logits: [P, C, 256, 256] float32 low-res logits clamped to [-32, 32]; feed one
            candidate back as ``mask_input`` to refine. [P, C, 0, 0] when not fetched.
        object_score_logits: [P] float32 object-presence logit (>0: object present).
    """

    masks: Any
    scores: Any
    logits: Any
    object_score_logits: Any

    @property
    def num_prompts(self) -> int:
        return int(self.masks.shape[0])

    @property
    def best_indices(self) -> Any:
        """[P] index of the highest-scoring candidate per prompt (numpy or tensor, like
        ``scores``)."""
        return self.scores.argmax(1)

    @classmethod
    def concatenate(cls, rows: Sequence[Sam2BatchedPrediction]) -> Sam2BatchedPrediction:
        """Stack per-prompt numpy predictions of one image along P (equal C and H, W)."""
        if not rows:
            raise InvalidInputError("no predictions to stack")
        shapes = {(r.masks.shape[1:], r.logits.shape[1:]) for r in rows}
        if len(shapes) != 1:
            raise InvalidInputError(
                "prompts have different candidate counts or mask sizes; cannot stack them"
            )
        return cls(
            masks=np.concatenate([r.masks for r in rows]),
            scores=np.concatenate([r.scores for r in rows]),
            logits=np.concatenate([r.logits for r in rows]),
            object_score_logits=np.concatenate([r.object_score_logits for r in rows]),
        )

    def converted(self, convert: Callable[[np.ndarray], Any]) -> Sam2BatchedPrediction:
        """The same values with each array passed through ``convert`` (e.g. to a tensor)."""
        return Sam2BatchedPrediction(
            masks=convert(self.masks),
            scores=convert(self.scores),
            logits=convert(self.logits),
            object_score_logits=convert(self.object_score_logits),
        )


@dataclass(frozen=True, eq=False)
class Sam2Prediction:
    """``segment_images`` result for one image, in the shapes users of the SAM 2 API expect.

    With one prompt on the image: ``masks`` (C, H, W) bool, ``scores`` (C,), ``logits``
    (C, 256, 256), ``object_score_logits`` () — so ``masks[scores.argmax()]`` is the best
    mask. With B > 1 prompts each gets a leading B axis. C = 3 with ``multimask_output``,
    else 1. ``batched`` always has the leading prompt axis ([P, C, ...]).

    Types: bool / float32 ``torch.Tensor``s from ``Sam2Model`` (on its device) and from
    ``Sam2Client`` when torch is installed (on the CPU); numpy arrays from a client without
    torch (or ``array_type="numpy"``).
    """

    masks: Any
    scores: Any
    logits: Any
    object_score_logits: Any
    batched: Sam2BatchedPrediction = field(repr=False)

    @classmethod
    def from_batched(cls, batched: Sam2BatchedPrediction) -> Sam2Prediction:
        """User shapes from [P, C, ...] arrays: the prompt axis is dropped when P == 1."""
        one = batched.num_prompts == 1

        def user(array: Any) -> Any:
            return array[0, ...] if one else array  # [0, ...]: a 0-d array, not a scalar

        return cls(
            masks=user(batched.masks),
            scores=user(batched.scores),
            logits=user(batched.logits),
            object_score_logits=user(batched.object_score_logits),
            batched=batched,
        )


# ---------------------------------------------------------------------- argument rules


def as_numpy(value: Any, name: str) -> np.ndarray:
    """Array, tensor (any device) or nested list of numbers -> float32 numpy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without torch
        value = value.detach().cpu().float().numpy()
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{name} must be a numeric array, tensor or nested list of numbers "
            f"(got a {type(value).__name__} that is not one)"
        ) from None


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "cpu"))


def _is_per_image_list(name: str, value: Any, n_images: int) -> bool:
    """Whether a list/tuple ``value`` lists one entry per image (else it is one prompt)."""
    if any(entry is None or _is_array(entry) for entry in value):
        return True  # arrays, tensors or None inside a list: entries per image
    lowest, highest = _IMAGE_VALUE_NDIM[name]
    try:
        whole = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return True  # ragged: only meaningful as per-image entries
    if whole.ndim > highest:
        return True
    # Entries of at least one image's rank: per image when there are several images (a wrong
    # count is then an error, never silently a shared prompt); for one image, a list of one
    # entry reads the same either way, and anything longer is that image's prompt.
    entries_fit = whole.ndim - 1 >= lowest
    return entries_fit and (n_images > 1 or len(value) == 1)


def split_per_image(name: str, value: Any, n_images: int) -> list[Any]:
    """One ``value`` per image, by the rules of the module docstring."""
    if value is None:
        return [None] * n_images
    if not isinstance(value, (list, tuple)) or not _is_per_image_list(name, value, n_images):
        return [value] * n_images
    if len(value) == 1:
        return [value[0]] * n_images
    if len(value) == n_images:
        return list(value)
    allowed = "1" if n_images == 1 else f"1 or {n_images}"
    raise InvalidInputError(
        f"{name} is a list of {len(value)} per-image entries for {n_images} image(s); give a "
        f"bare array (the same prompt for every image) or a list of length {allowed}",
        argument=name,
    )


def prompts_per_image(
    n_images: int,
    point_coordinates: Any,
    point_labels: Any,
    boxes: Any,
    mask_input: Any,
    multimask_output: bool,
) -> list[list[Prompt]]:
    """The ``segment_images`` prompt arguments split into each image's ``Prompt`` list."""
    values = {
        "point_coordinates": point_coordinates,
        "point_labels": point_labels,
        "boxes": boxes,
        "mask_input": mask_input,
    }
    per_image = {name: split_per_image(name, value, n_images) for name, value in values.items()}
    return [
        prompts_from_arrays(
            per_image["point_coordinates"][i],
            per_image["point_labels"][i],
            per_image["boxes"][i],
            per_image["mask_input"][i],
            multimask_output,
        )
        for i in range(n_images)
    ]


def _mask_inputs(value: Any) -> np.ndarray:
    """One image's ``mask_input`` -> [B, 1, 256, 256] (a B axis given explicitly) or
    [M, 256, 256] (M masks whose prompt count the other arguments decide)."""
    masks = as_numpy(value, "mask_input")
    square = (LOW_RES_SIZE, LOW_RES_SIZE)
    if masks.ndim == 4 and masks.shape[1] != 1 and masks.shape[2:] == square:
        raise InvalidInputError(
            f"mask_input has shape {masks.shape}: {masks.shape[1]} candidates per prompt; pass "
            "one candidate's logits per prompt, e.g. logits[scores.argmax()]",
            argument="mask_input",
        )
    if masks.shape[-2:] != square or masks.ndim not in (2, 3, 4):
        raise InvalidInputError(
            f"mask_input must be [256, 256], [1, 256, 256], [B, 256, 256] or "
            f"[B, 1, 256, 256] low-res logits, got {masks.shape}",
            argument="mask_input",
        )
    return masks if masks.ndim == 4 else masks.reshape(-1, *square)


def _labels(value: Any) -> np.ndarray:
    labels = as_numpy(value, "point_labels")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise InvalidInputError(
            "point_labels must be 1 (foreground) or 0 (background), got "
            f"{np.unique(labels)[:8].tolist()}",
            argument="point_labels",
        )
    return labels.astype(np.int32)


def prompts_from_arrays(
    point_coordinates: Any, point_labels: Any, boxes: Any, mask_input: Any, multimask_output: bool
) -> list[Prompt]:
    """Split the array-style prompts of one image into B ``Prompt``s."""
    coords = None if point_coordinates is None else as_numpy(point_coordinates,
                                                             "point_coordinates")
    labels = None if point_labels is None else _labels(point_labels)
    box_array = None if boxes is None else as_numpy(boxes, "boxes")
    masks = None if mask_input is None else _mask_inputs(mask_input)
    if coords is not None and (coords.ndim not in (2, 3) or coords.shape[-1] != 2):
        raise InvalidInputError(
            f"point_coordinates must be [N, 2] or [B, N, 2], got {coords.shape}",
            argument="point_coordinates",
        )
    if coords is not None and labels is None:
        raise InvalidInputError("point_labels are required with point_coordinates",
                                argument="point_labels")
    if labels is not None and labels.ndim not in (1, 2):
        raise InvalidInputError(f"point_labels must be [N] or [B, N], got {labels.shape}",
                                argument="point_labels")
    if labels is not None and coords is None and labels.size:
        raise InvalidInputError("point_labels given without point_coordinates",
                                argument="point_labels")
    if coords is not None and labels is not None and coords.shape[:-1] != labels.shape:
        raise InvalidInputError(
            f"point_labels {labels.shape} must match point_coordinates {coords.shape}: one "
            "label per point ([N] with [N, 2], [B, N] with [B, N, 2])",
            argument="point_labels",
        )
    if coords is not None and labels is not None and coords.ndim == 2:
        coords, labels = coords[None], labels[None]
    if box_array is not None and box_array.ndim == 3 and box_array.shape[1] == 1:
        box_array = box_array[:, 0]  # [B, 1, 4], as Meta's predictor accepts
    if box_array is not None and (box_array.shape[-1:] != (4,) or box_array.ndim not in (1, 2)):
        raise InvalidInputError(f"boxes must be [4] or [B, 4], got {box_array.shape}",
                                argument="boxes")
    if box_array is not None and box_array.ndim == 1:
        box_array = box_array[None]
    sizes = {
        name: len(value)
        for name, value in (("point_coordinates", coords), ("boxes", box_array))
        if value is not None
    }
    others = max(sizes.values(), default=0)
    if masks is not None:
        prompt_axis = masks.ndim == 4
        masks = masks.reshape(-1, LOW_RES_SIZE, LOW_RES_SIZE)
        if len(masks) > 1 and not others and not prompt_axis:
            raise InvalidInputError(
                f"mask_input has {len(masks)} masks and no points or boxes: if these are the "
                "candidates of one earlier prompt, pass one, e.g. logits[scores.argmax()]; for "
                f"{len(masks)} mask-only prompts pass shape ({len(masks)}, 1, 256, 256)",
                argument="mask_input",
            )
        if len(masks) > 1 and others and len(masks) != others:
            what = "one prompt" if others == 1 else f"{others} prompts"
            raise InvalidInputError(
                f"mask_input has {len(masks)} masks for {what}; pass one candidate's logits "
                "per prompt, e.g. logits[scores.argmax()]",
                argument="mask_input",
            )
        sizes["mask_input"] = len(masks)
    count = max(sizes.values(), default=0)
    if count == 0:
        raise InvalidInputError("empty prompt: give points, boxes or a mask_input")
    for name, size in sizes.items():
        if size not in (1, count):
            raise InvalidInputError(
                f"{name} has {size} prompts but another argument has {count}", argument=name
            )

    def pick(value: np.ndarray | None, i: int) -> np.ndarray | None:
        return None if value is None else value[i if len(value) > 1 else 0]

    return [
        Prompt(
            point_coords=pick(coords, i),
            point_labels=pick(labels, i),
            box=pick(box_array, i),
            mask_input=pick(masks, i),
            multimask_output=multimask_output,
        )
        for i in range(count)
    ]
