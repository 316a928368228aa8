"""Deterministic synthetic test images with structure (gradients, shapes, texture).

Shapes sit at fixed fractions of the width and height, so prompts written as fractions
(``SHAPE_CENTRES``, ``SHAPE_BOXES``) land on the same object at any size or aspect ratio.
"""

from __future__ import annotations

import numpy as np

# Fractional (x, y) centres and (x0, y0, x1, y1) boxes of the drawn objects.
SHAPE_CENTRES: dict[str, tuple[float, float]] = {
    "ellipse": (0.30, 0.55),
    "rectangle": (0.72, 0.27),
    "triangle": (0.75, 0.80),
    "background": (0.06, 0.08),
}
SHAPE_BOXES: dict[str, tuple[float, float, float, float]] = {
    "ellipse": (0.12, 0.33, 0.48, 0.77),
    "rectangle": (0.60, 0.15, 0.85, 0.40),
    "triangle": (0.62, 0.65, 0.90, 0.92),
}


def synthetic_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB: a two-axis colour gradient with stripes, three flat shapes, mild noise."""
    y = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
    x = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
    image = np.empty((height, width, 3), dtype=np.float32)
    image[..., 0] = 40 + 150 * x
    image[..., 1] = 60 + 120 * y
    image[..., 2] = 110 + 40 * np.sin(2 * np.pi * (3 * x + 2 * y))

    cx, cy = SHAPE_CENTRES["ellipse"]
    ellipse = ((x - cx) / 0.18) ** 2 + ((y - cy) / 0.22) ** 2 <= 1.0
    image[ellipse] = (225, 45, 40)
    x0, y0, x1, y1 = SHAPE_BOXES["rectangle"]
    rectangle = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    image[rectangle] = (30, 190, 70)
    tx0, ty0, tx1, ty1 = SHAPE_BOXES["triangle"]
    # Right triangle with the right angle at the bottom-left corner of its box.
    triangle = (x >= tx0) & (y <= ty1) & ((x - tx0) / (tx1 - tx0) <= (y - ty0) / (ty1 - ty0))
    image[triangle] = (250, 230, 60)

    rng = np.random.default_rng(seed)
    image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """HxW uint8 luma (ITU-R 601, rounded), a typical single-channel input."""
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def with_alpha(rgb: np.ndarray) -> np.ndarray:
    """HxWx4 RGBA with a non-trivial alpha ramp; the colour channels are ``rgb`` unchanged.

    The service treats alpha as not part of the picture (like PIL's ``convert("RGB")``),
    so the equivalent RGB image is ``rgba[..., :3]``.
    """
    height, width = rgb.shape[:2]
    alpha = np.linspace(64, 255, num=width, dtype=np.float32)[None, :].repeat(height, axis=0)
    return np.concatenate([rgb, np.rint(alpha).astype(np.uint8)[:, :, None]], axis=2)


def pixel_point(fraction: tuple[float, float], height: int, width: int) -> list[float]:
    """Fractional (x, y) -> (x, y) in pixels of an HxW image."""
    return [fraction[0] * width, fraction[1] * height]


def pixel_box(fraction: tuple[float, float, float, float], height: int, width: int) -> list[float]:
    x0, y0, x1, y1 = fraction
    return [x0 * width, y0 * height, x1 * width, y1 * height]
