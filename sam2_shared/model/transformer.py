"""Two-way transformer of the mask decoder: prompt tokens <-> image embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sam2_shared.model.common import MLP, ScratchBuffers

# Prompts x image tokens per band of the image update (``TwoWayTransformer``): a band's
# [.., C] fp32 maps are 4 MiB each, within a CPU's last-level cache; smaller bands measured
# slower (each of the ~12 ops per band waits on the OpenMP threads), 16 bands for 16 prompts
# 1.2x faster than none.
_BAND_PROMPT_TOKENS = 4096
# The per-prompt image states of a forward of 16 prompts, one per layer (64 MiB each at
# fp32 for a 64x64 embedding of 256 channels), kept per thread between forwards.
_SCRATCH_BYTES = 128 << 20


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

    def attend_few_queries(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        projected: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Same result as ``forward`` for few queries and many keys (tokens -> image).

        q [B, Nq, C], k/v [B or 1, Nk, C_kv] -> [B, Nq, C]; ``projected``: ``project(k, v)``
        where the caller keeps it (one image's, reused across calls).

        With one image shared by B > 1 prompts (or its projections given), keys and values
        are projected once and the prompts' queries are stacked into one attention call.
        Otherwise the projections are folded into the Nq queries instead of applied to the Nk
        keys: ``q_h K_h^T = (q_h W_k,h) k^T`` (the key bias adds a constant per query, which
        cancels in the softmax) and ``A V_h = (A v) W_v,h^T + b_v,h`` (rows of A sum to 1).
        """
        b, nq, _ = q.shape
        if projected is None and k.shape[0] == 1 and b > 1:
            projected = self.project(k, v)
        if projected is not None:
            qh = self._split_heads(self.q_proj(q))  # [B, H, Nq, d]
            kh, vh = projected
            stacked = qh.transpose(0, 1).reshape(1, self.num_heads, b * nq, -1)
            out = F.scaled_dot_product_attention(stacked, kh, vh)  # [1, H, B*Nq, d]
            out = out.reshape(self.num_heads, b, nq, -1).permute(1, 2, 0, 3)
            return self.out_proj(out.reshape(b, nq, -1))
        scores = self.queries_in_key_space(q) @ k.transpose(1, 2)  # [B, H*Nq, Nk]
        return self.attend_scored_keys(scores, v)

    def project(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v [1, Nk, C_kv] -> projected keys and values, [1, H, Nk, d] each."""
        return self._split_heads(self.k_proj(k)), self._split_heads(self.v_proj(v))

    def queries_in_key_space(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, Nq, C] -> [B, H*Nq, C_kv]: ``scale * q_h W_k,h`` per head, so that the
        attention scores against raw keys k [B, Nk, C_kv] are ``result @ k^T`` (the key bias
        adds a constant per query, which cancels in the softmax)."""
        qh = self._split_heads(self.q_proj(q))  # [B, H, Nq, d]
        scale = qh.shape[-1] ** -0.5
        return ((qh * scale) @ self._head_weights(self.k_proj)).flatten(1, 2)

    def attend_scored_keys(self, scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention's output from ``queries_in_key_space(q) @ k^T`` [B, H*Nq, Nk] and the
        raw values v [B or 1, Nk, C_kv] -> [B, Nq, C]: ``A V_h = (A v) W_v,h^T + b_v,h`` (rows
        of A sum to 1)."""
        b, heads = scores.shape[0], self.num_heads
        nq = scores.shape[1] // heads
        attn = scores.softmax(dim=-1)
        mixed = (attn @ v).reshape(b, heads, nq, -1)  # [B, H, Nq, C_kv]
        w_v = self._head_weights(self.v_proj)  # [H, d, C_kv]
        out = mixed @ w_v.transpose(1, 2) + self.v_proj.bias.reshape(heads, 1, -1)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))

    def attend_few_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:
        """``residual + forward(q, k, v)`` for many queries and few keys (image -> tokens).

        q [B or 1, Nq, C], k/v [B, Nk, C], residual [B or 1, Nq, C] -> [B, Nq, C].
        ``few_keys(k, v)`` then ``attend_prepared_keys``; the second works on any rows of
        the queries (bands of the image).
        """
        return self.attend_prepared_keys(q, self.few_keys(k, v), residual)

    def few_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key side of ``attend_prepared_keys``: k/v [B, Nk, C] -> (scaled keys
        [B, H, Nk, d], values with the output projection folded in [B, H*Nk, C])."""
        b, nk, _ = k.shape
        heads = self.num_heads
        kh = self._split_heads(self.k_proj(k))  # [B, H, Nk, d]
        vh = self._split_heads(self.v_proj(v))
        w_o = self.out_proj.weight.reshape(-1, heads, kh.shape[-1])  # [C, H, d]
        values_out = (vh @ w_o.permute(1, 2, 0)).reshape(b, heads * nk, -1)  # [B, H*Nk, C]
        return kh * kh.shape[-1] ** -0.5, values_out + self.out_proj.bias / heads

    def attend_prepared_keys(
        self,
        q: torch.Tensor,
        keys: tuple[torch.Tensor, torch.Tensor],
        residual: torch.Tensor,
        projected_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``residual + forward(q, k, v)`` with ``keys = few_keys(k, v)``.

        q [B or 1, Nq, C], residual [B or 1, Nq, C] -> [B, Nq, C]; ``projected_q``:
        ``q_proj(q)`` [1, Nq, internal] where the caller keeps it (one image's).

        The output projection is folded into the values (``sum_h A_h (V_h W_o,h^T)``), so
        the Nq x internal x C product is never formed. With one image shared by B > 1
        prompts the queries are projected once; otherwise W_q is folded into the keys:
        ``q_h K_h^T = q (W_q,h^T K_h^T) + b_q,h K_h^T``. The residual and the output bias
        are added by the last matmul itself (each head's weights sum to 1 over the keys, so
        ``b_o / heads`` on every value row adds ``b_o``): no pass over the Nq x C result.
        """
        kh, values_out = keys
        b, heads, nk, _ = kh.shape
        nq = q.shape[1]
        # Scores are laid out [.., Nk, Nq] so the softmax over the few keys runs across
        # the contiguous query axis (a last-dim softmax over 8 values is ~3x slower).
        if projected_q is None and q.shape[0] == 1 and b > 1:
            projected_q = self.q_proj(q)
        if projected_q is not None:
            qh = self._split_heads(projected_q)[0]  # [H, Nq, d]
            stacked = kh.transpose(0, 1).reshape(heads, b * nk, -1)  # [H, B*Nk, d]
            scores = stacked @ qh.transpose(1, 2)  # [H, B*Nk, Nq]
            attn = scores.reshape(heads, b, nk, nq).softmax(dim=2)
            attn = attn.transpose(0, 1).reshape(b, heads * nk, nq)
        else:
            w_q = self._head_weights(self.q_proj)  # [H, d, C]
            folded = kh @ w_q  # [B, H, Nk, C]
            bias = kh @ self.q_proj.bias.reshape(heads, -1, 1)  # [B, H, Nk, 1]
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
        """queries [B, Nq, C], keys [B or 1, HW, C] -> updated ([B, Nq, C], [B, HW, C]).

        The block on its own, the whole image at once; ``TwoWayTransformer`` runs the same
        steps with the image side in bands.
        """
        queries = self.attend_tokens(queries, query_pe)
        keys_with_pe = keys + key_pe
        from_image = self.cross_attn_token_to_image.attend_few_queries(
            queries + query_pe, keys_with_pe, keys
        )
        queries = self.finish_tokens(queries, from_image)
        keys = self.update_image(keys, keys_with_pe, self.image_side_keys(queries, query_pe))
        return queries, keys

    def attend_tokens(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """Token self-attention and norm1: [B, Nq, C] -> [B, Nq, C]."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        return self.norm1(queries)

    def finish_tokens(self, queries: torch.Tensor, from_image: torch.Tensor) -> torch.Tensor:
        """The token->image attention's residual and norm2, then the MLP and norm3."""
        queries = self.norm2(queries + from_image)
        return self.norm3(queries + self.mlp(queries))

    def image_side_keys(
        self, queries: torch.Tensor, query_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens as keys/values of the image->token attention (``Attention.few_keys``)."""
        return self.cross_attn_image_to_token.few_keys(queries + query_pe, queries)

    def update_image(
        self,
        keys: torch.Tensor,
        keys_with_pe: torch.Tensor,
        token_keys: tuple[torch.Tensor, torch.Tensor],
        projected_q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image->token attention with its residual, then norm4, for any rows of the image:
        keys / keys_with_pe [B or 1, rows, C] -> [B, rows, C] (``projected_q``: see
        ``Attention.attend_prepared_keys``)."""
        attended = self.cross_attn_image_to_token.attend_prepared_keys(
            keys_with_pe, token_keys, residual=keys, projected_q=projected_q
        )
        return self.norm4(attended)


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
        self._scratch = ScratchBuffers(_SCRATCH_BYTES)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        image_side: dict[str, torch.Tensor] | None = None,
        reuse_buffers: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding [B or 1, C, h, w], image_pe [1, C, h, w], tokens [B, N, C].

        Returns (tokens [B, N, C], image [B, hw, C]). ``image_side``: a dict kept by the
        caller for one image embedding of batch 1 (and this image_pe); the first layer's
        image-only work is stored in it and reused by later calls. ``reuse_buffers``: the
        layers' image states go into this thread's ``ScratchBuffers``, so the returned
        image is overwritten by the thread's next such call: for a caller that is done with
        it by then (``MaskDecoder``).
        """
        # Token-major copies (free when the inputs are channels_last): adding strided
        # NCHW views costs more than the attention itself on a CPU.
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        query_pe = point_embedding
        first = self.layers[0]
        side = image_side if image_side is not None else {}
        if image_side is not None and "keys_with_pe" not in image_side:
            image_side.update(self._first_layer_image_side(keys, key_pe))
        keys_with_pe: torch.Tensor | None = side.get("keys_with_pe")
        if keys_with_pe is None:
            keys_with_pe = keys + key_pe
        queries = first.attend_tokens(point_embedding, query_pe)
        from_image = first.cross_attn_token_to_image.attend_few_queries(
            queries + query_pe, keys_with_pe, keys,
            projected=(side["k"], side["v"]) if "k" in side else None,
        )
        queries = first.finish_tokens(queries, from_image)
        projected_q = side.get("q")
        for i, layer in enumerate(self.layers):
            # Layer i's image update runs in bands together with the scores of the next
            # token->image attention (layer i+1's, or the final one), whose queries depend
            # on the tokens only.
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if following is not None:
                next_queries = following.attend_tokens(queries, query_pe)
                to_image = following.cross_attn_token_to_image
            else:
                next_queries, to_image = queries, self.final_attn_token_to_image
            keys, scores = self._update_image_in_bands(
                layer, layer.image_side_keys(queries, query_pe), keys, key_pe,
                to_image.queries_in_key_space(next_queries + query_pe), keys_with_pe,
                projected_q, self._scratch if reuse_buffers else None, f"image_state_{i}",
            )
            keys_with_pe = projected_q = None  # the bands add pe to the new keys themselves
            from_image = to_image.attend_scored_keys(scores, keys)
            if following is not None:
                queries = following.finish_tokens(next_queries, from_image)
            else:
                queries = self.norm_final_attn(queries + from_image)
        return queries, keys

    def image_side_parameters(self) -> tuple[torch.Tensor, ...]:
        """The weights ``_first_layer_image_side`` uses (its results depend on them)."""
        first = self.layers[0]
        projections = (first.cross_attn_token_to_image.k_proj,
                       first.cross_attn_token_to_image.v_proj,
                       first.cross_attn_image_to_token.q_proj)
        return tuple(t for linear in projections for t in (linear.weight, linear.bias))

    def _first_layer_image_side(
        self, keys: torch.Tensor, key_pe: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """What the first layer computes from the image alone (keys [1, HW, C]): keys + pe,
        the token->image attention's projected keys and values, the image->token attention's
        projected queries. Projecting costs the first prompt on an image ~0.4 GFLOP more
        than the folded per-prompt products would; the next prompts on it skip both."""
        first = self.layers[0]
        keys_with_pe = keys + key_pe
        k, v = first.cross_attn_token_to_image.project(keys_with_pe, keys)
        q = first.cross_attn_image_to_token.q_proj(keys_with_pe)
        return {"keys_with_pe": keys_with_pe, "k": k, "v": v, "q": q}

    @staticmethod
    def _update_image_in_bands(
        layer: TwoWayAttentionBlock,
        token_keys: tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        key_pe: torch.Tensor,
        next_queries: torch.Tensor,
        keys_with_pe: torch.Tensor | None,
        projected_q: torch.Tensor | None,
        scratch: ScratchBuffers | None = None,
        scratch_name: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer.update_image`` of keys [B or 1, HW, C] -> [B, HW, C], and the next
        attention's scores ``next_queries @ (new keys + key_pe)^T`` [B, H*Nq, HW].
        ``keys_with_pe``: ``keys + key_pe`` where the caller has it (None: made per band);
        ``projected_q``: the image->token attention's ``q_proj(keys_with_pe)`` [1, HW, C/2]
        where the caller has it. ``scratch``: where the new keys go (under
        ``scratch_name``); None: a new tensor.

        Everything here is per image row, so it runs in bands of rows: a band's per-prompt
        maps (residual, attention output, LayerNorm, the pe sum) stay in the CPU cache
        instead of making ~6 round trips through memory per prompt at [HW, C] each.
        """
        b, hw = next_queries.shape[0], keys.shape[1]
        rows = max(1, _BAND_PROMPT_TOKENS // b)
        bands = [slice(top, min(hw, top + rows)) for top in range(0, hw, rows)]
        new_keys = scores = None  # one band (one prompt): its own results, without copies
        if len(bands) > 1:
            shape = (b, hw, keys.shape[2])
            new_keys = keys.new_empty(shape) if scratch is None else \
                scratch.empty(scratch_name, shape, keys)
            scores = keys.new_empty(b, next_queries.shape[1], hw)
        for band in bands:
            old, pe = keys[:, band], key_pe[:, band]
            old_with_pe = old + pe if keys_with_pe is None else keys_with_pe[:, band]
            updated = layer.update_image(
                old, old_with_pe, token_keys,
                None if projected_q is None else projected_q[:, band],
            )
            band_scores = next_queries @ (updated + pe).transpose(1, 2)
            if new_keys is None or scores is None:
                new_keys, scores = updated, band_scores
            else:
                new_keys[:, band] = updated
                scores[:, :, band] = band_scores
        assert new_keys is not None and scores is not None
        return new_keys, scores
