"""The two deployable halves of the SAM 2 image path.

The encoder tier holds ``Sam2EncoderPart`` (Hiera + FPN + the decoder's high-res
projections + ``no_mem_embed``); the decoder tier holds only ``Sam2DecoderPart``
(prompt encoder + mask decoder), so it never keeps the Hiera weights in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from sam2_shared.model.config import Sam2Config
from sam2_shared.model.hiera import Hiera
from sam2_shared.model.mask_decoder import DecoderOutput, MaskDecoder
from sam2_shared.model.neck import FpnNeck, ImageEncoder
from sam2_shared.model.prompt_encoder import PromptEncoder
from sam2_shared.model.transformer import TwoWayTransformer


class Sam2EncoderPart(nn.Module):
    """Image -> cached embedding.

    Meta applies the mask decoder's ``conv_s0`` / ``conv_s1`` in ``forward_image`` so
    clicks don't redo them; they are therefore encoder weights here (checkpoint keys
    ``sam_mask_decoder.conv_s{0,1}.*``, see ``sam2_shared.inference.checkpoints``).
    """

    def __init__(self, config: Sam2Config) -> None:
        """
        Arguments:
          config (Sam2Config): model configuration; uses trunk (the Hiera
            hyper-parameters), embed_dim (channels of the neck and image embedding) and
            fpn_top_down_levels.
        """
        super().__init__()
        self.config = config
        trunk = Hiera(config.trunk)
        neck = FpnNeck(config.trunk.channel_list, config.embed_dim, config.fpn_top_down_levels)
        self.image_encoder = ImageEncoder(trunk, neck, scalp=1)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.conv_s0 = nn.Conv2d(config.embed_dim, config.embed_dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(config.embed_dim, config.embed_dim // 4, kernel_size=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, 3, 1024, 1024] normalised -> image_embed [B, 256, 64, 64],
        feat_s0 [B, 32, 256, 256], feat_s1 [B, 64, 128, 128]."""
        level0, level1, level2 = self.image_encoder(images)
        # Image prediction mirrors an initial video frame: no memory, so add no_mem_embed.
        image_embed = level2 + self.no_mem_embed.reshape(1, -1, 1, 1)
        return image_embed, self.conv_s0(level0), self.conv_s1(level1)



class Sam2DecoderPart(nn.Module):
    """Prompts + cached embedding -> low-res mask logits and scores."""

    def __init__(self, config: Sam2Config) -> None:
        """
        Arguments:
          config (Sam2Config): model configuration; uses embed_dim, image_size,
            image_embedding_size and mask_in_chans (prompt encoder), decoder_depth,
            decoder_num_heads and decoder_mlp_dim (two-way transformer),
            num_multimask_outputs and the dynamic_multimask_* stability settings.
        """
        super().__init__()
        self.config = config
        self.sam_prompt_encoder = PromptEncoder(
            embed_dim=config.embed_dim,
            image_embedding_size=config.image_embedding_size,
            input_image_size=config.image_size,
            mask_in_chans=config.mask_in_chans,
        )
        transformer = TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.embed_dim,
            num_heads=config.decoder_num_heads,
            mlp_dim=config.decoder_mlp_dim,
        )
        self.sam_mask_decoder = MaskDecoder(
            transformer_dim=config.embed_dim,
            transformer=transformer,
            num_multimask_outputs=config.num_multimask_outputs,
            dynamic_multimask_via_stability=config.dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=config.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=config.dynamic_multimask_stability_thresh,
        )

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats: tuple[torch.Tensor, torch.Tensor],
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        batch_size: int,
    ) -> DecoderOutput:
        """Decode B prompts against one image (embeddings with batch 1) or B images.

        coords [B, N, 2] in the 1024 frame (box corners first, labels 2/3), labels
        [B, N], mask_input [B, 1, 256, 256] logits; any may be None.
        """
        sparse, dense = self.sam_prompt_encoder(coords, labels, mask_input, batch_size)
        return self.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=self.sam_prompt_encoder.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            high_res_features=(high_res_feats[0], high_res_feats[1]),
        )
