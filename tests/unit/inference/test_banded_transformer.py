"""The two-way transformer's banded image update equals the blocks run whole-image.

``TwoWayTransformer.forward`` runs each block's image->token update, and the next
attention's scores, in bands of image rows; ``TwoWayAttentionBlock.forward`` is the same
block on the whole image at once. Parity with Meta's decoder is in tests/parity/.
"""

from __future__ import annotations

import pytest
import torch

from sam2_shared.model import common
from sam2_shared.model import transformer as transformer_module
from sam2_shared.model.transformer import TwoWayTransformer

SIDE, CHANNELS = 16, 64  # a 16x16 image embedding: 256 tokens


def _whole_image(model: TwoWayTransformer, image: torch.Tensor, image_pe: torch.Tensor,
                 tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys = image.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    queries = tokens
    for block in model.layers:
        queries, keys = block(queries, keys, tokens, key_pe)
    final = model.final_attn_token_to_image.attend_few_queries(
        queries + tokens, keys + key_pe, keys)
    return model.norm_final_attn(queries + final), keys


@pytest.mark.parametrize("prompts, image_batch", [(1, 1), (5, 1), (5, 5)])
@pytest.mark.parametrize("band_tokens", [7, 256, 1 << 20])  # uneven bands, one row, no banding
def test_banded_update_equals_whole_image_blocks(
    monkeypatch: pytest.MonkeyPatch, prompts: int, image_batch: int, band_tokens: int
) -> None:
    torch.manual_seed(0)
    model = TwoWayTransformer(depth=2, embedding_dim=CHANNELS, num_heads=8, mlp_dim=128).eval()
    image = torch.randn(image_batch, CHANNELS, SIDE, SIDE)
    image_pe = torch.randn(1, CHANNELS, SIDE, SIDE)
    tokens = torch.randn(prompts, 7, CHANNELS)
    monkeypatch.setattr(transformer_module, "_BAND_PROMPT_TOKENS", band_tokens)
    with torch.inference_mode():
        queries, keys = model(image, image_pe, tokens)
        expected_queries, expected_keys = _whole_image(model, image, image_pe, tokens)
    assert queries.shape == (prompts, 7, CHANNELS)
    assert keys.shape == (prompts, SIDE * SIDE, CHANNELS)
    torch.testing.assert_close(queries, expected_queries, rtol=0, atol=1e-5)
    torch.testing.assert_close(keys, expected_keys, rtol=0, atol=1e-5)
    # With several bands, the layers' image states in reused per-thread buffers (every size
    # qualifying here): the same results, also from the second call, which writes into the
    # first one's.
    monkeypatch.setattr(common, "_FRESH_MAPPING_BYTES", 0)
    for _ in range(2):
        with torch.inference_mode():
            queries, keys = model(image, image_pe, tokens, reuse_buffers=True)
        torch.testing.assert_close(queries, expected_queries, rtol=0, atol=1e-5)
        torch.testing.assert_close(keys, expected_keys, rtol=0, atol=1e-5)
    several_bands = prompts * SIDE * SIDE > band_tokens
    # One band is its own result: nothing is copied into a buffer.
    assert (model._scratch.kept_bytes() > 0) == several_bands
    if image_batch == 1:  # the image side kept across calls: made by the first, reused after
        image_side: dict[str, torch.Tensor] = {}
        for _ in range(2):
            with torch.inference_mode():
                queries, keys = model(image, image_pe, tokens, image_side)
            assert {"keys_with_pe", "k", "v", "q"} <= image_side.keys()
            torch.testing.assert_close(queries, expected_queries, rtol=0, atol=1e-5)
            torch.testing.assert_close(keys, expected_keys, rtol=0, atol=1e-5)
