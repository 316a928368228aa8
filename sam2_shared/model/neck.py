"""FPN neck and the image encoder (trunk + neck)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.hiera import Hiera
from sam2_shared.model.position_encoding import PositionEmbeddingSine


class _Lateral(nn.Module):
    """1x1 conv to ``d_model``; a wrapper so the key is ``convs.{k}.conv.*``."""

    def __init__(self, in_channels: int, d_model: int) -> None:
        """
        Arguments:
          in_channels (int): channels of the trunk level.
          d_model (int): output channels.
        """
        super().__init__()
        self.conv = nn.Conv2d(in_channels, d_model, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Feature pyramid without output convs.

    ``convs.k`` is the lateral of trunk level ``3 - k`` (``convs.0`` takes the
    stride-32 level). Levels in ``top_down_levels`` add the nearest-x2 upsampled
    previous (coarser) level, computed in float32.
    """

    def __init__(
        self, backbone_channel_list: list[int], d_model: int, top_down_levels: tuple[int, ...]
    ) -> None:
        """
        Arguments:
          backbone_channel_list (list[int]): channels of the trunk levels, lowest
            resolution (stride 32) first; one lateral 1x1 conv each.
          d_model (int): channels of every FPN output level.
          top_down_levels (tuple[int, ...]): trunk levels (0 = highest resolution) that
            add the upsampled coarser level; the others keep only their lateral.
        """
        super().__init__()
        self.convs = nn.ModuleList(_Lateral(c, d_model) for c in backbone_channel_list)
        self.top_down_levels = set(top_down_levels)
        self.position_encoding = PositionEmbeddingSine(d_model)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Trunk levels (highest resolution first) -> FPN levels [B, d_model, *, *]."""
        n = len(xs) - 1
        out: list[torch.Tensor] = [xs[0]] * len(xs)
        previous = None
        for level in range(n, -1, -1):
            lateral = self.convs[n - level](xs[level])
            if level in self.top_down_levels and previous is not None:
                top_down = F.interpolate(
                    previous.to(torch.float32), scale_factor=2.0, mode="nearest"
                )
                previous = lateral + top_down
            else:
                previous = lateral
            out[level] = previous
        return out


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck; the stride-32 level is dropped (``scalp = 1``).

    [B, 3, 1024, 1024] -> [[B, 256, 256, 256], [B, 256, 128, 128], [B, 256, 64, 64]].
    """

    def __init__(self, trunk: Hiera, neck: FpnNeck, scalp: int = 1) -> None:
        """
        Arguments:
          trunk (Hiera): backbone returning the multi-scale features, highest resolution
            first.
          neck (FpnNeck): feature pyramid applied to the trunk's features.
          scalp (int): number of lowest-resolution FPN levels dropped from the output.
        """
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.scalp = scalp

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.neck(self.trunk(images))
        return features[: len(features) - self.scalp]
