"""The video half of SAM 2: memory bank, memory attention, memory encoder, object pointers.

``Sam2TrackerPart`` holds the weights that only video tracking uses (checkpoint keys
``memory_attention.*``, ``memory_encoder.*``, ``obj_ptr_proj.*``, ``mask_downsample.*``,
``maskmem_tpos_enc``, ``no_obj_ptr``, ``no_mem_pos_enc``, SAM 2.1's ``obj_ptr_tpos_proj.*``
and ``no_obj_embed_spatial``, plus ``no_mem_embed``, shared with the encoder part) and
runs one object's track step on one frame, as Meta's ``SAM2Base.track_step``. The prompt
encoder and mask decoder are the image path's ``Sam2DecoderPart``, passed in.

Frame features are what the encoder part stores for an image: ``image_embed`` (the
stride-16 features *plus* ``no_mem_embed``) and the two high-res maps. The memory path
needs the raw stride-16 features; they are recovered as ``image_embed - no_mem_embed``
(exact up to one float32 rounding), so video frames can share the image store.

Everything runs with batch 1 (one object), like Meta's per-object video predictor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.common import MLP
from sam2_shared.model.config import Sam2Config
from sam2_shared.model.memory_attention import MemoryAttention
from sam2_shared.model.memory_encoder import MemoryEncoder
from sam2_shared.model.position_encoding import PositionEmbeddingSine

if TYPE_CHECKING:
    from sam2_shared.model.parts import Sam2DecoderPart

NO_OBJ_SCORE = -1024.0  # mask logit of an object judged absent (occluded)
NUM_MASKMEM = 7  # memory slots: conditioning frames + 6 previous frames
MAX_OBJ_PTRS = 16  # object-pointer window
MEM_DIM = 64  # width of memory tokens
SIGMOID_SCALE_FOR_MEM_ENC = 20.0
SIGMOID_BIAS_FOR_MEM_ENC = -10.0
# Mask prompts used as output: logits +-10 (sigmoid(-10) = 4.5e-5).
MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0


@dataclass
class FrameOutput:
    """One object's result on one frame, as kept in the memory bank.

    maskmem_features: [1, 64, 64, 64] bfloat16 memory (None until encoded; Meta stores
        memories in bfloat16 even in float32 runs, and so do we).
    pred_masks: [1, 1, 256, 256] float32 low-res mask logits (None for pointer-only entries).
    obj_ptr: [1, 256] object pointer.
    object_score_logits: [1, 1] object presence logit.
    """

    maskmem_features: torch.Tensor | None
    pred_masks: torch.Tensor | None
    obj_ptr: torch.Tensor
    object_score_logits: torch.Tensor


@dataclass
class HeadsOutput:
    low_res_masks: torch.Tensor  # [B, 1, 256, 256] float32 best mask logits
    high_res_masks: torch.Tensor  # [B, 1, 1024, 1024] float32
    obj_ptr: torch.Tensor  # [B, 256]
    object_score_logits: torch.Tensor  # [B, 1]


def sine_pe_1d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """[P] float positions -> [P, dim]: ``[sin(p / dim_t), cos(p / dim_t)]`` concatenated."""
    half = dim // 2
    index = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / half)
    phase = positions.unsqueeze(-1) / dim_t
    return torch.cat((phase.sin(), phase.cos()), dim=-1)


def memory_frames(
    frame_idx: int,
    cond_outputs: Mapping[int, FrameOutput],
    non_cond_outputs: Mapping[int, FrameOutput],
    reverse: bool,
    num_maskmem: int = NUM_MASKMEM,
) -> list[tuple[int, FrameOutput]]:
    """(temporal slot, output) of the spatial memories a frame attends to.

    All conditioning frames (slot 0), then the previous ``num_maskmem - 1`` frames in
    tracking order, oldest first (slots 1..6; the frame just before is slot 6).
    """
    chosen = [(0, out) for out in cond_outputs.values()]
    for t_pos in range(1, num_maskmem):
        t_rel = num_maskmem - t_pos
        prev = frame_idx + t_rel if reverse else frame_idx - t_rel
        out = non_cond_outputs.get(prev)
        # Pointer-only entries (a bounded session keeps only pointers that far back) are
        # skipped like frames that were never tracked.
        if out is not None and out.maskmem_features is not None:
            chosen.append((t_pos, out))
    return chosen


def pointer_frames(
    frame_idx: int,
    cond_outputs: Mapping[int, FrameOutput],
    non_cond_outputs: Mapping[int, FrameOutput],
    reverse: bool,
    num_frames: int,
    signed: bool,
    max_obj_ptrs: int = MAX_OBJ_PTRS,
) -> list[tuple[int, torch.Tensor]]:
    """(temporal distance, pointer) of the object pointers a frame attends to.

    Conditioning frames not in the future (in tracking order), then up to
    ``max_obj_ptrs - 1`` previous frames, nearest first, stopping at the video edge.
    """
    sign = -1 if reverse else 1
    chosen = [
        ((frame_idx - t) * sign if signed else abs(frame_idx - t), out.obj_ptr)
        for t, out in cond_outputs.items()
        if (t >= frame_idx if reverse else t <= frame_idx)
    ]
    for t_diff in range(1, min(num_frames, max_obj_ptrs)):
        t = frame_idx + t_diff if reverse else frame_idx - t_diff
        if t < 0 or t >= num_frames:
            break
        out = non_cond_outputs.get(t)
        if out is not None:
            chosen.append((t_diff, out.obj_ptr))
    return chosen


class Sam2TrackerPart(nn.Module):
    """Video-only weights and the per-object, per-frame track step."""

    def __init__(self, config: Sam2Config) -> None:
        """
        Arguments:
          config (Sam2Config): model configuration; uses embed_dim, image_embedding_size
            (memory attention grid), image_size (mask upsampling) and the SAM 2.1 flags
            no_obj_embed_spatial, proj_tpos_enc_in_obj_ptrs,
            use_signed_tpos_enc_to_obj_ptrs and add_tpos_enc_to_obj_ptrs.
        """
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_maskmem = NUM_MASKMEM
        self.max_obj_ptrs = MAX_OBJ_PTRS
        self.memory_attention = MemoryAttention(
            d_model=dim,
            num_layers=4,
            dim_feedforward=2048,
            num_heads=1,
            kv_in_dim=MEM_DIM,
            feat_size=config.image_embedding_size,
        )
        self.memory_encoder = MemoryEncoder(in_dim=dim, out_dim=MEM_DIM)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(NUM_MASKMEM, 1, 1, MEM_DIM))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, dim))
        # Loaded for strictness; unused by every released config (directly_add_no_mem_embed).
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, dim))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, dim))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.obj_ptr_proj = MLP(dim, dim, dim, 3)
        self.no_obj_embed_spatial = (
            nn.Parameter(torch.zeros(1, MEM_DIM)) if config.no_obj_embed_spatial else None
        )
        self.obj_ptr_tpos_proj = (
            nn.Linear(dim, MEM_DIM) if config.proj_tpos_enc_in_obj_ptrs else None
        )
        self.feature_pos_enc = PositionEmbeddingSine(dim)
        # A low-precision copy of memory_attention (set_tracking_dtype), held in a tuple so
        # that it is no submodule: state_dict and checkpoints stay float32 and unchanged.
        self._attention_low_precision: tuple[MemoryAttention, ...] = ()

    def set_tracking_dtype(self, dtype: torch.dtype) -> None:
        """Run memory attention (most of a tracked frame's arithmetic) in ``dtype``:
        float32 (exact, the default) or bfloat16 (its matmuls; see memory_attention.py).
        Call after moving the part to its device."""
        if dtype == torch.float32:
            self._attention_low_precision = ()
        elif dtype == torch.bfloat16:
            self._attention_low_precision = (self.memory_attention.in_precision(dtype),)
        else:
            raise ValueError(f"tracking dtype must be float32 or bfloat16, not {dtype}")

    # ------------------------------------------------------------------ features

    def raw_features(self, image_embed: torch.Tensor) -> torch.Tensor:
        """[1, C, 64, 64] encoder embedding (with no_mem_embed) -> raw stride-16 features."""
        return image_embed - self.no_mem_embed.reshape(1, -1, 1, 1)

    # ------------------------------------------------------------------ memory

    def memory_layout(
        self,
        frame_idx: int,
        cond_outputs: Mapping[int, FrameOutput],
        non_cond_outputs: Mapping[int, FrameOutput],
        num_frames: int,
        reverse: bool,
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(temporal slots of the memories, distances of the pointers) an object attends to
        on ``frame_idx``: objects with equal layouts have memories of the same shape and
        positional encodings, so they are conditioned in one batch."""
        slots = tuple(t_pos for t_pos, _ in memory_frames(
            frame_idx, cond_outputs, non_cond_outputs, reverse, self.num_maskmem))
        distances = tuple(distance for distance, _ in pointer_frames(
            frame_idx, cond_outputs, non_cond_outputs, reverse, num_frames,
            signed=self.config.use_signed_tpos_enc_to_obj_ptrs, max_obj_ptrs=self.max_obj_ptrs))
        return slots, distances

    def condition_on_memory(
        self,
        frame_idx: int,
        raw: torch.Tensor,
        banks: Sequence[tuple[Mapping[int, FrameOutput], Mapping[int, FrameOutput]]],
        num_frames: int,
        reverse: bool,
    ) -> torch.Tensor:
        """Raw features [1, C, 64, 64] + the memory banks (conditioning, non-conditioning
        outputs) of B objects with equal ``memory_layout`` -> conditioned [B, C, 64, 64]."""
        if any(not cond for cond, _ in banks):
            raise ValueError("an object needs a conditioning frame before it can be tracked")
        _, c, h, w = raw.shape
        batch = len(banks)
        device = raw.device
        mem_pos = self.memory_encoder.memory_pos_enc(h, w, device).flatten(2).transpose(1, 2)
        chosen = [memory_frames(frame_idx, cond, non_cond, reverse, self.num_maskmem)
                  for cond, non_cond in banks]
        memories, memory_pos = [], []
        for slot, t_pos in enumerate(t for t, _ in chosen[0]):
            outs = [per_object[slot][1] for per_object in chosen]
            if any(out.maskmem_features is None for out in outs):
                raise ValueError("conditioning frame without memory features")
            feats = torch.cat([out.maskmem_features for out in outs]).to(device, raw.dtype)
            memories.append(feats.flatten(2).transpose(1, 2))  # [B, HW, 64]
            tpos = self.maskmem_tpos_enc[self.num_maskmem - t_pos - 1].reshape(1, 1, -1)
            memory_pos.append((mem_pos + tpos).to(raw.dtype).expand(batch, -1, -1))

        pointers = [
            pointer_frames(frame_idx, cond, non_cond, reverse, num_frames,
                           signed=self.config.use_signed_tpos_enc_to_obj_ptrs,
                           max_obj_ptrs=self.max_obj_ptrs)
            for cond, non_cond in banks
        ]
        num_ptr_tokens = 0
        if pointers[0]:
            distances = [distance for distance, _ in pointers[0]]
            obj_ptrs = torch.stack([
                torch.cat([p.to(device=device, dtype=raw.dtype) for _, p in per_object])
                for per_object in pointers
            ])  # [B, P, C]
            num_ptrs = obj_ptrs.shape[1]
            if self.config.add_tpos_enc_to_obj_ptrs:
                t_diff_max = min(num_frames, self.max_obj_ptrs) - 1
                positions = torch.tensor(distances, device=device) / t_diff_max
                tpos_dim = c if self.obj_ptr_tpos_proj is not None else MEM_DIM
                ptr_pos = sine_pe_1d(positions, tpos_dim)
                if self.obj_ptr_tpos_proj is not None:
                    ptr_pos = self.obj_ptr_tpos_proj(ptr_pos)
            else:
                ptr_pos = obj_ptrs.new_zeros(num_ptrs, MEM_DIM)
            # Each 256-d pointer becomes 4 tokens of 64 (pointer-major), sharing its PE.
            split = c // MEM_DIM
            memories.append(obj_ptrs.reshape(batch, num_ptrs * split, MEM_DIM))
            memory_pos.append(ptr_pos.to(raw.dtype).repeat_interleave(split, dim=0)[None]
                              .expand(batch, -1, -1))
            num_ptr_tokens = num_ptrs * split

        memory = torch.cat(memories, dim=1)
        memory_pos_all = torch.cat(memory_pos, dim=1)
        curr = raw.flatten(2).transpose(1, 2).expand(batch, -1, -1)
        curr_pos = self.feature_pos_enc(raw).flatten(2).transpose(1, 2).expand(batch, -1, -1)
        attention = (self._attention_low_precision or (self.memory_attention,))[0]
        out = attention(curr, curr_pos, memory, memory_pos_all, num_ptr_tokens)
        return out.transpose(1, 2).reshape(batch, c, h, w)

    def encode_memory(
        self,
        raw: torch.Tensor,
        high_res_masks: torch.Tensor,
        object_score_logits: torch.Tensor,
        binarize: bool,
    ) -> torch.Tensor:
        """Raw features [1, C, 64, 64] + mask logits [1, 1, 1024, 1024] -> [1, 64, 64, 64] float.

        ``binarize``: the mask came from user prompts (threshold at 0 instead of sigmoid).
        SAM 2.1 marks an absent object by adding ``no_obj_embed_spatial`` everywhere.
        """
        if binarize:
            mask_for_mem = (high_res_masks > 0).to(raw.dtype)
        else:
            mask_for_mem = torch.sigmoid(high_res_masks).to(raw.dtype)
        mask_for_mem = mask_for_mem * SIGMOID_SCALE_FOR_MEM_ENC + SIGMOID_BIAS_FOR_MEM_ENC
        features = self.memory_encoder(raw, mask_for_mem)
        if self.no_obj_embed_spatial is not None:
            absent = (object_score_logits <= 0).to(features.dtype)  # [1, 1]
            features = features + absent[..., None, None] * self.no_obj_embed_spatial[
                ..., None, None
            ].to(features.dtype)
        return features

    # ------------------------------------------------------------------ SAM heads

    def _mix_no_obj_ptr(self, obj_ptr: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """fixed_no_obj_ptr: an absent object's pointer is exactly ``no_obj_ptr``."""
        present = present.to(obj_ptr.dtype)
        return present * obj_ptr + (1 - present) * self.no_obj_ptr

    def sam_heads(
        self,
        decoder: Sam2DecoderPart,
        features: torch.Tensor,
        high_res_feats: tuple[torch.Tensor, torch.Tensor],
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        mask_logits: torch.Tensor | None,
        multimask_output: bool,
    ) -> HeadsOutput:
        """Meta's ``_forward_sam_heads`` (occlusion gating included) for the B objects of
        ``features`` [B, C, 64, 64]; prompts, if any, are one object's (B = 1)."""
        batch = features.shape[0]
        if point_coords is None:
            # Without clicks the video model still sends one padding point.
            point_coords = features.new_zeros(batch, 1, 2)
            point_labels = torch.full((batch, 1), -1, dtype=torch.int32, device=features.device)
        if mask_logits is not None and mask_logits.shape[-2:] != (256, 256):
            mask_logits = F.interpolate(
                mask_logits.float(), size=(256, 256), mode="bilinear",
                align_corners=False, antialias=True,
            )
        out = decoder(
            features, high_res_feats, point_coords, point_labels, mask_logits,
            multimask_output=multimask_output, batch_size=batch,
        )
        present = out.object_score_logits > 0  # [B, 1]
        masks = torch.where(present[:, :, None, None], out.masks, NO_OBJ_SCORE).float()
        token = out.sam_tokens[:, 0]
        if multimask_output:
            rows = torch.arange(batch, device=masks.device)
            best = out.iou_scores.argmax(dim=1)
            masks = masks[rows, best].unsqueeze(1)
            token = out.sam_tokens[rows, best]
        high_res = F.interpolate(
            masks, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False
        )
        obj_ptr = self._mix_no_obj_ptr(self.obj_ptr_proj(token), present)
        return HeadsOutput(masks, high_res, obj_ptr, out.object_score_logits)

    def mask_as_output(
        self,
        decoder: Sam2DecoderPart,
        raw: torch.Tensor,
        high_res_feats: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
    ) -> HeadsOutput:
        """A mask prompt [1, 1, 1024, 1024] (0/1) taken as the output itself (logits +-10).

        The pointer comes from decoding ``mask_downsample(mask)`` on the raw features (as
        Meta does); presence is "any pixel set", not the decoder's object score.
        """
        mask = mask.float()
        high_res = mask * MASK_OUT_SCALE + MASK_OUT_BIAS
        low_res = F.interpolate(
            high_res, size=(high_res.shape[-2] // 4, high_res.shape[-1] // 4),
            mode="bilinear", align_corners=False, antialias=True,
        )
        decoded = self.sam_heads(
            decoder, raw, high_res_feats, None, None, self.mask_downsample(mask),
            multimask_output=False,
        )
        present = (mask.flatten(1) > 0).any(dim=1, keepdim=True)  # [1, 1]
        object_score_logits = MASK_OUT_SCALE * present.float() + MASK_OUT_BIAS
        obj_ptr = self._mix_no_obj_ptr(decoded.obj_ptr, present)
        return HeadsOutput(low_res, high_res, obj_ptr, object_score_logits)

    # ------------------------------------------------------------------ track step

    def track_step(
        self,
        decoder: Sam2DecoderPart,
        frame_idx: int,
        image_embed: torch.Tensor,
        high_res_feats: tuple[torch.Tensor, torch.Tensor],
        *,
        is_init_cond_frame: bool,
        cond_outputs: Mapping[int, FrameOutput],
        non_cond_outputs: Mapping[int, FrameOutput],
        num_frames: int,
        reverse: bool = False,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        prev_mask_logits: torch.Tensor | None = None,
        run_mem_encoder: bool = True,
    ) -> FrameOutput:
        """One object on one frame (Meta's ``track_step`` + the predictor's compaction).

        image_embed [1, C, 64, 64] (with no_mem_embed) and high_res_feats from the encoder
        part; point_coords [1, N, 2] in the 1024 frame (box corners first, labels 2/3),
        point_labels [1, N] int32; mask_input [1, 1, 1024, 1024] 0/1; prev_mask_logits
        [1, 1, 256, 256] logits of an earlier prediction fed with new clicks.
        """
        raw = self.raw_features(image_embed)
        if mask_input is not None:
            heads = self.mask_as_output(decoder, raw, high_res_feats, mask_input)
        else:
            if is_init_cond_frame:
                # No memory yet: exactly the image predictor's embedding.
                features = image_embed
            else:
                features = self.condition_on_memory(
                    frame_idx, raw, [(cond_outputs, non_cond_outputs)], num_frames, reverse
                )
            num_points = 0 if point_labels is None else point_labels.shape[1]
            # multimask for 0 or 1 points (every released config; tracking included).
            heads = self.sam_heads(
                decoder, features, high_res_feats, point_coords, point_labels,
                prev_mask_logits, multimask_output=num_points <= 1,
            )
        maskmem = None
        if run_mem_encoder:
            maskmem = self.encode_memory(
                raw, heads.high_res_masks, heads.object_score_logits,
                binarize=point_coords is not None,
            ).to(torch.bfloat16)
        return FrameOutput(maskmem, heads.low_res_masks, heads.obj_ptr, heads.object_score_logits)

    def track_objects(
        self,
        decoder: Sam2DecoderPart,
        frame_idx: int,
        image_embed: torch.Tensor,
        high_res_feats: tuple[torch.Tensor, torch.Tensor],
        banks: Sequence[tuple[Mapping[int, FrameOutput], Mapping[int, FrameOutput]]],
        *,
        num_frames: int,
        reverse: bool = False,
    ) -> list[FrameOutput]:
        """Track B objects without prompts on this frame in one batch: ``track_step`` of
        each, with their (conditioning, non-conditioning) memory banks, which must have equal
        ``memory_layout``s."""
        raw = self.raw_features(image_embed)
        features = self.condition_on_memory(frame_idx, raw, banks, num_frames, reverse)
        heads = self.sam_heads(decoder, features, high_res_feats, None, None, None,
                               multimask_output=True)
        maskmem = self.encode_memory(raw, heads.high_res_masks, heads.object_score_logits,
                                     binarize=False).to(torch.bfloat16)
        return [
            FrameOutput(maskmem[i : i + 1], heads.low_res_masks[i : i + 1],
                        heads.obj_ptr[i : i + 1], heads.object_score_logits[i : i + 1])
            for i in range(len(banks))
        ]

    def memory_for_output(
        self, image_embed: torch.Tensor, output: FrameOutput
    ) -> torch.Tensor:
        """bfloat16 memory of a prompted frame's stored output (the predictor's preflight).

        The stored low-res logits are upsampled to 1024 and binarised (user input).
        """
        if output.pred_masks is None:
            raise ValueError("no mask logits to encode")
        high_res = F.interpolate(
            output.pred_masks.float(), size=(self.config.image_size,) * 2,
            mode="bilinear", align_corners=False,
        )
        raw = self.raw_features(image_embed)
        features = self.encode_memory(raw, high_res, output.object_score_logits, binarize=True)
        return features.to(torch.bfloat16)
