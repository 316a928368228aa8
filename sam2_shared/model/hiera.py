"""Hiera trunk: a hierarchical ViT with windowed attention and query pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.common import MLP
from sam2_shared.model.config import HieraConfig


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * nW, window, window, C], zero-padding H, W at bottom/right.

    Padded tokens take part in attention as keys/values (no mask), as in Meta's code.
    Returns the windows and the padded (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition``: [B * nW, window, window, C] -> [B, H, W, C]."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :] if (hp > h or wp > w) else x


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 stride-2 max pool of a channels-last [B, H, W, C] map."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention on a [B, H, W, C] map; optionally pools the queries 2x2.

    ``qkv`` channels are laid out [q | k | v], each split into heads contiguously.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, pool_queries: bool) -> None:
        """
        Arguments:
          dim (int): channels of the input [B, H, W, dim] map.
          dim_out (int): channels of the output and of q, k and v (split evenly over the heads).
          num_heads (int): number of attention heads.
          pool_queries (bool): 2x2 max-pool the queries (stride 2), halving the output H and W.
        """
        super().__init__()
        self.num_heads = num_heads
        self.pool_queries = pool_queries
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, dim] -> [B, H', W', dim_out] (H' = H/2 when pooling queries)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each [B, HW, heads, head_dim]
        if self.pool_queries:
            q = max_pool_2x2(q.reshape(b, h, w, -1))
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block; the first block of a stage pools and widens.

    ``window`` is the partition size (0 = global attention). In a pooling block the
    skip connection is ``maxpool(proj(norm1(x)))`` and the windows shrink by 2.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window: int,
        pool: bool,
        mlp_ratio: float = 4.0,
    ) -> None:
        """
        Arguments:
          dim (int): channels of the input [B, H, W, dim] map.
          dim_out (int): channels of the output map; when it differs from dim, the skip
            connection is projected to dim_out by a Linear layer.
          num_heads (int): number of attention heads.
          window (int): side, in tokens, of the square windows the input is partitioned
            into for attention (0 = global attention).
          pool (bool): 2x2 max-pool the queries and the projected skip connection, halving
            the output H and W (the output is unpartitioned with windows of window // 2).
          mlp_ratio (float): hidden width of the MLP as a multiple of dim_out.
        """
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.window = window
        self.pool = pool
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, pool_queries=pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, 2, activation=nn.GELU)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, W, dim] -> [B, H', W', dim_out]."""
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = self.proj(x)
            if self.pool:
                shortcut = max_pool_2x2(shortcut)
        if self.window > 0:
            x, padded_hw = window_partition(x, self.window)
        x = self.attn(x)
        if self.window > 0:
            out_window = self.window // 2 if self.pool else self.window
            h, w = shortcut.shape[1:3]
            padded_hw = (h + (-h) % out_window, w + (-w) % out_window)
            x = window_unpartition(x, out_window, padded_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """7x7 stride-4 conv: [B, 3, 1024, 1024] -> channels-last [B, 256, 256, C0]."""

    def __init__(self, embed_dim: int) -> None:
        """
        Arguments:
          embed_dim (int): output channels C0 of the patch embedding (the channels of the
            first stage).
        """
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=7, stride=4, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """Hiera trunk returning the last feature of each of the 4 stages.

    Input [B, 3, 1024, 1024]; outputs (NCHW, highest resolution first):
    [B, C0, 256, 256], [B, 2C0, 128, 128], [B, 4C0, 64, 64], [B, 8C0, 32, 32].
    """

    def __init__(self, config: HieraConfig) -> None:
        """
        Arguments:
          config (HieraConfig): trunk hyper-parameters: embed_dim (C0), num_heads (heads of
            the first stage), stages (blocks per stage), global_att_blocks (blocks with
            global attention), window_spec (window size per stage),
            window_pos_embed_bkg_spatial_size (size of the background positional
            embedding), q_pool (number of stage transitions that pool 2x2), dim_mul and
            head_mul (channel and head multipliers per stage) and mlp_ratio.
        """
        super().__init__()
        self.config = config
        c0 = config.embed_dim
        self.patch_embed = PatchEmbed(c0)
        self.pos_embed = nn.Parameter(torch.zeros(1, c0, *config.window_pos_embed_bkg_spatial_size))
        window0 = config.window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, c0, window0, window0))

        stage_ends = config.stage_ends
        pool_blocks = [end + 1 for end in stage_ends[:-1]][: config.q_pool]
        self.stage_ends = stage_ends
        dim, heads, stage = c0, config.num_heads, 0
        blocks = []
        for i in range(config.depth):
            # A stage's first block still partitions with the previous stage's window.
            window = 0 if i in config.global_att_blocks else config.window_spec[stage]
            dim_out = dim
            if i - 1 in stage_ends:
                dim_out = int(dim * config.dim_mul)
                heads = int(heads * config.head_mul)
                stage += 1
            blocks.append(
                MultiScaleBlock(
                    dim, dim_out, heads, window, pool=i in pool_blocks, mlp_ratio=config.mlp_ratio
                )
            )
            dim = dim_out
        self.blocks = nn.ModuleList(blocks)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """[1, h, w, C0]: bicubic-resized background + tiled window embedding."""
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")
        reps = (h // self.pos_embed_window.shape[2], w // self.pos_embed_window.shape[3])
        pos = pos + self.pos_embed_window.tile(1, 1, *reps)
        return pos.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        x = x + self._pos_embed(x.shape[1], x.shape[2])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
