"""Memory attention: condition the current frame's features on the memory bank.

Four pre-norm layers, each: RoPE self-attention over the 64 x 64 frame tokens,
RoPE cross-attention to the memories (spatial memory tokens of width 64 plus
object-pointer tokens, which get no rotation), then a ReLU MLP. Sequences are
batch-first here: [B, tokens, C].

Low-precision mode (``MemoryAttention.in_precision(torch.bfloat16)``): the attention and MLP
weights and matmuls run in bfloat16 while the residual stream and the LayerNorms stay
float32. Attention then runs as chunked matmuls rather than SDPA (whose CPU bfloat16 kernel
is no faster than float32 here), and cross-attention applies ``v_proj`` after the softmax
average, over the 64-wide memory tokens instead of their 256-wide projections: softmax rows
sum to 1, so ``P (M W^T + b) = (P M) W^T + b``, a quarter of that matmul's FLOPs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.rope import axial_rotations, rotate


class RoPEAttention(nn.Module):
    """Single- or multi-head attention with axial RoPE on queries and (spatial) keys.

    ``rope_k_repeat``: keys may cover several frames of the query grid; the grid's
    rotations are tiled over them. The last ``num_k_exclude_rope`` keys (object
    pointers) are not rotated.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        kv_in_dim: int | None = None,
        rope_theta: float = 10000.0,
        rope_k_repeat: bool = False,
        feat_size: int = 64,
    ) -> None:
        """
        Arguments:
          embedding_dim (int): channels C of the queries and of the output; also the
            internal q/k/v width, split evenly over the heads.
          num_heads (int): number of attention heads.
          kv_in_dim (int | None): channels C_kv of the key and value inputs (None:
            embedding_dim).
          rope_theta (float): base theta of the RoPE frequencies.
          rope_k_repeat (bool): allow keys that cover several query grids (several memory
            frames), tiling the query grid's rotations over them.
          feat_size (int): side, in tokens, of the square query grid whose rotations are
            precomputed (other square grids are computed on first use).
        """
        super().__init__()
        kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        self.num_heads = num_heads
        self.head_dim = embedding_dim // num_heads
        self.rope_theta = rope_theta
        self.rope_k_repeat = rope_k_repeat
        self.q_proj = nn.Linear(embedding_dim, embedding_dim)
        self.k_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.v_proj = nn.Linear(kv_in_dim, embedding_dim)
        self.out_proj = nn.Linear(embedding_dim, embedding_dim)
        self._rotations: dict[int, torch.Tensor] = {
            feat_size * feat_size: axial_rotations(self.head_dim, feat_size, feat_size, rope_theta)
        }

    def rotations(self, num_tokens: int) -> torch.Tensor:
        """[num_tokens, head_dim / 2] rotations of a square grid (cached per size)."""
        if num_tokens not in self._rotations:
            side = math.isqrt(num_tokens)
            if side * side != num_tokens:
                raise ValueError(f"RoPE needs a square token grid, got {num_tokens} tokens")
            self._rotations[num_tokens] = axial_rotations(
                self.head_dim, side, side, self.rope_theta
            )
        return self._rotations[num_tokens]

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0
    ) -> torch.Tensor:
        """q [B, Nq, C], k/v [B, Nk, C_kv] -> [B, Nq, C]."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        rotations = self.rotations(q.shape[-2])
        num_k_rope = k.shape[-2] - num_k_exclude_rope
        if num_k_rope != q.shape[-2] and not self.rope_k_repeat:
            raise ValueError("keys cover several query grids but rope_k_repeat is off")
        q = rotate(q, rotations)
        if num_k_exclude_rope > 0:
            k = torch.cat((rotate(k[:, :, :num_k_rope], rotations), k[:, :, num_k_rope:]), dim=2)
        else:
            k = rotate(k, rotations)
        if q.dtype == torch.float32:
            out = F.scaled_dot_product_attention(q, k, self._split_heads(self.v_proj(v)))
        else:
            out = self._attend_low_precision(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _attend_low_precision(
        self, q: torch.Tensor, k: torch.Tensor, v_in: torch.Tensor
    ) -> torch.Tensor:
        """Softmax attention as matmuls over query chunks (scores of one chunk at a time,
        about 32 MiB); values projected before or after the average, whichever is narrower."""
        heads, head_dim = self.num_heads, self.head_dim
        project_after = v_in.shape[-1] < head_dim
        # [B, 1, Nk, C_kv] shared by the heads, or [B, heads, Nk, head_dim].
        v = v_in.unsqueeze(1) if project_after else self._split_heads(self.v_proj(v_in))
        q = q * (head_dim ** -0.5)
        k_t = k.transpose(-2, -1)
        batch, _, num_q, _ = q.shape
        num_k = k.shape[-2]
        chunk = max(1, (1 << 24) // max(1, batch * heads * num_k))
        out = q.new_empty(batch, heads, num_q, v.shape[-1])
        for start in range(0, num_q, chunk):
            scores = torch.matmul(q[:, :, start : start + chunk], k_t)
            torch.matmul(torch.softmax(scores, dim=-1), v, out=out[:, :, start : start + chunk])
        if not project_after:
            return out
        weight = self.v_proj.weight.reshape(heads, head_dim, -1)  # [heads, head_dim, C_kv]
        bias = self.v_proj.bias.reshape(1, heads, 1, head_dim)
        return torch.einsum("bhnc,hdc->bhnd", out, weight) + bias


class MemoryAttentionLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to memories, MLP (LayerNorm eps 1e-5).

    Released configs add no positional encoding to the queries of either attention and
    add the memory positional encoding to the cross-attention keys only.
    """

    def __init__(
        self,
        d_model: int = 256,
        dim_feedforward: int = 2048,
        num_heads: int = 1,
        kv_in_dim: int = 64,
        rope_theta: float = 10000.0,
        feat_size: int = 64,
    ) -> None:
        """
        Arguments:
          d_model (int): channels C of the frame tokens.
          dim_feedforward (int): hidden width of the MLP.
          num_heads (int): number of heads of the self- and cross-attention.
          kv_in_dim (int): channels C_mem of the memory tokens (cross-attention keys and
            values).
          rope_theta (float): base theta of the RoPE frequencies.
          feat_size (int): side, in tokens, of the square grid of frame tokens (64 for a
            1024 x 1024 input).
        """
        super().__init__()
        self.self_attn = RoPEAttention(
            d_model, num_heads, rope_theta=rope_theta, feat_size=feat_size
        )
        self.cross_attn_image = RoPEAttention(
            d_model,
            num_heads,
            kv_in_dim=kv_in_dim,
            rope_theta=rope_theta,
            rope_k_repeat=True,
            feat_size=feat_size,
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int,
    ) -> torch.Tensor:
        """x [B, HW, C], memory / memory_pos [B, M, C_mem] -> [B, HW, C].

        The sublayers compute in their weights' dtype (float32, or bfloat16 after
        ``MemoryAttention.in_precision``); the residual stream stays in ``x``'s dtype.
        """
        dtype = self.linear1.weight.dtype
        normed = self.norm1(x).to(dtype)
        x = x + self.self_attn(normed, normed, normed).to(x.dtype)
        normed = self.norm2(x).to(dtype)
        x = x + self.cross_attn_image(
            normed, (memory + memory_pos).to(dtype), memory.to(dtype),
            num_k_exclude_rope=num_obj_ptr_tokens,
        ).to(x.dtype)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x).to(dtype)))).to(x.dtype)


