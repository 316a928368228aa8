"""Two-way transformer of the mask decoder: prompt tokens <-> image embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.common import MLP


class Attention(nn.Module):
    """Multi-head attention whose q/k/v project to ``embedding_dim / downsample_rate``.

    Keys/values may have batch 1 while queries have batch B: the projections are then
    computed once and broadcast (the image side of a multi-prompt batch).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        kv_in_dim: int | None = None,
    ) -> None:
        """
        Arguments:
          embedding_dim (int): channels C of the queries and of the output.
          num_heads (int): number of attention heads; must divide
            embedding_dim / downsample_rate.
          downsample_rate (int): factor by which the q/k/v projections reduce the
            channels (internal width embedding_dim / downsample_rate).
          kv_in_dim (int | None): channels C_kv of the keys and values (None:
            embedding_dim).
        """
        super().__init__()
        internal_dim = embedding_dim // downsample_rate
        kv_in_dim = kv_in_dim if kv_in_dim is not None else embedding_dim
        if internal_dim % num_heads:
            raise ValueError("num_heads must divide the internal dimension")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(kv_in_dim, internal_dim)
        self.v_proj = nn.Linear(kv_in_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, heads, N, C / heads]."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Nq, C], k/v [B or 1, Nk, C_kv] -> [B, Nq, C]."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        if k.shape[0] != q.shape[0]:
            k = k.expand(q.shape[0], -1, -1, -1)
            v = v.expand(q.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _head_weights(self, linear: nn.Linear) -> torch.Tensor:
        """[internal, C_in] weight -> [heads, head_dim, C_in]."""
        return linear.weight.reshape(self.num_heads, -1, linear.weight.shape[1])

    def attend_few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Same result as ``forward`` for few queries and many keys (tokens -> image).

        q [B, Nq, C], k/v [B or 1, Nk, C_kv] -> [B, Nq, C].

        With one image shared by B > 1 prompts, keys and values are projected once and
        the prompts' queries are stacked into one attention call. Otherwise the
        projections are folded into the Nq queries instead of applied to the Nk keys:
        ``q_h K_h^T = (q_h W_k,h) k^T`` (the key bias adds a constant per query, which
        cancels in the softmax) and ``A V_h = (A v) W_v,h^T + b_v,h`` (rows of A sum to 1).
        """
        b, nq, _ = q.shape
        qh = self._split_heads(self.q_proj(q))  # [B, H, Nq, d]
        if k.shape[0] == 1 and b > 1:
            kh = self._split_heads(self.k_proj(k))  # [1, H, Nk, d]
            vh = self._split_heads(self.v_proj(v))
            stacked = qh.transpose(0, 1).reshape(1, self.num_heads, b * nq, -1)
            out = F.scaled_dot_product_attention(stacked, kh, vh)  # [1, H, B*Nq, d]
            out = out.reshape(self.num_heads, b, nq, -1).permute(1, 2, 0, 3)
            return self.out_proj(out.reshape(b, nq, -1))
        scale = qh.shape[-1] ** -0.5
        q_in_key_space = qh @ self._head_weights(self.k_proj)  # [B, H, Nq, C_kv]
        scores = (q_in_key_space * scale).flatten(1, 2) @ k.transpose(1, 2)  # [B, H*Nq, Nk]
        attn = scores.softmax(dim=-1)
        mixed = (attn @ v).reshape(b, self.num_heads, nq, -1)  # [B, H, Nq, C_kv]
        w_v = self._head_weights(self.v_proj)  # [H, d, C_kv]
        out = mixed @ w_v.transpose(1, 2) + self.v_proj.bias.reshape(self.num_heads, 1, -1)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))

    def attend_few_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """``residual + forward(q, k, v)`` for many queries and few keys (image -> tokens).

        q [B or 1, Nq, C], k/v [B, Nk, C], residual [B or 1, Nq, C] -> [B, Nq, C].

        The output projection is folded into the values (``sum_h A_h (V_h W_o,h^T)``), so
        the Nq x internal x C product is never formed. With one image shared by B > 1
        prompts the queries are projected once; otherwise W_q is folded into the keys:
        ``q_h K_h^T = q (W_q,h^T K_h^T) + b_q,h K_h^T``. The residual and the output bias
        are added by the last matmul itself (each head's weights sum to 1 over the keys, so
        ``b_o / heads`` on every value row adds ``b_o``): no pass over the Nq x C result.
        """
        b, nk, _ = k.shape
        heads = self.num_heads
        kh = self._split_heads(self.k_proj(k))  # [B, H, Nk, d]
        vh = self._split_heads(self.v_proj(v))
        scale = kh.shape[-1] ** -0.5
        w_o = self.out_proj.weight.reshape(-1, heads, kh.shape[-1])  # [C, H, d]
        values_out = (vh @ w_o.permute(1, 2, 0)).reshape(b, heads * nk, -1)  # [B, H*Nk, C]
        values_out = values_out + self.out_proj.bias / heads
        nq = q.shape[1]
        # Scores are laid out [.., Nk, Nq] so the softmax over the few keys runs across
        # the contiguous query axis (a last-dim softmax over 8 values is ~3x slower).
        if q.shape[0] == 1 and b > 1:
            qh = self._split_heads(self.q_proj(q))[0]  # [H, Nq, d]
            keys = kh.transpose(0, 1).reshape(heads, b * nk, -1)  # [H, B*Nk, d]
            scores = (keys * scale) @ qh.transpose(1, 2)  # [H, B*Nk, Nq]
            attn = scores.reshape(heads, b, nk, nq).softmax(dim=2)
            attn = attn.transpose(0, 1).reshape(b, heads * nk, nq)
        else:
            w_q = self._head_weights(self.q_proj)  # [H, d, C]
            folded = (kh @ w_q) * scale  # [B, H, Nk, C]
            bias = (kh @ self.q_proj.bias.reshape(heads, -1, 1)) * scale  # [B, H, Nk, 1]
            scores = folded.reshape(b, heads * nk, -1) @ q.transpose(1, 2)  # [B, H*Nk, Nq]
            scores = scores + bias.reshape(b, heads * nk, 1)
            attn = scores.reshape(b, heads, nk, nq).softmax(dim=2).reshape(b, heads * nk, nq)
        return torch.baddbmm(residual, attn.transpose(1, 2), values_out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, token MLP, image->token (post-norm).

    The first block's self-attention uses no positional encoding and no residual.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        """
        Arguments:
          embedding_dim (int): channels C of the tokens and the image embedding.
          num_heads (int): number of heads of each attention.
          mlp_dim (int): hidden width of the token MLP.
          attention_downsample_rate (int): channel downsample rate of the two
            cross-attentions.
          skip_first_layer_pe (bool): give the token self-attention no positional
            encoding and no residual connection (the first block).
        """
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, 2, activation=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Nq, C], keys [B or 1, HW, C] -> updated ([B, Nq, C], [B, HW, C])."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        keys_with_pe = keys + key_pe
        to_image, from_image = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        queries = queries + to_image.attend_few_queries(queries + query_pe, keys_with_pe, keys)
        queries = self.norm2(queries)

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = from_image.attend_few_keys(keys_with_pe, q, queries, residual=keys)
        keys = self.norm4(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks then a final token->image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
    ) -> None:
        """
        Arguments:
          depth (int): number of two-way attention blocks.
          embedding_dim (int): channels C of the image embedding and the tokens.
          num_heads (int): number of heads of every attention.
          mlp_dim (int): hidden width of the token MLP of each block.
          attention_downsample_rate (int): channel downsample rate of the cross-attentions
            (the blocks' and the final token-to-image one).
        """
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding [B or 1, C, h, w], image_pe [1, C, h, w], tokens [B, N, C].

        Returns (tokens [B, N, C], image [B, hw, C]).
        """
        # Token-major copies (free when the inputs are channels_last): adding strided
        # NCHW views costs more than the attention itself on a CPU.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn_out = self.final_attn_token_to_image.attend_few_queries(
            queries + point_embedding, keys + key_pe, keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys
