"""Memory encoder: a frame's raw features fused with its predicted mask -> a 64-ch memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.common import LayerNorm2d
from sam2_shared.model.position_encoding import PositionEmbeddingSine


class MaskDownSampler(nn.Module):
    """[B, 1, 1024, 1024] mask -> [B, 256, 64, 64].

    Four (Conv k3 s2 p1 -> LayerNorm2d -> GELU) steps, channels 1 -> 4 -> 16 -> 64 -> 256,
    then a 1x1 conv; weights in ``encoder.{0,3,6,9,12}`` as in Meta's checkpoints.
    """

    def __init__(self, embed_dim: int = 256, num_steps: int = 4) -> None:
        """
        Arguments:
          embed_dim (int): channels of the output map (set by the final 1x1 conv).
          num_steps (int): number of stride-2 conv steps; each multiplies the channels by
            4 and halves H and W (total downsampling 2 ** num_steps).
        """
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for _ in range(num_steps):
            out_channels = channels * 4
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1),
                LayerNorm2d(out_channels),
                nn.GELU(),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, embed_dim, kernel_size=1))
        self.encoder = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.encoder(masks)


class CXBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 -> LayerNorm2d -> Linear x4 -> GELU -> Linear -> x gamma,
    plus the residual."""

    def __init__(self, dim: int = 256, kernel_size: int = 7, padding: int = 3) -> None:
        """
        Arguments:
          dim (int): channels of the input and output map (the pointwise MLP is 4 * dim
            wide).
          kernel_size (int): kernel size of the depthwise convolution.
          padding (int): zero padding of the depthwise convolution (kernel_size // 2
            keeps H and W).
        """
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=kernel_size, padding=padding, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class Fuser(nn.Module):
    def __init__(self, dim: int = 256, num_layers: int = 2) -> None:
        """
        Arguments:
          dim (int): channels of the input and output feature map.
          num_layers (int): number of CXBlock layers applied in sequence.
        """
        super().__init__()
        self.layers = nn.ModuleList(CXBlock(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MemoryEncoder(nn.Module):
    """``out_proj(fuser(pix_feat_proj(pix_feat) + mask_downsampler(mask)))`` and its sine PE."""

    def __init__(self, in_dim: int = 256, out_dim: int = 64) -> None:
        """
        Arguments:
          in_dim (int): channels of the raw frame features (and of the downsampled mask
            and the fuser).
          out_dim (int): channels of the memory features and of their sine positional
            encoding.
        """
        super().__init__()
        self.mask_downsampler = MaskDownSampler(in_dim)
        self.pix_feat_proj = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.fuser = Fuser(in_dim)
        self.out_proj = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.position_encoding = PositionEmbeddingSine(out_dim)

    def forward(self, pix_feat: torch.Tensor, mask_for_mem: torch.Tensor) -> torch.Tensor:
        """pix_feat [B, 256, 64, 64] raw features, mask_for_mem [B, 1, 1024, 1024] (already
        scaled: sigmoid or binary, x20 - 10) -> memory features [B, 64, 64, 64]."""
        x = self.pix_feat_proj(pix_feat) + self.mask_downsampler(mask_for_mem)
        return self.out_proj(self.fuser(x))

    def memory_pos_enc(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[1, 64, H, W] float32 sine encoding of a memory map (the same for every frame)."""
        return self.position_encoding.encoding(height, width, device)
