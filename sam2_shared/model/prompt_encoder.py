"""Prompt encoder: points/boxes -> sparse tokens, mask logits -> dense embedding."""

from __future__ import annotations

import torch
from torch import nn

from sam2_shared.model.common import LayerNorm2d
from sam2_shared.model.position_encoding import PositionEmbeddingRandom

# Point labels understood by the prompt encoder.
LABEL_PAD = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3


class PromptEncoder(nn.Module):
    """Embeds prompts for the mask decoder.

    Boxes are not a separate input: callers pass them as two points labelled 2 and 3
    placed before the clicks, as Meta's predictors do. One padding point (label -1)
    is always appended to the points.
    """

    def __init__(
        self, embed_dim: int, image_embedding_size: int, input_image_size: int, mask_in_chans: int
    ) -> None:
        """
        Arguments:
          embed_dim (int): channels C of the sparse and dense prompt embeddings.
          image_embedding_size (int): side, in tokens, of the square image embedding grid
            (64).
          input_image_size (int): side, in pixels, of the square input frame (1024);
            point coordinates are normalised by it.
          mask_in_chans (int): hidden channels of the mask downscaling convs
            (mask_in_chans // 4, then mask_in_chans).
        """
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0 negative, 1 positive, 2 box top-left, 3 box bottom-right.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)
        self._dense_pe: torch.Tensor | None = None

    def dense_pe(self) -> torch.Tensor:
        """[1, C, 64, 64] positional encoding of the image embedding grid (cached)."""
        gaussian = self.pe_layer.positional_encoding_gaussian_matrix
        if (
            self._dense_pe is None
            or self._dense_pe.device != gaussian.device
            or self._dense_pe.dtype != gaussian.dtype
        ):
            size = self.image_embedding_size
            dense = self.pe_layer.dense(size, size).to(gaussian.dtype)
            self._dense_pe = dense.contiguous(memory_format=torch.channels_last)
        return self._dense_pe

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B, N, 2] coords in the 1024 frame, [B, N] labels -> [B, N + 1, C]."""
        b = coords.shape[0]
        coords = coords + 0.5  # pixel centres
        coords = torch.cat([coords, coords.new_zeros(b, 1, 2)], dim=1)
        labels = torch.cat([labels, labels.new_full((b, 1), LABEL_PAD)], dim=1)
        embedding = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        embedding = embedding.to(self.not_a_point_embed.weight.dtype)
        labels = labels.unsqueeze(-1)
        embedding = torch.where(
            labels == LABEL_PAD, self.not_a_point_embed.weight.expand_as(embedding), embedding
        )
        for label, table in enumerate(self.point_embeddings):
            embedding = torch.where(labels == label, embedding + table.weight, embedding)
        return embedding

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """[B, 1, 256, 256] mask logits -> [B, C, 64, 64]."""
        return self.mask_downscaling(masks)

    def forward(
        self,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        masks: torch.Tensor | None,
        batch_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse [B, N + 1 or 0, C] and dense [B or 1, C, 64, 64] embeddings."""
        weight = self.no_mask_embed.weight
        if coords is not None and labels is not None:
            sparse = self.embed_points(coords, labels)
        else:
            sparse = weight.new_empty((batch_size, 0, self.embed_dim))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            # Batch 1 on purpose: it broadcasts over the prompts, which lets the decoder
            # see that they all share one image side.
            size = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(1, -1, size, size)
        return sparse, dense
