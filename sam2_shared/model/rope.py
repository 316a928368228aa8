"""Axial rotary position encoding (RoPE) of the memory attention.

Tokens of a row-major H x W grid (token t at x = t mod W, y = t div W) are rotated in
the complex plane: channels are read as D/2 complex numbers from adjacent pairs
(2j, 2j + 1); the first D/4 of them turn by ``x * f_j``, the last D/4 by ``y * f_j``,
with ``f_j = theta ** (-4j / D)``. Rotations are computed and applied in float32.
"""

from __future__ import annotations

import torch


def axial_rotations(
    head_dim: int, width: int, height: int, theta: float = 10000.0
) -> torch.Tensor:
    """[H * W, head_dim / 2] complex64 unit rotations of a row-major W x H grid."""
    if head_dim % 4:
        raise ValueError("head_dim must be a multiple of 4 for axial RoPE")
    quarter = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[:quarter].float() / head_dim))
    tokens = torch.arange(width * height, dtype=torch.float32)
    xs = tokens % width
    ys = torch.div(tokens, width, rounding_mode="floor")
    angles = torch.cat((torch.outer(xs, freqs), torch.outer(ys, freqs)), dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate [B, heads, N, D] by ``rotations`` [n, D/2], tiled when N is a multiple of n.

    The tiling is what cross-attention to several memory frames needs: every frame's
    tokens get the same positions as the current frame's grid.
    """
    if x.shape[-2] == 0:
        return x
    tokens = x.shape[-2]
    repeats, rest = divmod(tokens, rotations.shape[0])
    if rest or repeats == 0:
        raise ValueError(
            f"{tokens} tokens are not a whole number of {rotations.shape[0]}-token grids"
        )
    if repeats > 1:
        rotations = rotations.repeat(repeats, 1)
    as_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(as_complex * rotations.to(as_complex.device)).flatten(-2)
    return rotated.to(x.dtype)