class MemoryAttention(nn.Module):
    """``num_layers`` memory attention layers and a final LayerNorm."""

    def __init__(self, d_model: int = 256, num_layers: int = 4, **layer_kwargs: int) -> None:
        """
        Arguments:
          d_model (int): channels C of the frame tokens.
          num_layers (int): number of stacked MemoryAttentionLayer.
          **layer_kwargs (int): further MemoryAttentionLayer arguments, passed to every
            layer (dim_feedforward, num_heads, kv_in_dim, rope_theta, feat_size).
        """
        super().__init__()
        self.layers = nn.ModuleList(
            MemoryAttentionLayer(d_model, **layer_kwargs) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def in_precision(self, dtype: torch.dtype) -> MemoryAttention:
        """A copy whose attention and MLP weights (the matmuls) are in ``dtype``; the
        LayerNorms and the residual stream stay float32."""
        twin = copy.deepcopy(self)
        for layer in twin.layers:
            for part in (layer.self_attn, layer.cross_attn_image, layer.linear1, layer.linear2):
                part.to(dtype)
        return twin

    def forward(
        self,
        curr: torch.Tensor,
        curr_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        num_obj_ptr_tokens: int = 0,
    ) -> torch.Tensor:
        """curr / curr_pos [B, HW, C] (raw stride-16 features and their sine PE),
        memory / memory_pos [B, M, C_mem] with the object-pointer tokens last -> [B, HW, C]."""
        x = curr + 0.1 * curr_pos
        for layer in self.layers:
            x = layer(x, memory, memory_pos, num_obj_ptr_tokens)
        return self.norm(x)
