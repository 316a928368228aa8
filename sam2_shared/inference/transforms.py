"""SAM 2's tensor transforms: images into the 1024 model frame, low-res logits back out.

- ``preprocess_images``: RGB uint8 -> [B, 3, 1024, 1024] float32, exactly as Meta's
  ``SAM2ImagePredictor`` (ToTensor, Resize((1024, 1024)) with antialias, Normalize).
- ``preprocess_video_frames``: the same for Meta's video predictor (PIL bicubic).
- ``postprocess_masks``: [P, C, 256, 256] low-res logits -> [P, C, H, W] float32 logits
  (the exact reference path; serving uses ``imaging.masks_from_low_res``).

Torch lives here, not in ``imaging``, so that decoding images (which the client does to
compute content ids) never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam2_shared.errors import InvalidInputError
from sam2_shared.inference.imaging import IMAGE_SIZE, PIXEL_MEAN, PIXEL_STD


def preprocess_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Meta's image-predictor preprocessing, on CPU in float32.

    Per image: uint8 HxWx3 RGB -> CHW float32 / 255 -> bilinear resize (align_corners=False,
    antialias=True; what torchvision's ``Resize((1024, 1024))`` does on a float tensor) ->
    ``(x - PIXEL_MEAN) / PIXEL_STD``. Images may differ in size; each is resized on its own.

    Returns:
        [B, 3, 1024, 1024] float32 CPU tensor.
    """
    def resize(rgb: np.ndarray) -> torch.Tensor:
        # Same order of operations as ToTensor (permute, to float, div 255).
        chw = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255)
        return F.interpolate(
            chw[None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
            align_corners=False, antialias=True,
        )[0]

    return _normalised_batch(images, "image", resize)


def postprocess_masks(low_res_logits: torch.Tensor, original_hw: tuple[int, int]) -> torch.Tensor:
    """[P, C, 256, 256] low-res logits -> [P, C, H, W] float32 logits at the original size.

    Bilinear, align_corners=False, no antialias, straight from 256 to (H, W), as Meta's
    ``SAM2Transforms.postprocess_masks``. The caller thresholds with ``> 0.0`` (strict).
    """
    if low_res_logits.ndim != 4:
        raise InvalidInputError(
            f"low-res logits must be [P, C, 256, 256], got {tuple(low_res_logits.shape)}"
        )
    height, width = original_hw
    return F.interpolate(
        low_res_logits.float(), size=(int(height), int(width)), mode="bilinear",
        align_corners=False,
    )


def preprocess_video_frames(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """Meta's video-predictor preprocessing (``load_video_frames``), on CPU in float32.

    Differs from ``preprocess_images``: per frame, uint8 HxWx3 RGB -> PIL ``resize((1024,
    1024))`` with PIL's default BICUBIC filter on the uint8 pixels -> / 255 in float64 ->
    float32 -> ``(x - PIXEL_MEAN) / PIXEL_STD``. The same picture therefore gets slightly
    different features as a video frame than as an image.

    Returns:
        [T, 3, 1024, 1024] float32 CPU tensor.
    """
    def resize(rgb: np.ndarray) -> torch.Tensor:
        resized = np.asarray(
            Image.fromarray(np.ascontiguousarray(rgb)).resize((IMAGE_SIZE, IMAGE_SIZE))
        )
        return torch.from_numpy(resized / 255.0).permute(2, 0, 1).float()  # float64 -> float32

    return _normalised_batch(frames, "frame", resize)


def _normalised_batch(
    images: Sequence[np.ndarray], what: str, resize: Callable[[np.ndarray], torch.Tensor]
) -> torch.Tensor:
    """[B, 3, 1024, 1024]: each HxWx3 uint8 RGB image resized to the model frame by
    ``resize`` ([3, 1024, 1024] float32 in [0, 1]), then ``(x - PIXEL_MEAN) / PIXEL_STD``."""
    if len(images) == 0:
        raise InvalidInputError(f"at least one {what} is needed")
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(3, 1, 1)
    batch = torch.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
    for index, rgb in enumerate(images):
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
                or rgb.shape[2] != 3 or rgb.size == 0:
            got = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise InvalidInputError(f"{what} {index}: expected HxWx3 uint8 RGB, got {got}")
        batch[index] = (resize(rgb) - mean) / std
    return batch
