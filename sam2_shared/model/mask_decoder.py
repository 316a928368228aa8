"""Mask decoder: two-way transformer + upscaling + hypernetwork, IoU and object heads."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.common import MLP, LayerNorm2d, TensorMemo
from sam2_shared.model.transformer import TwoWayTransformer

logger = logging.getLogger(__name__)

# Prompts x embedding rows per band of the upscaling (``MaskDecoder.upscaled_masks``): a band's
# maps (~0.25 MiB per prompt-row and stage) stay in the CPU's last-level cache, and few bands
# keep the per-op thread synchronisation (7 ops a band) cheap on a loaded machine, where 16
# measured slower than no banding at all.
_BAND_PROMPT_ROWS = 128
# Images whose per-image decoder work ``MaskDecoder`` keeps (``TensorMemo``): clicks come in
# runs on one image. The skip features in blocked order (12 MiB fp32 an image; rearranging
# them cost a one-prompt click ~15 %) and the transformer's first-layer image side (14 MiB:
# keys with the no-mask embedding and the positional encoding, and their projections).
_MEMO_IMAGES = 2


@dataclass
class DecoderOutput:
    """Mask decoder results for B prompts.

    masks: [B, M, 256, 256] low-res logits (M = 3 multimask, else 1).
    iou_scores: [B, M] predicted IoU (sigmoid).
    object_score_logits: [B, 1] object presence logit.
    sam_tokens: [B, M', C] mask tokens for object pointers (video path).
    """

    masks: torch.Tensor
    iou_scores: torch.Tensor
    object_score_logits: torch.Tensor
    sam_tokens: torch.Tensor


class MaskDecoder(nn.Module):
    """SAM 2 mask decoder with high-resolution skip features.

    Output token order: object score, IoU, then 4 mask tokens (0 = single mask,
    1..3 = multimask). The ``conv_s0`` / ``conv_s1`` projections of Meta's decoder
    run at encode time and live in the encoder part (``Sam2EncoderPart``).
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        dynamic_multimask_via_stability: bool = True,
        dynamic_multimask_stability_delta: float = 0.05,
        dynamic_multimask_stability_thresh: float = 0.98,
    ) -> None:
        """
        Arguments:
          transformer_dim (int): channel dimension C of the image embedding, the prompt
            tokens and the two-way transformer.
          transformer (TwoWayTransformer): the transformer that attends between the
            output and prompt tokens and the image embedding.
          num_multimask_outputs (int): number of masks predicted in multimask mode; one
            more mask token predicts the single mask.
          iou_head_depth (int): number of Linear layers of the IoU prediction MLP.
          iou_head_hidden_dim (int): hidden width of the IoU prediction MLP.
          dynamic_multimask_via_stability (bool): in single-mask output at eval time,
            replace an unstable single mask by the multimask candidate with the highest
            predicted IoU.
          dynamic_multimask_stability_delta (float): logit margin delta of the stability
            score area(logit > delta) / area(logit > -delta).
          dynamic_multimask_stability_thresh (float): minimum stability score for the
            single mask to be kept.
        """
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth,
            sigmoid_output=True,
        )
        self.pred_obj_score_head = MLP(transformer_dim, transformer_dim, 1, 3)
        self.dynamic_multimask_via_stability = dynamic_multimask_via_stability
        self.stability_delta = dynamic_multimask_stability_delta
        self.stability_thresh = dynamic_multimask_stability_thresh
        # Set by ``compile_one_prompt_upscaling``; None: eager.
        self._one_prompt_upscaling: Callable[..., torch.Tensor] | None = None
        self._skip_memo: TensorMemo[tuple[torch.Tensor, torch.Tensor]] = TensorMemo(_MEMO_IMAGES)
        self._image_memo: TensorMemo[dict[str, torch.Tensor]] = TensorMemo(_MEMO_IMAGES)
        # set_upscaling_dtype: the dtype the upscaling runs in (None: the weights'), and its
        # copy in that dtype, made from the weights as they are when used (TensorMemo: a
        # state dict loaded in place since makes a new one). The copy is no submodule, so
        # state_dict and checkpoints stay as loaded.
        self._upscaling_dtype: torch.dtype | None = None
        self._upscaling_copy: TensorMemo[nn.Sequential] = TensorMemo(1)

    def set_upscaling_dtype(self, dtype: torch.dtype | None) -> None:
        """Run the mask upscaling (its two transposed convs, LayerNorm and GELUs: 0.8 of the
        1.9 GFLOP of matmuls per prompt) in ``dtype`` while the rest of the decoder keeps its
        own: None (the default: the weights' dtype), float32 or bfloat16. Masks come out in
        the weights' dtype. Training and autograd always use the weights themselves."""
        if dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"upscaling dtype must be None, float32 or bfloat16, not {dtype}")
        self._upscaling_dtype = dtype
        self._upscaling_copy = TensorMemo(1)

    def _upscaling(self) -> nn.Sequential:
        """The upscaling layers in the dtype they run in (``set_upscaling_dtype``)."""
        layers = self.output_upscaling
        dtype = self._upscaling_dtype
        if (dtype is None or dtype == layers[0].weight.dtype or self.training
                or torch.is_grad_enabled()):
            return layers
        sources = tuple(layers.parameters())
        low = self._upscaling_copy.get(sources, lambda: _converted(layers, dtype))
        if low[0].weight.device != sources[0].device:  # moved since: .to() keeps the objects
            self._upscaling_copy = TensorMemo(1)
            low = self._upscaling_copy.get(sources, lambda: _converted(layers, dtype))
        return low

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor],
        mask_tokens: slice = slice(0, None),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask logits [B, M, 256, 256] of the ``mask_tokens`` (default all 4: M = 4), IoU
        [B, 4], mask tokens [B, 4, C], object [B, 1].

        ``image_embeddings`` [1 or B, C, 64, 64] and ``high_res_features``
        ([1 or B, C/8, 256, 256], [1 or B, C/4, 128, 128]) broadcast over the B prompts.
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat(
            [self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight], dim=0
        )
        tokens = torch.cat(
            (output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings), dim=1
        )
        image_side = self._image_side(image_embeddings, image_pe, dense_prompt_embeddings)
        src = None if image_side is None else image_side.get("src")
        if src is None:
            src = image_embeddings + dense_prompt_embeddings
        if image_side is not None:
            image_side["src"] = src
        # src is used up below, before this returns: the transformer may reuse its buffers.
        hs, src = self.transformer(src, image_pe, tokens, image_side, reuse_buffers=True)
        iou_token_out = hs[:, 1, :]
        mask_tokens_out = hs[:, 2 : 2 + self.num_mask_tokens, :]

        h, w = image_embeddings.shape[-2:]
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
             for i in range(self.num_mask_tokens)[mask_tokens]],
            dim=1,
        )  # [B, M, C/8]
        masks = self.upscaled_masks(src.reshape(b, h, w, -1), *high_res_features, hyper_in)
        iou_pred = self.iou_prediction_head(iou_token_out)
        object_score_logits = self.pred_obj_score_head(hs[:, 0, :])
        return masks, iou_pred, mask_tokens_out, object_score_logits

    def _image_side(
        self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The remembered image-only work for this image (``TensorMemo``), or None where
        there is none to share: training, autocast, several images, or a mask prompt (the
        dense embedding then differs per prompt; without one it is one vector broadcast over
        the grid, and the entry is only used for that same vector).

        It is made at the first prompt on an image, so every prompt on it takes the same
        path and the same request always gets the same numbers. Projecting the image side
        costs that first lone prompt ~0.4 GFLOP more than its folded products would (2-3 ms
        on a 2-core CPU; a video frame, seen once, pays it too, well under 0.1 % of tracking
        the frame there).
        """
        if (self.training or torch.is_grad_enabled()
                or torch.is_autocast_enabled(image_embeddings.device.type)
                or image_embeddings.shape[0] != 1
                or dense.shape[0] != 1 or dense.stride()[-2:] != (0, 0)):
            return None
        vector = dense[0, :, 0, 0]
        # Keyed by the weights it is made from too: a state dict loaded in place since
        # bumps their versions.
        sources = (image_embeddings, image_pe, *self.transformer.image_side_parameters())
        side = self._image_memo.get(sources, dict)
        if "dense" not in side:
            side["dense"] = vector.clone()
        return side if torch.equal(side["dense"], vector) else None

    def compile_one_prompt_upscaling(self) -> None:
        """Run ``upscaled_masks`` of a one-prompt forward through ``torch.compile``.

        Inductor fuses the LayerNorm, the GELUs and the reorders around the two matmuls, the
        element-wise passes that make up much of a single click's cost on a CPU. Only batch 1
        (an interactive click) is compiled: its shapes depend only on whether the click asks
        for multimask output (3 masks made) or not (4), so there are at most two compiles
        (seconds each, at the first such click) for every click. Batches of several prompts
        keep the eager code, where compiling measured little gain and every batch size would
        be a compile of its own. On a CPU this needs a C++ compiler at run time.
        """
        self._one_prompt_upscaling = torch.compile(self._upscaled_masks, dynamic=False)

    def upscaled_masks(
        self,
        image: torch.Tensor,
        feat_s0: torch.Tensor,
        feat_s1: torch.Tensor,
        hyper_in: torch.Tensor,
    ) -> torch.Tensor:
        """The masks, [B, M, 4h, 4w] logits (see ``_upscaled_masks``)."""
        layers = self._upscaling()
        skip0, skip1 = self._blocked_skips(feat_s0, feat_s1, layers)
        compiled = self._one_prompt_upscaling
        if compiled is not None and image.shape[0] == 1 and not self.training:
            try:
                return compiled(image, skip0, skip1, hyper_in, layers)
            except Exception:  # e.g. no C++ compiler: eagerly from now on (fp32: the same
                # numbers; a bf16 upscaling's differ by bf16 rounding, as batches do)
                logger.warning("torch.compile of the mask upscaling failed; decoding eagerly",
                               exc_info=True)
                self._one_prompt_upscaling = None
        return self._upscaled_masks(image, skip0, skip1, hyper_in, layers)

    def _blocked_skips(
        self, feat_s0: torch.Tensor, feat_s1: torch.Tensor, layers: nn.Sequential
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The skip features plus the upscaling's biases in the blocked sub-pixel order of
        ``_upscaled_masks``: ([1 or B, h, w, 16 C/8], [1 or B, h, w, 4 C/4]), in the dtype of
        ``layers`` (``_upscaling()``).

        feat_s0 [1 or B, C/8, 4h, 4w], feat_s1 [1 or B, C/4, 2h, 2w]. Row 4i+2di+di2 and column
        4j+2dj+dj2 of feat_s0 go to pixel (i, j), sub-pixel (di, dj, di2, dj2); feat_s1 likewise
        with (di, dj). Outside training the result is remembered for the last few images
        (``TensorMemo``), so a run of clicks on one image pays it once.
        """
        if self.training or torch.is_grad_enabled():
            return self._rearranged_skips(feat_s0, feat_s1, layers)
        biases = (layers[0].bias, layers[3].bias)
        return self._skip_memo.get(
            (feat_s0, feat_s1, *biases), lambda: self._rearranged_skips(feat_s0, feat_s1, layers)
        )

    def _rearranged_skips(
        self, feat_s0: torch.Tensor, feat_s1: torch.Tensor, layers: nn.Sequential
    ) -> tuple[torch.Tensor, torch.Tensor]:
        upconv1, upconv2 = layers[0], layers[3]
        dtype = upconv1.weight.dtype
        c8, c4 = feat_s0.shape[1], feat_s1.shape[1]
        h, w = feat_s1.shape[2] // 2, feat_s1.shape[3] // 2
        skip1 = feat_s1.reshape(-1, c4, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1) + upconv1.bias
        skip1 = skip1.contiguous().to(dtype).reshape(-1, h, w, 4 * c4)
        skip0 = feat_s0.reshape(-1, c8, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)
        skip0 = (skip0 + upconv2.bias).contiguous().to(dtype).reshape(-1, h, w, 16 * c8)
        return skip0, skip1

    def _upscaled_masks(
        self,
        image: torch.Tensor,
        skip0: torch.Tensor,
        skip1: torch.Tensor,
        hyper_in: torch.Tensor,
        layers: nn.Sequential,
    ) -> torch.Tensor:
        """``hyper_in @ GELU(ConvT2(GELU(LN(ConvT1(x) + feat_s1))) + feat_s0)``, the masks.

        image: channels-last [B, h, w, C]; skip0 [1 or B, h, w, 16 C/8] and skip1
        [1 or B, h, w, 4 C/4] (``_blocked_skips``); hyper_in [B, M, C/8]; ``layers``: the
        upscaling in the dtype it runs in (``_upscaling()``). Returns [B, M, 4h, 4w] logits
        in hyper_in's dtype.

        A kernel-2 stride-2 transposed conv is a per-pixel matmul to 2x2 sub-pixels, and
        everything after it up to the hypernetwork is per-pixel too, so the sub-pixels stay
        where the matmul puts them (*blocked* order (i, j, di, dj, di2, dj2) for row
        4i+2di+di2, column 4j+2dj+dj2); only the per-image skip features are rearranged into
        that order, and each band's M masks are put in raster order at the end. The work
        runs in bands of embedding rows sized to stay in the CPU cache: the per-prompt maps
        (16 MiB per prompt at full size) never make a round trip through memory between
        the matmuls, the LayerNorm and the GELUs.
        """
        upconv1, norm1, act1, upconv2, act2 = layers
        dtype = upconv1.weight.dtype  # image and hyper_in enter it band by band
        b, h, w, c = image.shape
        c4, c8 = skip1.shape[-1] // 4, skip0.shape[-1] // 16
        m = hyper_in.shape[1]
        # weight [Cin, Cout, 2, 2] -> [Cin, (di, dj, Cout)]. The skips (with the biases) are
        # added by the matmuls in their output pass (baddbmm, broadcast over the prompts).
        weight1 = upconv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c4).expand(b, -1, -1)
        weight2 = upconv2.weight.permute(0, 2, 3, 1).reshape(c4, 4 * c8).expand(b, -1, -1)
        masks = hyper_in.new_empty(b, m, 4 * h, 4 * w)
        hyper_in = hyper_in.to(dtype)
        rows = max(1, min(h, _BAND_PROMPT_ROWS // b))
        for top in range(0, h, rows):
            bottom = min(h, top + rows)
            n = (bottom - top) * w
            x = torch.baddbmm(skip1[:, top:bottom].reshape(-1, n, 4 * c4),
                              image[:, top:bottom].reshape(b, n, c).to(dtype), weight1)
            x = act1(F.layer_norm(x.reshape(b, 4 * n, c4), (c4,), norm1.weight, norm1.bias,
                                  norm1.eps))
            x = act2(torch.baddbmm(skip0[:, top:bottom].reshape(-1, 4 * n, 4 * c8), x, weight2))
            target = masks[:, :, 4 * top : 4 * bottom]
            if torch.compiler.is_compiling():  # inductor fuses the reorder into the product
                band = hyper_in @ x.reshape(b, 16 * n, c8).transpose(1, 2)  # [B, M, 16n]
                band = band.reshape(b, m, bottom - top, w, 2, 2, 2, 2)
                target.view(b, m, bottom - top, 2, 2, w, 2, 2).copy_(
                    band.permute(0, 1, 2, 4, 6, 3, 5, 7))
            else:
                # x stays the matmul's contiguous left side ([16n, C/8] @ [C/8, M]: no
                # transposing copy of x), and one gather puts the small product in raster order.
                band = torch.bmm(x.reshape(b, 16 * n, c8), hyper_in.transpose(1, 2))
                order = _raster_order(m, bottom - top, w, band.device)
                target.copy_(band.reshape(b, -1).index_select(1, order).view(target.shape))
        return masks

    def stability_scores(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """[..., H, W] -> [...]: area(logit > delta) / area(logit > -delta) (1 if empty)."""
        flat = mask_logits.flatten(-2)
        area_inner = (flat > self.stability_delta).sum(-1).float()
        area_outer = (flat > -self.stability_delta).sum(-1).float()
        return torch.where(area_outer > 0, area_inner / area_outer, 1.0)

    def select_outputs(
        self,
        masks: torch.Tensor,
        iou_pred: torch.Tensor,
        mask_tokens_out: torch.Tensor,
        object_score_logits: torch.Tensor,
        multimask_output: bool,
    ) -> DecoderOutput:
        """Pick the returned outputs (Meta's ``MaskDecoder.forward`` rules). ``masks``: of the
        mask tokens 1..3 in multimask output (token 0's is never returned there, so it is not
        made), of all 4 otherwise."""
        if multimask_output:
            if masks.shape[1] != iou_pred.shape[1] - 1:
                raise ValueError(f"multimask output takes the masks of mask tokens 1.. "
                                 f"({iou_pred.shape[1] - 1}), got {masks.shape[1]}")
            return DecoderOutput(
                masks, iou_pred[:, 1:], object_score_logits, mask_tokens_out[:, 1:]
            )
        single_masks, single_iou = masks[:, 0:1], iou_pred[:, 0:1]
        if self.dynamic_multimask_via_stability and not self.training:
            # An unstable single mask falls back to the best multimask candidate.
            best = iou_pred[:, 1:].argmax(dim=-1)
            rows = torch.arange(masks.shape[0], device=masks.device)
            best_masks = masks[:, 1:][rows, best].unsqueeze(1)
            best_iou = iou_pred[:, 1:][rows, best].unsqueeze(1)
            stable = self.stability_scores(single_masks[:, 0]) >= self.stability_thresh
            single_masks = torch.where(stable[:, None, None, None], single_masks, best_masks)
            single_iou = torch.where(stable[:, None], single_iou, best_iou)
        return DecoderOutput(single_masks, single_iou, object_score_logits, mask_tokens_out[:, 0:1])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        high_res_features: tuple[torch.Tensor, torch.Tensor],
    ) -> DecoderOutput:
        outputs = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            high_res_features,
            mask_tokens=slice(1, None) if multimask_output else slice(0, None),
        )
        return self.select_outputs(*outputs, multimask_output=multimask_output)


@functools.lru_cache(maxsize=8)
def _raster_order(masks: int, rows: int, width: int, device: torch.device) -> torch.Tensor:
    """Gather index from a band's blocked hypernetwork product, [rows * width * 16, M]
    flattened in (i, j, di, dj, di2, dj2, m) order, to its [M, 4 rows, 4 width] masks in
    raster order (row 4i+2di+di2, column 4j+2dj+dj2). At most 1 MiB (int32, 64 rows of a
    64-wide embedding, 4 masks); rebuilding an evicted one costs ~0.2 ms."""
    # Made outside inference mode even when first asked for inside it: an inference tensor
    # could not be saved for the backward of a later call with autograd.
    with torch.inference_mode(False):
        source = torch.arange(rows * width * 16 * masks, dtype=torch.int32, device=device)
        source = source.reshape(rows, width, 2, 2, 2, 2, masks)  # (i, j, di, dj, di2, dj2, m)
        return source.permute(6, 0, 2, 4, 1, 3, 5).reshape(-1)  # (m, i, di, di2, j, dj, dj2)


def _converted(layers: nn.Sequential, dtype: torch.dtype) -> nn.Sequential:
    """A frozen copy of ``layers`` in ``dtype``, on their device."""
    return copy.deepcopy(layers).to(dtype).requires_grad_(False)
