"""The mask decoder's banded upscaling equals Meta's layers run plainly.

``MaskDecoder.upscaled_masks`` keeps the transposed convs' sub-pixels in blocked order,
multiplies them by the hypernetwork weights band by band and gathers the small product into
raster order. Here it is compared with the ``output_upscaling`` layers applied as written
(transposed convs, LayerNorm2d, GELUs) and the hypernetwork product over the full-size maps,
for one prompt, several, and bands that do not divide the rows. Parity with Meta's decoder
is in tests/parity/.
"""

from __future__ import annotations

import pytest
import torch

from sam2_shared.model import mask_decoder as mask_decoder_module
from sam2_shared.model.mask_decoder import MaskDecoder
from sam2_shared.model.transformer import TwoWayTransformer

CHANNELS, SIDE = 64, 6  # a 6x6 embedding of 64 channels: 24x24 masks


def _plain(decoder: MaskDecoder, image: torch.Tensor, feat_s0: torch.Tensor,
           feat_s1: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    upconv1, norm, act1, upconv2, act2 = decoder.output_upscaling
    x = act1(norm(upconv1(image.permute(0, 3, 1, 2)) + feat_s1))
    x = act2(upconv2(x) + feat_s0)  # [B, C/8, 4h, 4w]
    b, c8, height, width = x.shape
    return (hyper_in @ x.reshape(b, c8, -1)).reshape(b, -1, height, width)


@pytest.mark.parametrize("prompts", [1, 3])
@pytest.mark.parametrize("band_rows", [128, 4, 12])  # one band; several, the last one shorter
@pytest.mark.parametrize("masks", [3, 4])  # multimask output; all four tokens
def test_upscaled_masks_equal_the_plain_layers(
    monkeypatch: pytest.MonkeyPatch, prompts: int, band_rows: int, masks: int
) -> None:
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=1, embedding_dim=CHANNELS, num_heads=2, mlp_dim=32)
    decoder = MaskDecoder(CHANNELS, transformer).eval()
    for parameter in decoder.output_upscaling.parameters():  # biases and norms not trivial
        torch.nn.init.normal_(parameter, std=0.5)
    image = torch.randn(prompts, SIDE, SIDE, CHANNELS)
    feat_s0 = torch.randn(1, CHANNELS // 8, 4 * SIDE, 4 * SIDE)
    feat_s1 = torch.randn(1, CHANNELS // 4, 2 * SIDE, 2 * SIDE)
    hyper_in = torch.randn(prompts, masks, CHANNELS // 8)
    monkeypatch.setattr(mask_decoder_module, "_BAND_PROMPT_ROWS", band_rows)
    with torch.inference_mode():
        result = decoder.upscaled_masks(image, feat_s0, feat_s1, hyper_in)
        expected = _plain(decoder, image, feat_s0, feat_s1, hyper_in)
    assert result.shape == (prompts, masks, 4 * SIDE, 4 * SIDE)
    torch.testing.assert_close(result, expected, rtol=1e-4, atol=1e-4)


def test_autograd_works_after_inference_mode_calls() -> None:
    """The gather index is cached across calls: one first made under inference mode (as the
    serving paths call) must still serve a later call that trains through the masks."""
    torch.manual_seed(0)
    transformer = TwoWayTransformer(depth=1, embedding_dim=CHANNELS, num_heads=2, mlp_dim=32)
    decoder = MaskDecoder(CHANNELS, transformer)
    image = torch.randn(1, SIDE + 1, SIDE, CHANNELS)  # a shape no other test caches
    feat_s0 = torch.randn(1, CHANNELS // 8, 4 * (SIDE + 1), 4 * SIDE)
    feat_s1 = torch.randn(1, CHANNELS // 4, 2 * (SIDE + 1), 2 * SIDE)
    hyper_in = torch.randn(1, 3, CHANNELS // 8)
    with torch.inference_mode():
        served = decoder.upscaled_masks(image, feat_s0, feat_s1, hyper_in)
    hyper_in.requires_grad_(True)
    trained = decoder.upscaled_masks(image, feat_s0, feat_s1, hyper_in)
    trained.square().sum().backward()
    assert hyper_in.grad is not None and hyper_in.grad.abs().sum() > 0
    torch.testing.assert_close(trained.detach(), served)
