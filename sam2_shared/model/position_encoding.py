"""Positional encodings: sine (FPN levels, memories) and random Fourier (prompts)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine/cosine encoding of a [B, C, H, W] map, C = ``num_pos_feats``.

    Rows and columns are numbered from 1, divided by (size + 1e-6) and scaled by 2*pi.
    The first C/2 channels encode y, the next C/2 encode x; within each, sin and cos
    alternate (sin at even channel, cos at odd). Results are cached per (H, W).
    """

    def __init__(self, num_pos_feats: int, temperature: float = 10000.0) -> None:
        """
        Arguments:
          num_pos_feats (int): channels C of the encoding; must be even (C/2 encode y,
            C/2 encode x).
          temperature (float): base of the geometric progression of wavelengths.
        """
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError("num_pos_feats must be even")
        self.half = num_pos_feats // 2
        self.temperature = temperature
        self._cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def _encode_axis(self, positions: torch.Tensor) -> torch.Tensor:
        """[L] normalised positions -> [L, half] interleaved sin/cos."""
        index = torch.arange(self.half, dtype=torch.float32, device=positions.device)
        dim_t = self.temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / self.half)
        phase = positions[:, None] / dim_t
        return torch.stack((phase[:, 0::2].sin(), phase[:, 1::2].cos()), dim=2).flatten(1)

    def encoding(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[1, C, H, W] float32 encoding."""
        key = (height, width, device)
        if key not in self._cache:
            eps, scale = 1e-6, 2 * math.pi
            rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
            cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
            enc_y = self._encode_axis(rows / (height + eps) * scale)  # [H, half]
            enc_x = self._encode_axis(cols / (width + eps) * scale)  # [W, half]
            pos = torch.cat(
                (
                    enc_y[:, None, :].expand(height, width, self.half),
                    enc_x[None, :, :].expand(height, width, self.half),
                ),
                dim=2,
            )
            self._cache[key] = pos.permute(2, 0, 1).unsqueeze(0).contiguous()
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, *, H, W] -> [B, C, H, W] in x's dtype."""
        pos = self.encoding(x.shape[-2], x.shape[-1], x.device)
        return pos.expand(x.shape[0], -1, -1, -1).to(x.dtype)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of (x, y) in [0, 1]: ``[sin(2*pi*v), cos(2*pi*v)]``.

    ``v = (2c - 1) @ G`` with G the checkpoint buffer
    ``positional_encoding_gaussian_matrix`` [2, num_pos_feats].
    """

    def __init__(self, num_pos_feats: int = 128) -> None:
        """
        Arguments:
          num_pos_feats (int): number of random frequencies (columns of the Gaussian
            matrix); the encoding has 2 * num_pos_feats channels.
        """
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """[..., 2] in [0, 1] -> [..., 2 * num_pos_feats]."""
        # Always float32: in half precision the phase of high frequencies is quantised.
        coords = 2 * coords.float() - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.float()
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def dense(self, height: int, width: int) -> torch.Tensor:
        """[1, C, H, W] encoding of the cell centres of an H x W grid."""
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
        grid = torch.stack(
            (xs[None, :].expand(height, width), ys[:, None].expand(height, width)), dim=-1
        )
        return self._encode(grid).permute(2, 0, 1).unsqueeze(0)

    def forward_with_coords(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """[B, N, 2] (x, y) pixel coordinates in the square input frame -> [B, N, C]."""
        return self._encode(coords.to(torch.float32) / image_size)
