"""Prompt and prediction values of the in-process API (plain numpy, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOW_RES_SIZE = 256  # side of the decoder's low-resolution logits


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


@dataclass
class Sam2Prediction:
    """Decoder output for the P prompts of one image.

    Attributes:
        masks: [P, C, H, W] bool masks at the original size (C = 3 multimask, else 1).
        scores: [P, C] float32 predicted IoU in [0, 1].
        logits: [P, C, 256, 256] float32 low-res logits clamped to [-32, 32]; feed one
            back as ``mask_input`` to refine.
        object_score_logits: [P] float32 object-presence logit (>0: object present).
    """

    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray
    object_score_logits: np.ndarray

    @property
    def best_indices(self) -> np.ndarray:
        """[P] index of the highest-scoring candidate per prompt."""
        return self.scores.argmax(axis=1)
