"""Test images, per-model coverage and the (ours, reference) model pair of the parity tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.reference import ReferenceImage
from tests.helpers.synthetic_images import gray_to_rgb, synthetic_rgb, to_gray, with_alpha


@dataclass(frozen=True)
class ParityImage:
    """An input as given to our API and the equivalent RGB the reference gets."""

    name: str
    ours_input: np.ndarray
    rgb: np.ndarray


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return synthetic_rgb(height, width, seed=seed)


def _build_images() -> dict[str, ParityImage]:
    images: dict[str, ParityImage] = {}
    for name, (height, width, seed) in {
        "square_512": (512, 512, 1),
        "rgb_600x800": (600, 800, 2),
        "hd_1080x1920": (1080, 1920, 3),
        "small_17x23": (17, 23, 4),
        "strip_64x2048": (64, 2048, 5),
        "portrait_900x300": (900, 300, 6),
    }.items():
        rgb = _rgb(height, width, seed)
        images[name] = ParityImage(name, rgb, rgb)
    gray = to_gray(_rgb(600, 800, 7))
    images["gray_600x800"] = ParityImage("gray_600x800", gray, gray_to_rgb(gray))
    rgb = _rgb(600, 800, 8)
    images["rgba_600x800"] = ParityImage("rgba_600x800", with_alpha(rgb), rgb)
    return images


TEST_IMAGES: dict[str, ParityImage] = _build_images()

# Which images each model is checked on: tiny gets every shape and colour format, the
# others one or two (the encoder is the expensive part on CPU).
IMAGES_FOR_MODEL: dict[str, tuple[str, ...]] = {
    "sam2.1/hiera_tiny": tuple(TEST_IMAGES),
    "sam2.1/hiera_small": ("rgb_600x800", "strip_64x2048"),
    "sam2.1/hiera_b_plus": ("rgb_600x800", "square_512"),
    "sam2.1/hiera_large": ("rgb_600x800",),
    "sam2/hiera_tiny": ("rgb_600x800", "hd_1080x1920"),
    "sam2/hiera_small": ("rgb_600x800",),
    "sam2/hiera_b_plus": ("rgb_600x800",),
    "sam2/hiera_large": ("rgb_600x800",),
}
SLOW_MODELS = frozenset({"sam2.1/hiera_large", "sam2/hiera_large"})
ENCODE_BATCH = 2  # images per embed_images call, so the batched path is exercised too


@dataclass
class ParityPair:
    model_id: str
    checkpoint: Path
    ours: Any  # sam2_shared.Sam2Model
    reference: ReferenceImage
    _ours_embeddings: dict[str, Any] = field(default_factory=dict)

    def encoded(self, image_name: str) -> tuple[Any, dict[str, Any]]:
        """(our ImageEmbedding, reference features) of one test image, each computed once."""
        if image_name not in self._ours_embeddings:
            # Encode this model's images that are still missing in batches of ENCODE_BATCH.
            pending = [n for n in IMAGES_FOR_MODEL[self.model_id] if n not in self._ours_embeddings]
            if image_name not in pending:
                pending.insert(0, image_name)
            for start in range(0, len(pending), ENCODE_BATCH):
                names = pending[start : start + ENCODE_BATCH]
                embeddings = self.ours.embed_images(
                    [TEST_IMAGES[n].ours_input for n in names], input_color_format="rgb"
                )
                assert len(embeddings) == len(names), "embed_images must return one per image"
                self._ours_embeddings.update(zip(names, embeddings, strict=True))
        return self._ours_embeddings[image_name], self.reference.features(
            TEST_IMAGES[image_name].rgb
        )


def model_params(model_ids: list[str] | tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(m, id=m, marks=[pytest.mark.slow] if m in SLOW_MODELS else [])
        for m in model_ids
    ]


class PairCache:
    """Holds the pair of the model id in use; asking for another model id replaces it."""

    def __init__(self, random_checkpoint: Callable[..., Path]) -> None:
        self._random_checkpoint = random_checkpoint
        self._pair: ParityPair | None = None

    def __call__(self, model_id: str) -> ParityPair:
        if self._pair is None or self._pair.model_id != model_id:
            self._pair = None  # release the previous models before building the next ones
            checkpoint = self._random_checkpoint(model_id)
            from sam2_shared import Sam2Model

            torch.manual_seed(0)  # nothing should be random at inference; keep slips reproducible
            ours = Sam2Model.from_pretrained(model_id, checkpoint=str(checkpoint), device="cpu")
            reference = ReferenceImage(model_id, checkpoint)
            self._pair = ParityPair(model_id, checkpoint, ours, reference)
        return self._pair
