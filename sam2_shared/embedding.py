"""The cached result of the image encoder and its content-addressed id.

No torch import at run time: the client computes content ids where torch is not installed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Bump when anything that changes the embedding of given pixels changes
# (resize, normalisation, network wiring). It is part of every embedding id.
PREPROCESS_VERSION = "sam2-image-v1"


@dataclass
class ImageEmbedding:
    """Everything the prompt decoder needs for one image.

    Attributes:
        image_embed: [1, 256, 64, 64] stride-16 features with ``no_mem_embed`` added.
        high_res_feats: ([1, 32, 256, 256], [1, 64, 128, 128]) features after the
            mask decoder's ``conv_s0`` / ``conv_s1`` projections.
        original_hw: (H, W) of the original image in pixels.
        model_id: official model id, e.g. ``"sam2.1/hiera_tiny"``.
        embedding_id: content-addressed id (see ``content_id``).
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, torch.Tensor]
    original_hw: tuple[int, int]
    model_id: str
    embedding_id: str

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageEmbedding:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)

        return ImageEmbedding(
            image_embed=move(self.image_embed),
            high_res_feats=(move(self.high_res_feats[0]), move(self.high_res_feats[1])),
            original_hw=self.original_hw,
            model_id=self.model_id,
            embedding_id=self.embedding_id,
        )

    @property
    def nbytes(self) -> int:
        tensors = (self.image_embed, *self.high_res_feats)
        return sum(t.numel() * t.element_size() for t in tensors)


def content_id(
    rgb: np.ndarray, model_id: str, namespace: str = "", preprocess_version: str | None = None
) -> str:
    """Content-addressed embedding id of decoded RGB pixels for one model.

    Hashes the decoded, EXIF-oriented HxWx3 uint8 RGB pixels (so the same picture
    in PNG or lossless WebP gets the same id), their shape, the model id and
    ``PREPROCESS_VERSION`` (or ``preprocess_version``: video frames pass theirs, so a
    frame's id differs from the same picture's image id). ``namespace`` separates tenants.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"content_id expects HxWx3 uint8 RGB pixels, got {rgb.dtype} {rgb.shape}")
    digest = hashlib.sha256()
    version = PREPROCESS_VERSION if preprocess_version is None else preprocess_version
    for part in (namespace, model_id, version, f"{rgb.shape[0]}x{rgb.shape[1]}"):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()
